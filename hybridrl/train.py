"""`hybridrl train`: build data, engine and trainer, loop over `rl_step`, validate, checkpoint, plot.

    hybridrl train                                   # the embedded default: GRPO on SmolLM2-135M, CPU-sized
    hybridrl train algorithm.adv_estimator=gae ...   # PPO with a critic
    python -m hybridrl.main_ppo data.train_files=... actor_rollout_ref.rollout.name=sglang ...
"""
from __future__ import annotations

import asyncio
import os
import random
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hybridrl import HybridRLError, algorithms as A
from hybridrl import checkpoint as ckpt
from hybridrl.config import Config
from hybridrl.rollout.base import SamplingParams, engine_class
from hybridrl.rewards import score_samples
from hybridrl.step import RLContext, generate, reward_metrics, rl_step, sync_weights
from hybridrl.tracking import Tracker, plot_run
from hybridrl.types import Sample


class PromptLoader:
    """Epochs over the prompts in batches; its position is part of a checkpoint."""

    def __init__(self, prompts: list[Sample], batch_size: int, shuffle: bool, seed: int):
        if len(prompts) < batch_size:
            raise HybridRLError(f"only {len(prompts)} training prompts for data.train_batch_size={batch_size}: "
                                "lower data.train_batch_size or add data")
        self.prompts, self.batch_size, self.shuffle, self.seed = prompts, batch_size, shuffle, seed
        self.epoch, self.pos = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.prompts) // self.batch_size

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.prompts)))
        return torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def next(self) -> list[Sample]:
        if self.pos + self.batch_size > len(self.prompts):
            self.epoch, self.pos = self.epoch + 1, 0
        idx = self._order()[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return [self.prompts[i] for i in idx]

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, s: dict) -> None:
        self.epoch, self.pos = s["epoch"], s["pos"]


def train(cfg: Config) -> dict:
    """Run training; returns the paths of the run folder, metrics, plot, last checkpoint and export.

    More than one rank (trainer.n_gpus_per_node x trainer.nnodes) and not yet inside a launched rank: start
    them (hybridrl/launch.py: torch's elastic launcher on one node, Ray on several) and return rank 0's result."""
    from hybridrl import launch
    if launch.under_launcher():
        launch.check_world(cfg)
    elif launch.world_size(cfg) > 1:
        if cfg.trainer.nnodes > 1:
            from hybridrl.ray_launch import launch_on_ray
            return launch_on_ray(cfg)
        return launch.launch_local(cfg)
    return asyncio.run(train_async(cfg))


async def train_async(cfg: Config) -> dict:
    run_dir = Path(cfg.trainer.default_local_dir)
    if int(os.environ.get("RANK", "0")) != 0:   # a torchrun / Ray rank other than 0: rank 0 holds the lock
        return await run(cfg, run_dir)
    ckpt.check_writable(run_dir)
    with ckpt.run_lock(run_dir):           # one run per folder: a second one is refused, naming this PID
        return await run(cfg, run_dir)


