"""Test doubles for the sglang client tests: a tiny fake engine and flaky/broken HTTP servers.

`FakeEngine` implements the RolloutEngine protocol with a one-tensor "model": the next token is
argmax/sample of `w[last_token]`, so a weight push visibly changes outputs. `make(cfg)` is the
`--engine-factory` hook for `python -m hybridrl.rollout.native.server`.
"""
from __future__ import annotations

import asyncio

import torch

from hybridrl import HybridRLError
from hybridrl.rollout.base import GenerateOutput

VOCAB = 32


class FakeEngine:
    def __init__(self, seed: int = 0, step_delay: float = 0.0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(VOCAB, VOCAB, generator=g)
        self.weight_version = 0
        self.step_delay = step_delay
        self.asleep: set[str] = set()
        self.aborted: set[str] = set()
        self.abort_all = 0
        self.flushes = 0

    async def generate(self, input_ids, sampling, request_id=None):
        if "weights" in self.asleep:
            raise HybridRLError("engine asleep: wake it first")
        epoch = self.abort_all
        outs = []
        for k in range(sampling.n):
            g = torch.Generator().manual_seed((sampling.seed or 0) + k)
            ids, lps, reason, last = [], [], "length", input_ids[-1]
            for _ in range(sampling.max_new_tokens):
                await asyncio.sleep(self.step_delay)
                if request_id in self.aborted or self.abort_all != epoch:
                    reason = "abort"
                    break
                logits = self.w[last % VOCAB] / max(sampling.temperature, 1e-5)
                logp = torch.log_softmax(logits, -1)
                tok = int(logp.argmax()) if sampling.temperature == 0 else int(torch.multinomial(logp.exp(), 1, generator=g))
                ids.append(tok)
                lps.append(float(logp[tok]))
                last = tok
                if tok in sampling.stop_token_ids:
                    reason = "stop"
                    break
            outs.append(GenerateOutput(ids, lps, reason, len(input_ids), len(ids), self.weight_version))
        return outs

    async def update_weights(self, buckets, version):
        for bucket in buckets:
            for name, t in bucket:
                if name != "w":
                    raise HybridRLError(f"unknown weight name {name!r}: this model has only 'w'")
                if tuple(t.shape) != tuple(self.w.shape):
                    raise HybridRLError(f"weight 'w' has shape {tuple(self.w.shape)}, got {tuple(t.shape)}")
                self.w = t.float().clone()
        self.weight_version = version

    async def sleep(self, tags=("weights", "kv_cache")):
        self.asleep.update(tags)

    async def wake(self, tags=("weights", "kv_cache")):
        self.asleep.difference_update(tags)

    async def flush_cache(self):
        self.flushes += 1

    async def abort(self, request_id=None):
        if request_id is None:
            self.abort_all += 1
        else:
            self.aborted.add(request_id)

    async def close(self):
        pass


def make(cfg):
    """--engine-factory hook: a slow-ish fake engine so abort and mid-request deaths can be observed."""
    return FakeEngine(seed=cfg.rollout.seed, step_delay=0.01)
