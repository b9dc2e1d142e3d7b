"""The rollout engine interface every backend implements, and the lazy name → class table.

    engine = engine_class(cfg.rollout.name).from_config(cfg, model_path)   # imports only that backend
    outs = await engine.generate(prompt_ids, SamplingParams(max_new_tokens=64, n=4))
    await engine.sleep(["kv_cache", "weights"])     # colocated: free the GPU for the trainer
    await engine.update_weights(buckets, version)   # wakes in stages, loads, flushes: serves `version` after
    await engine.close()

Five methods. Aborting is cancelling: a cancelled `generate` aborts its request on the engine.
`update_weights` is the whole weight-sync contract: whatever was asleep wakes in the order that
avoids an OOM (weights, then the push, then the KV cache), the prefix cache is flushed, and the
engine reports `version` on every later output. How the tensors travel (in-process, CUDA IPC,
disk, NCCL) is the engine's transport, chosen once when the engine is built.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

from hybridrl import HybridRLError

TAGS = ("weights", "kv_cache")


class EngineRestarted(HybridRLError):
    """The engine's server died and was started again: it needs the weights pushed again (update_weights with
    the current version), after which the requests it lost can be sent again. Raised by generate()."""


# name -> "module:Class"; imported only when chosen, so `import hybridrl` never imports sglang.
ENGINES = {
    "native": "hybridrl.rollout.native.engine:NativeEngine",
    "sglang": "hybridrl.rollout.sglang.engine:SGLangEngine",
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

    @classmethod
    def from_rollout(cls, r, **overrides) -> "SamplingParams":
        """The one builder from a config's rollout section (training, validation, generate), then overrides."""
        base = dict(max_new_tokens=r.response_length, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                    min_p=r.min_p, n=r.n, stop=list(r.stop), seed=r.seed, ignore_eos=r.ignore_eos)
        return cls(**{**base, **overrides})

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
    @classmethod
    def from_config(cls, cfg, model_path: str | None = None) -> "RolloutEngine":
        """Build (or attach to) an engine for the hybridrl Config `cfg`; model_path overrides cfg.model.path."""

    async def generate(self, input_ids: list[int], sampling: SamplingParams,
                       request_id: str | None = None) -> list[GenerateOutput]:
        """`sampling.n` completions of one prompt. Many calls may be in flight; cancelling one aborts it."""

    async def update_weights(self, buckets: Iterable[Sequence[tuple[str, "object"]]], version: int) -> None:
        """Wake what is asleep, load the stream of (hf_name, tensor) buckets, flush caches; then serve `version`.

        All or nothing: a refused push raises and leaves the engine on its previous weights and version
        (or, where a backend cannot undo a partial stream, refusing to generate until a push succeeds)."""

    async def sleep(self, tags: Sequence[str] = TAGS) -> None:
        """Free memory: "kv_cache" drops the KV pool, "weights" frees the weights (the next push restores them)."""

    async def close(self) -> None:
        """Stop what the engine started (server processes, worker threads); idempotent."""


def engine_class(name: str):
    from hybridrl import HybridRLError
    if name not in ENGINES:
        raise HybridRLError(f"unknown rollout.name={name!r}: choose one of {sorted(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)