async def run(cfg: Config, run_dir: Path) -> dict:
    from hybridrl.devices import resolve_device
    from hybridrl.parallel import DP
    from hybridrl.trainer.actor import Critic, Policy
    from hybridrl.trainer.fsdp import init_process_group_if_needed
    seed_everything(cfg.trainer.seed)
    model_path, tokenizer, train_prompts, val_prompts = load_inputs(cfg)
    device, norm_len = resolve_device(cfg.trainer.device), cfg.rollout.response_length
    init_process_group_if_needed(device)        # torchrun's / Ray's world, or a world of 1
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    dp = DP.current()
    actor = Policy(model_path, cfg.model, cfg.actor, device, norm_len)
    needs_ref = cfg.actor.use_kl_loss or cfg.algorithm.use_kl_in_reward
    ref = (Policy(model_path, cfg.model, cfg.actor, device, norm_len, trainable=False, offload=cfg.ref.param_offload)
           if needs_ref else None)
    critic = (Critic(cfg.critic.model_path or model_path, cfg.model, cfg.critic, device, norm_len,
                     cfg.actor.loss_agg_mode, cfg.actor.ppo_mini_batch_size, cfg.actor.max_nan_steps)
              if cfg.algorithm.adv_estimator == "gae" else None)
    from hybridrl.rewards import load_reward_fn
    ctx = RLContext(cfg, None, actor, tokenizer, load_reward_fn(cfg.reward), ref=ref, critic=critic,
                    kl_ctrl=make_kl_ctrl(cfg), dp=dp)
    loader = PromptLoader(train_prompts, cfg.data.train_batch_size, cfg.data.shuffle, cfg.data.seed)
    total = total_steps(cfg, loader)
    start = resume(cfg, run_dir, ctx, loader)
    if start == 0 and ckpt.list_checkpoints(run_dir):
        raise HybridRLError(f"{run_dir} holds checkpoints of an earlier run but resume is off "
                            f"(trainer.resume_mode={cfg.trainer.resume_mode}): use a new trainer.experiment_name "
                            "or trainer.default_local_dir, or trainer.resume_mode=auto to continue it")
    ctx.engine = engine_class(cfg.rollout.name).from_config(cfg, model_path=model_path)   # one per rank
    tracker, last_ckpt = None, None
    try:
        if dp.is_main:                                # rank 0 writes the logs
            tracker = Tracker(cfg.trainer.logger, run_dir, asdict(cfg), cfg.trainer.project_name,
                              cfg.trainer.experiment_name, resume_step=start)
        log = tracker.log if tracker is not None else (lambda metrics, step: None)
        await sync_weights(ctx)                       # the engine may start from dummy weights
        if cfg.trainer.val_before_train and start == 0 and val_prompts:
            log(await validate(ctx, val_prompts), 0)
        for step in tqdm(range(start + 1, total + 1), desc="train", unit="step", initial=start, total=total,
                         disable=not dp.is_main):
            metrics = await rl_step(ctx, loader.next(), step)
            if dp.is_main:
                warn_step(metrics, step, cfg.algorithm.adv_estimator)
            last = step == total
            if val_prompts and ((cfg.trainer.test_freq > 0 and step % cfg.trainer.test_freq == 0) or last):
                metrics.update(await validate(ctx, val_prompts))
            log(metrics, step)
            if (cfg.trainer.save_freq > 0 and step % cfg.trainer.save_freq == 0) or last:
                last_ckpt = save_checkpoint(cfg, run_dir, step, ctx, loader)
    finally:
        try:
            await ctx.engine.close()
        finally:
            if tracker is not None:
                tracker.close()
    return finish(run_dir, ctx, last_ckpt)


def load_inputs(cfg: Config):
    from hybridrl.data import load_prompts
    from hybridrl.models import default_model_path, load_tokenizer
    model_path = cfg.model.path or default_model_path()
    tokenizer = load_tokenizer(cfg.model.tokenizer_path or model_path)
    train_files, val_files = list(cfg.data.train_files), list(cfg.data.val_files)
    if not train_files:
        train_files, val_files = default_task_files(val_files)
    kw = dict(tokenizer=tokenizer, max_prompt_length=cfg.data.max_prompt_length, prompt_key=cfg.data.prompt_key)
    train_prompts = load_prompts(train_files, max_samples=cfg.data.max_samples, **kw)
    val_prompts = load_prompts(val_files, **kw) if val_files else []
    return model_path, tokenizer, train_prompts, val_prompts


def default_task_files(val_files: list[str]) -> tuple[list[str], list[str]]:
    """The embedded default task, generated once into the cache (see docs/default_run.md)."""
    from hybridrl.data import prepare_reasoning_gym
    from hybridrl.models import cache_dir
    out = cache_dir() / "data" / "default_task"
    paths = prepare_reasoning_gym(**DEFAULT_TASK, out_dir=str(out))
    return [paths["train"]], val_files or [paths["val"]]


DEFAULT_TASK = dict(task="basic_arithmetic", size=128, seed=0, val_size=64,
                    min_terms=2, max_terms=2, min_digits=1, max_digits=1, operators=("+", "-"))


def total_steps(cfg: Config, loader: PromptLoader) -> int:
    if cfg.trainer.total_training_steps > 0:
        return cfg.trainer.total_training_steps
    return loader.steps_per_epoch * cfg.trainer.total_epochs


def make_kl_ctrl(cfg: Config):
    a = cfg.algorithm
    if a.kl_ctrl_type == "adaptive":
        return A.AdaptiveKLController(a.kl_coef, a.target_kl, a.kl_horizon)
    return A.FixedKLController(a.kl_coef)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


