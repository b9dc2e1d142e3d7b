"""`hybridrl generate`: responses for a prompt file (verl's main_generation).

    hybridrl generate data.path=prompts.parquet data.n_samples=4 data.output_path=out.parquet model.path=MODEL
    hybridrl generate                       # embedded default: SmolLM2-135M-Instruct on 32 GSM8K prompts

Reads parquet / jsonl rows (verl layout, chat messages in `data.prompt_key`), applies the chat
template, generates `data.n_samples` responses per prompt with the rollout sampling settings on
the engine `rollout.name` picks, and writes the input columns plus `responses` (a list of strings
per row) and, where the row's data_source has a reward, `scores` (a list of floats per row).

The output path is checked before anything runs. Each finished prompt's row is appended to
`<output>.partial.jsonl` at once, so an interrupted run keeps what it made; the output itself is
written atomically at the end (temp file, then rename) and the partial file removed.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

from hybridrl import HybridRLError
from hybridrl.config import Config
from hybridrl.rollout.base import SamplingParams, engine_class

DEFAULT_PROMPTS = 32      # GSM8K test prompts in the embedded default


def default_data() -> str:
    """The GSM8K test split in verl's layout, written once under the cache dir."""
    from hybridrl.data import prepare_gsm8k
    from hybridrl.models import cache_dir

    path = cache_dir() / "data" / "gsm8k" / "test.parquet"
    return str(path) if path.exists() else prepare_gsm8k(path.parent)


def sampling_for(cfg: Config, seed: int) -> SamplingParams:
    return SamplingParams.from_rollout(cfg.rollout, n=cfg.data.n_samples, seed=seed)


async def generate_all(engine, samples, cfg: Config, on_done) -> list[list]:
    """All prompts, at most data.batch_size in flight; on_done(sample, outputs) after each prompt."""
    gate = asyncio.Semaphore(cfg.data.batch_size)

    async def one(s):
        async with gate:
            outs = await engine.generate(s.prompt_ids, sampling_for(cfg, cfg.rollout.seed + s.index))
        on_done(s, outs)
        return outs

    try:
        return await asyncio.gather(*[one(s) for s in samples])
    finally:
        await engine.close()


def has_reward(data_source: str, reward_cfg) -> bool:
    """A custom reward scores everything; the built-in ones know GSM8K and reasoning-gym sources."""
    return bool(reward_cfg.custom_path) or data_source in ("openai/gsm8k", "gsm8k") or \
        data_source.startswith("reasoning_gym/")


def check_output_path(path: str) -> Path:
    """Fail before generating, not after: the output must be a writable .parquet / .jsonl / .json file path."""
    from hybridrl.data import SUFFIXES

    out = Path(path)
    fix = "fix: set data.output_path to a file such as outputs/generations.parquet"
    if not path:
        raise HybridRLError(f"data.output_path is empty; {fix}")
    if out.is_dir():
        raise HybridRLError(f"data.output_path {path!r} is a directory, expected a file path; {fix}")
    if out.suffix.lower() not in SUFFIXES:
        raise HybridRLError(f"data.output_path {path} has suffix {out.suffix!r}; generate writes "
                            f"{', '.join(SUFFIXES)}; {fix}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.probe"):
            pass
    except OSError as e:
        raise HybridRLError(f"cannot write data.output_path {path}: cannot create or write in folder {out.parent} "
                            f"({e.strerror}); {fix}") from None
    return out


