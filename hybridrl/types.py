"""One `Sample` per trajectory: the unit that flows from data → rollout → reward → trainer.

Shapes: a sample holds flat token lists; the trainer packs many samples into
tensors of shape [B, P+L] (B = prompts x n, P = prompt length, L = response length).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One trajectory. Append response tokens only through `append`, so the masks stay aligned."""

    prompt_ids: list[int]
    index: int = 0                      # position of the prompt in the dataset
    group: int = 0                      # prompts sharing a group id are the n samples of one prompt
    data_source: str = ""
    ground_truth: Any = None
    extra_info: dict = field(default_factory=dict)
    raw_prompt: Any = None              # chat messages, kept for logging / multi-turn
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)         # 1 = trained on, 0 = tool / user tokens
    rollout_logprobs: list[float] = field(default_factory=list)
    response_text: str = ""
    finish_reason: str = ""             # "stop" | "length" | "abort"
    weight_version: int = -1
    reward: float = 0.0
    reward_extra: dict = field(default_factory=dict)
    baseline: float = 0.0               # ReMax: the score of this prompt's greedy answer

    def append(self, tokens: list[int], logprobs: list[float] | None = None, trainable: bool = True) -> None:
        """Append response tokens; tool or user turns pass trainable=False and get no log-probs."""
        self.response_ids.extend(tokens)
        self.loss_mask.extend([1 if trainable else 0] * len(tokens))
        self.rollout_logprobs.extend(logprobs if logprobs is not None else [0.0] * len(tokens))

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"