async def validate(ctx: RLContext, prompts: list[Sample]) -> dict:
    v = ctx.cfg.rollout.val_kwargs
    sp = SamplingParams.from_rollout(ctx.cfg.rollout, temperature=v.temperature if v.do_sample else 0.0,
                                     top_k=v.top_k, top_p=v.top_p, min_p=0.0, n=v.n if v.do_sample else 1,
                                     ignore_eos=False)
    samples, size = [], ctx.cfg.data.val_batch_size
    mine, first = ctx.dp.shard(prompts)         # each rank validates its block on its own engine
    per_rank = -(-len(prompts) // ctx.dp.world)
    for i in range(0, per_rank, size):          # at most val_batch_size prompts in flight; as many calls per rank
        samples += await generate(ctx, mine[i:i + size], sp, step=-1, first=first + i, desc="validate")
    score_samples(samples, ctx.reward_fn, ctx.cfg.reward.timeout_s)
    samples = ctx.dp.gather(samples)
    m = reward_metrics(samples, prefix="val/")
    m["val/response_length/mean"] = sum(len(s.response_ids) for s in samples) / len(samples)
    return m


def warn_step(metrics: dict, step: int, estimator: str = "grpo") -> None:
    if metrics.get("response_length/clip_ratio", 0) >= 1.0:
        tqdm.write(f"warning: step {step}: every response hit rollout.response_length; rewards may all be "
                   "zero. Raise rollout.response_length or ask for shorter answers.")
    if metrics.get("reward/std", 1.0) == 0.0 and estimator != "gae":   # with a critic, values still differ
        tqdm.write(f"warning: step {step}: all rewards equal ({metrics.get('reward/mean'):.3g}), so every "
                   "advantage is zero and the policy did not move this step.")


def resume(cfg: Config, run_dir: Path, ctx: RLContext, loader: PromptLoader) -> int:
    path = ckpt.find_resume_path(run_dir, cfg.trainer.resume_mode, cfg.trainer.resume_from_path)
    if path is None:
        return 0
    trainer_state, state = ckpt.load(path)
    sharded = ckpt.load_sharded(path, sharded_state(ctx))
    ctx.actor.load_state_dict(trainer_state["actor"])
    ctx.actor.load_sharded_state(sharded["actor"])
    if ctx.critic is not None and trainer_state.get("critic"):
        ctx.critic.load_state_dict(trainer_state["critic"])
        ctx.critic.load_sharded_state(sharded["critic"])
    if trainer_state.get("kl_coef") is not None:
        ctx.kl_ctrl.value = trainer_state["kl_coef"]
    loader.load(state["loader"])
    ctx.version = state.get("weight_version", 1) - 1   # the start-up push re-sends this version
    print(f"resumed from {path} (step {state['step']})")
    return state["step"]


def sharded_state(ctx: RLContext) -> dict:
    """This rank's shards of everything trained: {"actor": {model, optim}, "critic": ...} (DCP layout)."""
    out = {"actor": ctx.actor.sharded_state()}
    if ctx.critic is not None:
        out["critic"] = ctx.critic.sharded_state()
    return out


def save_checkpoint(cfg: Config, run_dir: Path, step: int, ctx: RLContext, loader: PromptLoader) -> Path:
    trainer_state = {"actor": ctx.actor.state_dict(), "kl_coef": ctx.kl_ctrl.value,
                     "critic": ctx.critic.state_dict() if ctx.critic is not None else None}
    state = {"loader": loader.state(), "weight_version": ctx.version, "sharded": True, "world_size": ctx.dp.world}
    def hf_files(folder: Path) -> None:     # what `hybridrl merge` needs beside the shards
        ctx.actor.model.config.save_pretrained(folder / "hf")
        ctx.tokenizer.save_pretrained(folder / "hf")

    return ckpt.save(run_dir, step, trainer_state, state, keep=cfg.trainer.max_actor_ckpt_to_keep,
                     sharded=sharded_state(ctx), dp=ctx.dp, write_files=hf_files)


def finish(run_dir: Path, ctx: RLContext, last_ckpt: Path | None) -> dict:
    """Export the actor and draw the plot; a failure here is reported, never fatal (the checkpoint is saved).
    The export gathers the weights on every rank (collective); rank 0 writes them and the plot."""
    out = {"run_dir": str(run_dir), "metrics": str(run_dir / "metrics.jsonl"), "checkpoint": str(last_ckpt)}
    weights = {name: t.cpu() for name, t in ctx.actor.named_weights()}   # every rank takes part in the gathers
    if not ctx.dp.is_main:
        return out
    for key, make in (("export", lambda: ckpt.export_hf(weights, ctx.actor.model.config, ctx.tokenizer,
                                                        run_dir / "actor_hf")),
                      ("plot", lambda: plot_run(run_dir / "metrics.jsonl", run_dir / "reward_curve.png"))):
        try:
            out[key] = str(make())
        except Exception as e:  # noqa: BLE001 - the run is done; say what is missing and go on
            out[key] = None
            tqdm.write(f"warning: {key} failed ({type(e).__name__}: {e}); the checkpoint at {last_ckpt} is intact")
    print("\n".join(f"{k:>10}: {v}" for k, v in out.items()))
    return out
