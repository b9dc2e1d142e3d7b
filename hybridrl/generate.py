"""`hybridrl generate`: responses for a prompt file (verl's main_generation).

    hybridrl generate data.path=prompts.parquet data.n_samples=4 data.output_path=out.parquet model.path=MODEL
    hybridrl generate                       # embedded default: SmolLM2-135M-Instruct on 32 GSM8K prompts

Reads parquet / jsonl rows (verl layout, chat messages in `data.prompt_key`), applies the chat
template, generates `data.n_samples` responses per prompt with the rollout sampling settings on
the engine `rollout.name` picks, and writes the input columns plus `responses` (a list of strings
per row) and, where the row's data_source has a reward, `scores` (a list of floats per row).
"""
from __future__ import annotations

import asyncio
import dataclasses
import time

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
    r = cfg.rollout
    return SamplingParams(max_new_tokens=r.response_length, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                          min_p=r.min_p, n=cfg.data.n_samples, stop=list(r.stop), seed=seed)


async def generate_all(engine, samples, cfg: Config, on_done) -> list[list]:
    """All prompts, at most data.batch_size in flight; on_done(outputs) after each prompt."""
    gate = asyncio.Semaphore(cfg.data.batch_size)

    async def one(s):
        async with gate:
            outs = await engine.generate(s.prompt_ids, sampling_for(cfg, cfg.rollout.seed + s.index))
        on_done(outs)
        return outs

    try:
        return await asyncio.gather(*[one(s) for s in samples])
    finally:
        await engine.close()


def has_reward(data_source: str, reward_cfg) -> bool:
    """A custom reward scores everything; the built-in ones know GSM8K and reasoning-gym sources."""
    return bool(reward_cfg.custom_path) or data_source in ("openai/gsm8k", "gsm8k") or \
        data_source.startswith("reasoning_gym/")


def score_rows(samples, responses: list[list[str]], reward_cfg) -> list | None:
    """Scores per response for rows whose data_source has a reward (None for others); None when none has."""
    from hybridrl.rewards import load_reward_fn

    fn = load_reward_fn(reward_cfg)
    scores = [[fn(s.data_source, t, s.ground_truth, s.extra_info)["score"] for t in texts]
              if has_reward(s.data_source, reward_cfg) else None for s, texts in zip(samples, responses)]
    return scores if any(x is not None for x in scores) else None


def generate(cfg: Config) -> str:
    """Generate responses for cfg.data.path; write cfg.data.output_path (parquet); return its path."""
    from tqdm import tqdm

    from hybridrl.data import load_prompts, read_rows, write_rows
    from hybridrl.models import default_model_path, load_tokenizer

    model_path = cfg.model.path or default_model_path()
    tokenizer = load_tokenizer(cfg.model.tokenizer_path or model_path)
    data_path = cfg.data.path or default_data()
    limit = cfg.data.max_samples if cfg.data.path else DEFAULT_PROMPTS
    samples = load_prompts([data_path], tokenizer, cfg.data.max_prompt_length, cfg.data.prompt_key, limit)
    rows = read_rows(data_path)
    # never more sequences in flight than batch_size x n_samples: size the engine for that
    seats = min(cfg.rollout.max_num_seqs, cfg.data.batch_size * cfg.data.n_samples)
    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(
        cfg.rollout, max_num_seqs=max(seats, cfg.data.n_samples), prompt_length=cfg.data.max_prompt_length))
    engine = engine_class(cfg.rollout.name).from_config(cfg, model_path=model_path)

    bar = tqdm(total=len(samples), unit="prompt", desc="generate", dynamic_ncols=True)
    t0, tokens = time.perf_counter(), 0

    def on_done(outs):
        nonlocal tokens
        tokens += sum(o.completion_tokens for o in outs)
        bar.set_postfix_str(f"{tokens / (time.perf_counter() - t0):.0f} tok/s", refresh=False)
        bar.update(1)

    results = asyncio.run(generate_all(engine, samples, cfg, on_done))
    bar.close()
    seconds = time.perf_counter() - t0
    responses = [[tokenizer.decode(o.output_ids, skip_special_tokens=True) for o in outs] for outs in results]
    out_rows = [dict(rows[s.index], responses=texts) for s, texts in zip(samples, responses)]
    scores = score_rows(samples, responses, cfg.reward)
    if scores is not None:
        for row, sc in zip(out_rows, scores):
            row["scores"] = sc
    path = write_rows(out_rows, cfg.data.output_path)
    n_resp = sum(len(r) for r in responses)
    print(f"hybridrl generate: {len(samples)} prompts x {cfg.data.n_samples} = {n_resp} responses, {tokens} tokens "
          f"in {seconds:.1f} s ({tokens / seconds:.0f} tok/s, {len(samples) / seconds:.2f} prompts/s)"
          + (f", mean score {_mean(scores):.3f}" if scores is not None else "") + f" -> {path}", flush=True)
    return path


def _mean(scores: list) -> float:
    flat = [x for row in scores if row is not None for x in row]
    return sum(flat) / max(1, len(flat))
