"""Rollout in token space: every prompt goes to the engine as its own request, all in flight at once.

    samples = await rollout(engine, prompts, sampling, tokenizer)   # len = len(prompts) * sampling.n

No batch barrier: each request finishes on its own, and a progress bar counts completions.
Multi-turn agent loops (tools, interactions) build on the same `Sample.append`.
"""
from __future__ import annotations

import asyncio
import copy
from dataclasses import replace

from tqdm.auto import tqdm

from hybridrl import HybridRLError
from hybridrl.rollout.base import EngineRestarted, GenerateOutput, RolloutEngine, SamplingParams
from hybridrl.types import Sample


def request_seed(base: int, step: int, index: int) -> int:
    """A per-request seed, so sampling does not depend on scheduling order (reproducible resume)."""
    return (base * 1_000_003 + step * 10_007 + index) % (2**31 - 1)


class RolloutIncomplete(HybridRLError):
    """The engine restarted during a rollout: `samples` are the finished prompts' samples (whole groups),
    `unfinished` the (number, prompt) pairs to send again once the engine has its weights back."""

    def __init__(self, samples: list[Sample], unfinished: list[tuple[int, Sample]], why: str):
        super().__init__(f"{len(unfinished)} prompts lost to a rollout server restart: {why.splitlines()[0]}")
        self.samples, self.unfinished = samples, unfinished


async def rollout(engine: RolloutEngine, prompts: list[Sample], sampling: SamplingParams, tokenizer=None,
                  step: int = 0, desc: str = "rollout", progress: bool = True, first: int = 0,
                  indices: list[int] | None = None) -> list[Sample]:
    """Generate `sampling.n` completions per prompt; returns samples grouped by prompt (group = prompt #).

    first: the global number of prompts[0] (a data-parallel rank's share starts there), so group ids and
    sampling seeds do not depend on how the batch is split over ranks; `indices` gives each prompt's number
    explicitly instead (a re-issue after a restart). An engine restart (EngineRestarted) loses only the
    prompts whose requests it cut: the others finish, then RolloutIncomplete says which to send again."""
    bar = tqdm(total=len(prompts) * sampling.n, desc=desc, unit="seq", disable=not progress, leave=False)

    lost: list[tuple[int, Sample]] = []
    why = [""]

    async def one(i: int, prompt: Sample) -> list[Sample]:
        sp = replace(sampling, seed=None if sampling.seed is None else request_seed(sampling.seed, step, i))
        try:
            outs = await engine.generate(prompt.prompt_ids, sp, request_id=f"s{step}-p{i}")
        except EngineRestarted as e:
            lost.append((i, prompt))
            why[0] = str(e)
            return []
        bar.update(len(outs))
        return [to_sample(prompt, i, out, tokenizer) for out in outs]

    numbers = indices if indices is not None else [first + i for i in range(len(prompts))]
    tasks = [asyncio.ensure_future(one(i, p)) for i, p in zip(numbers, prompts)]
    try:
        groups = await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:                 # one failed: stop the others (cancelling aborts them on the engine)
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        bar.close()
    samples = [s for g in groups for s in g]
    if lost:
        raise RolloutIncomplete(samples, sorted(lost, key=lambda x: x[0]), why[0])
    return samples


def to_sample(prompt: Sample, group: int, out: GenerateOutput, tokenizer) -> Sample:
    s = copy.copy(prompt)
    s.group, s.response_ids, s.loss_mask, s.rollout_logprobs = group, [], [], []
    s.append(out.output_ids, out.logprobs, trainable=True)
    s.finish_reason, s.weight_version = out.finish_reason, out.weight_version
    if tokenizer is not None:
        s.response_text = tokenizer.decode(out.output_ids, skip_special_tokens=True)
    return s
