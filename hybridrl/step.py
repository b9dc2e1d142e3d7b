"""One RL step, top to bottom: rollout → reward → reference/old log-probs → advantages → update → sync.

`rl_step` works with any rollout backend (native, sglang) and any trainer that offers
`log_probs`, `update`, `named_weights` (see hybridrl/trainer/actor.py), at any number of ranks:
each rank generates for its block of the prompts on its own engine, the samples are then regrouped
(whole prompt groups, balanced by tokens, `parallel.DP`), and the trainer's collectives do the rest.
With one rank every `ctx.dp` call is the identity. The engine sleeps
while the trainer works when `rollout.free_cache_engine` is on (colocated flow); the weight
push (`engine.update_weights`) wakes it in stages, so nothing here knows which backend runs.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from hybridrl import HybridRLError, algorithms as A
from hybridrl.config import Config
from hybridrl.parallel import DP
from hybridrl.rollout.agent import RolloutIncomplete, rollout
from hybridrl.rewards import score_samples
from hybridrl.rollout.base import SamplingParams
from hybridrl.sync import bucketize
from hybridrl.trainer.batch import collate
from hybridrl.types import Sample


@dataclass
class RLContext:
    """Everything one step needs; built once by train.py."""
    cfg: Config
    engine: Any                 # RolloutEngine
    actor: Any                  # Policy
    tokenizer: Any
    reward_fn: Any              # (data_source, text, ground_truth, extra_info) -> {"score": ...}
    ref: Any = None             # frozen Policy, when a KL term is used
    agent: Any = None           # (tools, MultiTurnConfig) when rollout.multi_turn.enable: every rollout is multi-turn
    critic: Any = None          # Critic, for gae
    kl_ctrl: Any = None
    dp: DP = field(default_factory=DP)   # this rank and the world (data parallel)
    version: int = 0            # weight version the engine serves
    timing: dict = field(default_factory=dict)

    @contextmanager
    def timer(self, name: str):
        t = time.perf_counter()
        yield
        self.timing[name] = self.timing.get(name, 0.0) + time.perf_counter() - t


async def rl_step(ctx: RLContext, prompts: list[Sample], step: int) -> dict:
    cfg, ctx.timing = ctx.cfg, {}
    T = cfg.rollout.temperature
    t0 = time.perf_counter()

    # 1. rollout: this rank's block of prompts, n samples each, all requests in flight; then the engine sleeps
    prompts, first = ctx.dp.shard(prompts)
    held_during_rollout = memory_gb()
    with ctx.timer("gen"):
        samples = await generate(ctx, prompts, SamplingParams.from_rollout(cfg.rollout), step, first)
        if cfg.algorithm.adv_estimator == "remax":
            await remax_baseline(ctx, prompts, samples, step, first)
    if cfg.rollout.free_cache_engine:
        with ctx.timer("sleep"):
            await ctx.engine.sleep(["kv_cache", "weights"])

    # 2. rewards, one score per sample; then every rank takes whole prompt groups, balanced by tokens
    with ctx.timer("reward"):
        score_samples(samples, ctx.reward_fn, cfg.reward.timeout_s)
        everyone = ctx.dp.gather(samples)
        samples = ctx.dp.balance(everyone)
    with ctx.timer("collate"):
        batch = collate(samples, pad_id=ctx.tokenizer.pad_token_id or 0)
    baseline = (torch.tensor([s.baseline for s in samples], dtype=torch.float32)
                if cfg.algorithm.adv_estimator == "remax" else None)
    mask = batch.response_mask

    # 3. reference log-probs (for a KL term)
    ref_logp = None
    if ctx.ref is not None:
        with ctx.timer("ref"):
            ref_logp, _ = ctx.ref.log_probs(batch, T, cfg.ref.log_prob_micro_batch_size_per_gpu)

    # 4. old log-probs: recomputed by the trainer, or the rollout's own when configured
    with ctx.timer("old_log_prob"):
        if cfg.rollout.use_rollout_log_probs and cfg.actor.tis_threshold <= 0:   # TIS needs both
            old_logp, entropy = batch.rollout_logp, torch.zeros_like(mask)
        else:
            old_logp, entropy = ctx.actor.log_probs(batch, T, cfg.rollout.log_prob_micro_batch_size_per_gpu,
                                                    with_entropy=True)

    # 5. advantages (KL in the reward first, values from the critic for gae)
    with ctx.timer("adv"):
        token_rewards, metrics = A.scores_to_token_rewards(batch.scores, mask), {}
        if cfg.algorithm.use_kl_in_reward and ref_logp is not None:
            token_rewards, kl_m = A.apply_kl_penalty(token_rewards, old_logp, ref_logp, mask,
                                                     ctx.kl_ctrl.value, cfg.algorithm.kl_penalty)
            ctx.kl_ctrl.update(kl_m["kl"], n_steps=batch.size)
            metrics.update({"actor/reward_kl_penalty": kl_m["kl"], "actor/kl_coef": ctx.kl_ctrl.value})
        values = ctx.critic.values(batch) if ctx.critic is not None else None
        adv, returns = A.compute_advantages(
            cfg.algorithm.adv_estimator, scores=batch.scores, group_ids=batch.group_ids, mask=mask,
            token_rewards=token_rewards, values=values, gamma=cfg.algorithm.gamma, lam=cfg.algorithm.lam,
            norm_adv_by_std_in_grpo=cfg.algorithm.norm_adv_by_std_in_grpo, baseline_scores=baseline)

    # 6. update: critic, then the actor (after the critic warm-up); mini-batches of whole prompts
    with ctx.timer("update"):
        if ctx.critic is not None:
            metrics.update(ctx.critic.update(batch, values, returns))
        if step > cfg.trainer.critic_warmup:
            metrics.update({f"actor/{k}": v for k, v in ctx.actor.update(batch, old_logp, adv, ref_logp, T).items()})

    # 7. weight sync: the engine serves the new policy under a new version
    with ctx.timer("sync"):
        await sync_weights(ctx)

    # 8. metrics: this rank's, averaged over ranks; rewards, lengths and staleness over all samples
    with ctx.timer("metrics"):
        metrics.update(step_metrics(samples, batch, old_logp, ref_logp, entropy, adv, cfg))
    metrics.update({f"timing/{k}": v for k, v in ctx.timing.items()})
    metrics["timing/step"] = time.perf_counter() - t0
    metrics["timing/other"] = metrics["timing/step"] - sum(ctx.timing.values())   # what no timer covers
    metrics.update(memory_metrics(held_during_rollout))
    metrics = ctx.dp.mean_metrics(metrics)
    metrics.update(sample_metrics(everyone))
    metrics.update(staleness_metrics(everyone, ctx.version - 1))   # rollout ran on the version before this sync
    n_tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in everyone)
    metrics["perf/tokens_per_s"] = n_tokens / metrics["timing/step"]
    metrics["perf/weight_version"] = ctx.version
    return metrics


class RolloutFailed(HybridRLError):
    """A rollout that restarts of its server could not finish; nothing was trained in that step."""


async def generate(ctx: RLContext, prompts: list[Sample], sampling: SamplingParams, step: int, first: int,
                   desc: str = "rollout", attempts: int = 3) -> list[Sample]:
    """rollout() that survives a rollout server restart: the finished prompts' samples are kept, the weights
    are pushed again (same version: the same weights), and only the lost prompts are sent again, with the
    same seeds. Every rank takes part in a re-push (the gathers are collectives), so all agree first."""
    if ctx.agent is not None:                           # tools: the multi-turn loop (no re-issue after a restart)
        from hybridrl.rollout.multiturn import multi_turn_rollout
        tools, mt = ctx.agent
        try:
            return await multi_turn_rollout(ctx.engine, prompts, sampling, ctx.tokenizer, tools, mt, step, first)
        except HybridRLError as e:
            raise RolloutFailed(f"the multi-turn rollout failed: {e}") from None
    done: list[Sample] = []
    todo = list(enumerate(prompts, first))
    for attempt in range(attempts + 1):
        try:
            done += await rollout(ctx.engine, [p for _, p in todo], sampling, ctx.tokenizer, step=step, desc=desc,
                                  progress=ctx.dp.is_main and attempt == 0, indices=[i for i, _ in todo])
            todo, why = [], ""
        except RolloutIncomplete as e:
            done, todo, why = done + e.samples, e.unfinished, str(e)
        except RolloutFailed:
            raise
        except HybridRLError as e:                      # a server gone for good, or a request it refused
            raise RolloutFailed(f"the rollout failed: {e}") from None
        if ctx.dp.sum(len(todo)) == 0:
            return sorted(done, key=lambda s: s.group)          # groups in prompt order, as without a restart
        if attempt == attempts:
            break
        buckets = bucketize(ctx.actor.named_weights(), ctx.cfg.rollout.update_weights_bucket_megabytes)
        await ctx.engine.update_weights(buckets, ctx.version)   # the restarted server gets the current weights
    raise RolloutFailed(f"the rollout could not finish after {attempts} server restarts ({why or 'another rank'}); "
                        "check the server log in the run folder")


async def remax_baseline(ctx: RLContext, prompts: list[Sample], samples: list[Sample], step: int,
                         first: int = 0) -> None:
    """ReMax: each prompt's greedy answer, scored, is the baseline of its samples (Sample.baseline)."""
    greedy = await generate(ctx, prompts, SamplingParams.from_rollout(ctx.cfg.rollout, temperature=0.0, n=1),
                            step, first, desc="remax baseline")
    score_samples(greedy, ctx.reward_fn, ctx.cfg.reward.timeout_s)
    by_group = {g.group: g.reward for g in greedy}
    for s in samples:
        s.baseline = by_group[s.group]