class PartialRows:
    """Rows appended to `<output>.partial.jsonl` as prompts finish (an older one is moved aside, not lost)."""

    def __init__(self, out: Path):
        self.path = out.with_name(out.name + ".partial.jsonl")
        if self.path.exists():
            aside = self.path.with_name(f"{self.path.name}.{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(self.path, aside)
            print(f"hybridrl generate: moved the partial results of an earlier run to {aside}", flush=True)
        self.fh = open(self.path, "w", encoding="utf-8")
        self.count = 0

    def add(self, row: dict) -> None:
        try:
            self.fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            self.fh.flush()
        except OSError as e:   # e.g. a full disk: stop now rather than generate what cannot be kept
            raise HybridRLError(f"cannot append to {self.path} ({e.strerror}); the {self.count} rows before "
                                "are in it; fix: free space or choose another data.output_path") from None
        self.count += 1

    def close(self, done: bool) -> None:
        self.fh.close()
        if done:
            self.path.unlink()
        else:
            print(f"hybridrl generate: stopped; the {self.count} prompts finished so far are in {self.path}",
                  flush=True)


def score_rows(samples, responses: list[list[str]], reward_cfg) -> list | None:
    """Scores per response for rows whose data_source has a reward (None for others); None when none has."""
    from hybridrl.rewards import load_reward_fn, score_calls

    scored = [i for i, s in enumerate(samples) if has_reward(s.data_source, reward_cfg)]
    calls = [(samples[i].data_source, t, samples[i].ground_truth, samples[i].extra_info)
             for i in scored for t in responses[i]]
    flat = iter(out["score"] for out in score_calls(calls, load_reward_fn(reward_cfg), reward_cfg.timeout_s))
    scores: list = [None] * len(samples)
    for i in scored:
        scores[i] = [next(flat) for _ in responses[i]]
    return scores if scored else None


def generate(cfg: Config) -> str:
    """Generate responses for cfg.data.path; write cfg.data.output_path (parquet); return its path."""
    from tqdm import tqdm

    from hybridrl.data import load_prompts, read_rows, write_rows
    from hybridrl.models import check_model_dir, default_model_path, load_tokenizer

    out = check_output_path(cfg.data.output_path)
    model_path = cfg.model.path or default_model_path()
    check_model_dir(model_path, cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(cfg.model.tokenizer_path or model_path)
    data_path = cfg.data.path or default_data()
    limit = cfg.data.max_samples if cfg.data.path else DEFAULT_PROMPTS
    samples = load_prompts([data_path], tokenizer, cfg.data.max_prompt_length, cfg.data.prompt_key, limit)
    rows = read_rows(data_path)
    # never more sequences in flight than batch_size x n_samples: size the engine for that
    seats = min(cfg.rollout.max_num_seqs, cfg.data.batch_size * cfg.data.n_samples)
    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(
        cfg.rollout, max_num_seqs=max(seats, cfg.data.n_samples)))
    engine = engine_class(cfg.rollout.name).from_config(cfg, model_path=model_path)

    bar = tqdm(total=len(samples), unit="prompt", desc="generate", dynamic_ncols=True)
    t0, tokens = time.perf_counter(), 0
    partial, done = PartialRows(out), False

    def decode(outs) -> list[str]:
        return [tokenizer.decode(o.output_ids, skip_special_tokens=True) for o in outs]

    def on_done(s, outs):
        nonlocal tokens
        partial.add(dict(rows[s.index], responses=decode(outs)))
        tokens += sum(o.completion_tokens for o in outs)
        bar.set_postfix_str(f"{tokens / (time.perf_counter() - t0):.0f} tok/s", refresh=False)
        bar.update(1)

    try:
        results = asyncio.run(generate_all(engine, samples, cfg, on_done))
        bar.close()
        seconds = time.perf_counter() - t0
        responses = [decode(outs) for outs in results]
        out_rows = [dict(rows[s.index], responses=texts) for s, texts in zip(samples, responses)]
        scores = score_rows(samples, responses, cfg.reward)
        if scores is not None:
            for row, sc in zip(out_rows, scores):
                row["scores"] = sc
        path = write_rows(out_rows, str(out))   # atomic: temp file, then rename
        done = True
    finally:
        partial.close(done)
    n_resp = sum(len(r) for r in responses)
    print(f"hybridrl generate: {len(samples)} prompts x {cfg.data.n_samples} = {n_resp} responses, {tokens} tokens "
          f"in {seconds:.1f} s ({tokens / seconds:.0f} tok/s, {len(samples) / seconds:.2f} prompts/s)"
          + (f", mean score {_mean(scores):.3f}" if scores is not None else "") + f" -> {path}", flush=True)
    return path


def _mean(scores: list) -> float:
    flat = [x for row in scores if row is not None for x in row]
    return sum(flat) / max(1, len(flat))
