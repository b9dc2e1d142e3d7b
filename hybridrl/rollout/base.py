"""The rollout engine interface every backend implements, and the lazy name → class table.

    engine = make_engine(cfg)                      # picks cfg.rollout.name, imports only that backend
    outs = await engine.generate(prompt_ids, SamplingParams(max_new_tokens=64, n=4))
    await engine.update_weights(buckets, version)  # buckets: iterable of [(hf_name, tensor), ...]
    await engine.sleep(["weights", "kv_cache"]); await engine.wake(["weights"]); await engine.wake(["kv_cache"])
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

TAGS = ("weights", "kv_cache")

# name -> "module:Class"; imported only when chosen, so `import hybridrl` never imports sglang.
ENGINES = {
    "native": "hybridrl.rollout.native.engine:NativeEngine",
    "sglang": "hybridrl.rollout.sglang:SGLangEngine",
}


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0            # 0 = greedy
    top_k: int = -1                     # -1 = off
    top_p: float = 1.0
    min_p: float = 0.0
    n: int = 1                          # samples per prompt, sharing one prefill
    stop_token_ids: list[int] = field(default_factory=list)   # besides the model's EOS
    stop: list[str] = field(default_factory=list)             # stop strings (need the engine's tokenizer)
    ignore_eos: bool = False
    seed: int | None = None

    def validate(self) -> None:
        from hybridrl import HybridRLError
        if self.max_new_tokens <= 0:
            raise HybridRLError(f"max_new_tokens must be > 0, got {self.max_new_tokens}: raise rollout.response_length")
        if self.temperature < 0:
            raise HybridRLError(f"temperature must be >= 0, got {self.temperature} (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise HybridRLError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise HybridRLError(f"n must be >= 1, got {self.n}")


@dataclass
class GenerateOutput:
    """One completion. Log-probs are of the sampled tokens, from the logits after temperature."""

    output_ids: list[int]
    logprobs: list[float]
    finish_reason: str                  # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int
    weight_version: int


class RolloutEngine(Protocol):
    async def generate(self, input_ids: list[int], sampling: SamplingParams,
                       request_id: str | None = None) -> list[GenerateOutput]:
        """Generate `sampling.n` completions of one prompt. Many calls may be in flight at once."""

    async def update_weights(self, buckets: Iterable[Sequence[tuple[str, "object"]]], version: int) -> None:
        """Load a stream of buckets of (hf_name, tensor) in place; afterwards the engine reports `version`."""

    async def sleep(self, tags: Sequence[str] = TAGS) -> None:
        """Free memory: "kv_cache" drops the KV pool, "weights" moves/drops weights."""

    async def wake(self, tags: Sequence[str] = TAGS) -> None:
        """Restore what `sleep` freed."""

    async def flush_cache(self) -> None: ...

    async def abort(self, request_id: str | None = None) -> None:
        """Abort one request, or all when request_id is None; aborted requests finish with "abort"."""

    async def close(self) -> None: ...


def engine_class(name: str):
    from hybridrl import HybridRLError
    if name not in ENGINES:
        raise HybridRLError(f"unknown rollout.name={name!r}: choose one of {sorted(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)
