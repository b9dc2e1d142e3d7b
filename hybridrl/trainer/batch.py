"""Samples → padded tensors for the trainer.

Layout (verl's): prompts left-padded to P, responses right-padded to L, so response
token t of every row sits at column P + t and is predicted by the logits at P + t - 1.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from hybridrl.types import Sample


@dataclass
class TrainBatch:
    input_ids: torch.Tensor        # [B, P+L]
    attention_mask: torch.Tensor   # [B, P+L]  1 on real tokens
    position_ids: torch.Tensor     # [B, P+L]
    response_mask: torch.Tensor    # [B, L]    1 on trainable response tokens (tool tokens are 0)
    rollout_logp: torch.Tensor     # [B, L]    log-probs the engine reported
    scores: torch.Tensor           # [B]       sequence rewards
    group_ids: torch.Tensor        # [B]       samples of one prompt share a group id
    prompt_len: int                # P

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def apply(self, fn) -> "TrainBatch":
        """`fn` applied to every tensor field (prompt_len kept)."""
        return dataclasses.replace(self, **{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                                            if f.name != "prompt_len"})

    def select(self, idx: torch.Tensor) -> "TrainBatch":
        """Rows `idx` of every tensor (for mini- and micro-batches)."""
        return self.apply(lambda t: t[idx])

    def trimmed(self) -> "TrainBatch":
        """Drop columns that are padding in every row (left of the prompts, right of the responses)."""
        real = self.attention_mask.bool().any(0).nonzero().flatten()
        first = min(int(real[0]), self.prompt_len - 1)
        keep_l = max(1, int(real[-1]) + 1 - self.prompt_len)
        cols = slice(first, self.prompt_len + keep_l)
        return TrainBatch(self.input_ids[:, cols], self.attention_mask[:, cols], self.position_ids[:, cols],
                          self.response_mask[:, :keep_l], self.rollout_logp[:, :keep_l], self.scores,
                          self.group_ids, prompt_len=self.prompt_len - first)


def collate(samples: list[Sample], pad_id: int) -> TrainBatch:
    B = len(samples)
    P = max(len(s.prompt_ids) for s in samples)
    L = max(1, max(len(s.response_ids) for s in samples))
    ids = torch.full((B, P + L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + L), dtype=torch.long)
    rmask = torch.zeros((B, L), dtype=torch.float32)
    rlogp = torch.zeros((B, L), dtype=torch.float32)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        ids[i, P - p:P] = torch.tensor(s.prompt_ids)
        attn[i, P - p:P + r] = 1
        if r:
            ids[i, P:P + r] = torch.tensor(s.response_ids)
            rmask[i, :r] = torch.tensor(s.loss_mask, dtype=torch.float32)
            rlogp[i, :r] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    scores = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    groups = torch.tensor([s.group for s in samples], dtype=torch.long)
    return TrainBatch(ids, attn, pos, rmask, rlogp, scores, groups, prompt_len=P)