async def sync_weights(ctx: RLContext) -> None:
    """Push the actor's weights under a new version; the engine wakes, loads and flushes (see rollout/base.py).

    ctx.version is the one weight version on the trainer side; engines stamp it on their outputs and
    samples carry it (`Sample.weight_version`), which `staleness_metrics` reads."""
    if not ctx.actor.parameters_finite():
        raise HybridRLError("the actor's parameters are no longer finite (NaN or inf) after the update: "
                            "stopping before they reach the engine or an export; lower actor.lr or check the rewards")
    ctx.version += 1
    buckets = bucketize(ctx.actor.named_weights(), ctx.cfg.rollout.update_weights_bucket_megabytes)
    await ctx.engine.update_weights(buckets, ctx.version)


def memory_gb() -> float:
    """GPU memory this process's tensors hold now (GB); 0 without CUDA."""
    return torch.cuda.memory_allocated() / 1e9 if torch.cuda.is_available() and torch.cuda.is_initialized() else 0.0


def memory_metrics(held_during_rollout: float) -> dict:
    """perf/gpu_peak_gb: this process's peak in the step (then reset); perf/gpu_held_during_rollout_gb: what it
    held when generation began (the trainer's share with an sglang server; trainer + engine with native)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    peak = torch.cuda.max_memory_allocated() / 1e9
    torch.cuda.reset_peak_memory_stats()
    return {"perf/gpu_peak_gb": peak, "perf/gpu_held_during_rollout_gb": held_during_rollout,
            "perf/gpu_reserved_gb": torch.cuda.memory_reserved() / 1e9}


def staleness_metrics(samples: list[Sample], expected: int) -> dict:
    """How many samples came from weights older than the version the trainer last pushed (async needs it)."""
    stale = [expected - s.weight_version for s in samples if s.weight_version != expected]
    return {"rollout/stale_fraction": len(stale) / max(1, len(samples)),
            "rollout/staleness_max": float(max(stale, default=0))}


def reward_metrics(samples: list[Sample], prefix: str = "") -> dict:
    """Reward mean/std over all samples and per data_source, keys `{prefix}reward/...`."""
    groups = {"": samples} | {f"{src}/": [s for s in samples if s.data_source == src]
                              for src in sorted({s.data_source for s in samples})}
    m = {}
    for key, group in groups.items():
        r = torch.tensor([s.reward for s in group], dtype=torch.float32)
        m[f"{prefix}reward/{key}mean"] = float(r.mean())
        m[f"{prefix}reward/{key}std"] = float(r.std()) if len(r) > 1 else 0.0
    return m


def sample_metrics(samples: list[Sample]) -> dict:
    """Rewards and response lengths over every rank's samples (and the tool loop's counts when it ran)."""
    lengths = [len(s.response_ids) for s in samples]
    m = {"response_length/mean": sum(lengths) / len(lengths), "response_length/max": float(max(lengths)),
         "response_length/clip_ratio": sum(s.truncated for s in samples) / len(samples), **reward_metrics(samples)}
    if any("num_turns" in s.reward_extra for s in samples):
        from hybridrl.rollout.multiturn import tokenization_mismatch_rate
        for key in ("num_turns", "num_tool_calls", "num_tool_errors", "tool_reward"):
            m[f"multi_turn/{key}"] = sum(float(s.reward_extra.get(key, 0)) for s in samples) / len(samples)
        m["multi_turn/tokenization_mismatch"] = tokenization_mismatch_rate(samples)
        for status in sorted({s.finish_reason for s in samples}):
            m[f"multi_turn/finish_{status}"] = sum(s.finish_reason == status for s in samples) / len(samples)
    return m


def step_metrics(samples, batch, old_logp, ref_logp, entropy, adv, cfg) -> dict:
    mask, m = batch.response_mask, {}
    m["adv/mean"] = float(A.masked_mean(adv, mask)) if mask.any() else 0.0
    if ref_logp is not None:
        m["actor/ref_kl"] = float(A.masked_mean(A.kl_penalty(old_logp, ref_logp, "low_var_kl"), mask))
    if mask.any() and not (cfg.rollout.use_rollout_log_probs and cfg.actor.tis_threshold <= 0):
        m["actor/entropy_old"] = float(A.masked_mean(entropy, mask))
        m.update({f"rollout/{k}": v for k, v in
                  A.rollout_mismatch_metrics(old_logp, batch.rollout_logp, mask).items()})
    return m
