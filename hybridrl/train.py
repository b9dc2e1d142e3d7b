"""`hybridrl train`: build data, engine and trainer, loop over `rl_step`, validate, checkpoint, plot.

    hybridrl train                                   # the embedded default: GRPO on SmolLM2-135M, CPU-sized
    hybridrl train algorithm.adv_estimator=gae ...   # PPO with a critic
    python -m hybridrl.main_ppo data.train_files=... actor_rollout_ref.rollout.name=sglang ...

Ctrl-C (SIGINT) or SIGTERM stops gracefully: the step in progress finishes, a checkpoint is saved, the process
exits with 130 / 143 and says how to resume; a second signal stops at once (see `GracefulStop`).
"""
from __future__ import annotations

import asyncio
import os
import random
import shlex
import signal
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hybridrl import HybridRLError, algorithms as A
from hybridrl import checkpoint as ckpt
from hybridrl.config import Config
from hybridrl.rollout.base import SamplingParams, engine_class
from hybridrl.rewards import score_samples
from hybridrl.step import RLContext, RolloutFailed, generate, reward_metrics, rl_step, sync_weights
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


class Stopped(SystemExit):
    """Training stopped on a signal after saving a checkpoint. Its exit code is 128 + the signal: 130 for SIGINT,
    143 for SIGTERM. A SystemExit (not a KeyboardInterrupt) so that `hybridrl train` (cli.main, which turns only
    HybridRLError and KeyboardInterrupt into codes) ends with that code and no traceback, as argparse's errors do."""

    def __init__(self, signum: int, step: int | None, checkpoint: str | None):
        super().__init__(128 + int(signum))
        self.signum, self.step, self.checkpoint = int(signum), step, checkpoint

    def __str__(self) -> str:
        return f"stopped on {signal.Signals(self.signum).name} after step {self.step}; checkpoint {self.checkpoint}"


_TERM_VOTE = 2 ** 20      # a rank's vote at the safe point: 0 go on, 1 stop (SIGINT), _TERM_VOTE stop (SIGTERM)


class GracefulStop:
    """The first SIGINT / SIGTERM during the training loop asks to stop: the step in progress finishes, and at the
    safe point after its metrics are logged `agreed()` (a collective: every rank stops at the same step) says to
    save a checkpoint and stop. A second signal raises KeyboardInterrupt at once (checkpoints are written to a
    temporary folder and renamed, so an interrupted save leaves only a `.tmp_*` folder that resume ignores).

    requests: the signals handled -> the stop they ask for (SIGINT or SIGTERM). In a process of its own that is
    {SIGINT: SIGINT, SIGTERM: SIGTERM}. In a rank started by `hybridrl train trainer.n_gpus_per_node=N`
    (launch.launch_local) the launcher handles SIGINT/SIGTERM and forwards the first one as SIGUSR1 (SIGINT) or
    SIGUSR2 (SIGTERM); the rank ignores a SIGINT of its own while the launcher lives (Ctrl-C in a terminal reaches
    every process of the group, and the launcher forwards it), and keeps SIGTERM's default action, which is how
    the launcher stops ranks at once (a second signal, or another rank's failure).
    ready_file: written with this process's id once the handlers are in place (the launcher forwards only to ranks
    that wrote it), removed before they are taken down.
    enabled=False: no handlers and no collective (ranks of torchrun or Ray: their launcher's own handling applies).
    Handlers are installed only in the main thread and `restore()` puts back the previous ones."""

    def __init__(self, requests: dict | None = None, ready_file: Path | None = None, ignore_sigint: bool = False,
                 enabled: bool = True):
        self.requests = dict(requests or {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM})
        self.ready_file, self.ignore_sigint, self.enabled = ready_file, ignore_sigint, enabled
        self.signum: int | None = None       # the stop asked for on this rank
        self.interrupted = False             # a second signal came: stopping at once
        self.step: int | None = None         # the step in progress
        self.verbose, self._saved, self._ppid = True, {}, None

    @classmethod
    def for_this_process(cls) -> "GracefulStop":
        """SIGINT/SIGTERM handled here, unless a launcher we did not start (torchrun, Ray) runs this rank."""
        from hybridrl import launch
        return cls(enabled=not launch.under_launcher())

    @classmethod
    def for_launched_rank(cls, ready_file: Path) -> "GracefulStop":
        return cls({signal.SIGUSR1: signal.SIGINT, signal.SIGUSR2: signal.SIGTERM}, ready_file, ignore_sigint=True)

    def install(self, verbose: bool = True) -> None:
        self.verbose = verbose
        if not self.enabled or self._saved or threading.current_thread() is not threading.main_thread():
            return
        self._ppid = os.getppid()
        for sig in self.requests:
            self._saved[sig] = signal.signal(sig, self._handle)
        if self.ignore_sigint:
            self._saved[signal.SIGINT] = signal.signal(signal.SIGINT, self._sigint_in_rank)
        if self.ready_file is not None:
            tmp = self.ready_file.with_name(self.ready_file.name + ".tmp")
            tmp.write_text(str(os.getpid()))
            os.replace(tmp, self.ready_file)

    def restore(self) -> None:
        """Put the previous handlers back (idempotent). A launched rank ignores SIGUSR1/2 from then on: it is about
        to exit, and a late forward must not kill it."""
        if not self._saved:
            return
        if self.ready_file is not None:
            self.ready_file.unlink(missing_ok=True)
        for sig, old in self._saved.items():
            launched = self.ready_file is not None and sig in self.requests and old in (signal.SIG_DFL, None)
            signal.signal(sig, signal.SIG_IGN if launched else (old if old is not None else signal.SIG_DFL))
        self._saved = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self.interrupted = True
            raise KeyboardInterrupt(f"second signal ({signal.Signals(signum).name}): stopping at once")
        self.signum = self.requests[signum]
        if self.verbose:
            _say(f"\nhybridrl: stopping after step {self.step} (a checkpoint is being saved); "
                 "press Ctrl-C again to stop at once\n")

    def _sigint_in_rank(self, signum, frame) -> None:
        if os.getppid() == self._ppid:
            return                  # the launcher got this Ctrl-C too, and forwards it as SIGUSR1
        raise KeyboardInterrupt("the launcher is gone")

    def agreed(self, dp) -> int | None:
        """At the safe point, on every rank (collective when dp.world > 1): the signal to stop on, or None.
        Any rank that was asked stops them all; SIGTERM wins over SIGINT."""
        if not self.enabled:
            return None
        mine = {None: 0, signal.SIGINT: 1}.get(self.signum, _TERM_VOTE)
        votes = dp.sum(mine)
        if votes <= 0:
            return None
        return signal.SIGTERM if votes >= _TERM_VOTE else signal.SIGINT


def _say(text: str) -> None:
    """Write from a signal handler: straight to the file descriptor (a buffered write could be re-entered)."""
    try:
        os.write(sys.stderr.fileno(), text.encode())
    except (OSError, ValueError, AttributeError):
        try:
            sys.stderr.write(text)
        except Exception:  # noqa: BLE001 - nothing left to tell
            pass


def resume_command(argv: list[str] | None = None) -> str:
    """The command that continues this run: the same arguments with trainer.resume_mode=auto."""
    argv = list(sys.argv if argv is None else argv)
    name = Path(argv[0]).name if argv else ""
    if name in ("hybridrl", "cli.py", "__main__.py") and argv[1:2] == ["train"]:
        head, rest = ["hybridrl", "train"], argv[2:]
    elif name == "main_ppo.py":
        head, rest = ["python", "-m", "hybridrl.main_ppo"], argv[1:]
    else:
        return "hybridrl train ... trainer.resume_mode=auto (the same config and trainer.default_local_dir)"
    rest = [a for a in rest if not a.lstrip("+").startswith("trainer.resume_mode=")]
    return shlex.join(head + rest + ["trainer.resume_mode=auto"])


def train(cfg: Config) -> dict:
    """Run training; returns the paths of the run folder, metrics, plot, last checkpoint and export.

    More than one rank (trainer.n_gpus_per_node x trainer.nnodes) and not yet inside a launched rank: start
    them (hybridrl/launch.py: torch's elastic launcher on one node, Ray on several) and return rank 0's result.

    SIGINT / SIGTERM during the loop: raises `Stopped` (exit code 130 / 143) after the step in progress and a
    checkpoint (see `run`); on several ranks started here, SIGINT/SIGTERM go to this launcher process."""
    from hybridrl import launch
    if launch.under_launcher():
        launch.check_world(cfg)
    elif launch.world_size(cfg) > 1:
        if cfg.trainer.nnodes > 1:
            from hybridrl.ray_launch import launch_on_ray
            return launch_on_ray(cfg)
        return launch.launch_local(cfg)
    return asyncio.run(train_async(cfg))


async def train_async(cfg: Config, stop: GracefulStop | None = None) -> dict:
    """stop: how signals stop the loop; by default SIGINT/SIGTERM, unless torchrun or Ray started this rank."""
    run_dir = Path(cfg.trainer.default_local_dir)
    stop = stop if stop is not None else GracefulStop.for_this_process()
    if int(os.environ.get("RANK", "0")) != 0:   # a torchrun / Ray rank other than 0: rank 0 holds the lock
        return await run(cfg, run_dir, stop)
    ckpt.check_writable(run_dir)
    with ckpt.run_lock(run_dir):           # one run per folder: a second one is refused, naming this PID
        return await run(cfg, run_dir, stop)


async def run(cfg: Config, run_dir: Path, stop: GracefulStop | None = None) -> dict:
    """Load, train, checkpoint, export. A signal during the loop (`GracefulStop`) finishes the step in progress;
    after its metrics are logged every rank saves a checkpoint (unless it just did), the engines and the tracker
    are closed, the plot is drawn but the export is skipped (a stopped run is not finished: it is exported when a
    resumed run reaches the last step, and `hybridrl merge` makes one from the checkpoint), and `Stopped` is
    raised, after rank 0 printed the checkpoint and the command that resumes from it."""
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
                    kl_ctrl=make_kl_ctrl(cfg), dp=dp, agent=make_agent(cfg))
    loader = PromptLoader(train_prompts, cfg.data.train_batch_size, cfg.data.shuffle, cfg.data.seed)
    total = total_steps(cfg, loader)
    start = resume(cfg, run_dir, ctx, loader)
    if start == 0 and ckpt.list_checkpoints(run_dir):
        raise HybridRLError(f"{run_dir} holds checkpoints of an earlier run but resume is off "
                            f"(trainer.resume_mode={cfg.trainer.resume_mode}): use a new trainer.experiment_name "
                            "or trainer.default_local_dir, or trainer.resume_mode=auto to continue it")
    ctx.engine = engine_class(cfg.rollout.name).from_config(cfg, model_path=model_path)   # one per rank
    stop = stop if stop is not None else GracefulStop(enabled=False)
    tracker, last_ckpt, stopped_on, step = None, None, None, start
    try:
        try:
            if dp.is_main:                                # rank 0 writes the logs
                tracker = Tracker(cfg.trainer.logger, run_dir, asdict(cfg), cfg.trainer.project_name,
                                  cfg.trainer.experiment_name, resume_step=start)
            log = tracker.log if tracker is not None else (lambda metrics, step: None)
            await sync_weights(ctx)                       # the engine may start from dummy weights
            if cfg.trainer.val_before_train and start == 0 and val_prompts:
                log(await validate(ctx, val_prompts), 0)
            stop.step = start + 1
            stop.install(verbose=dp.is_main)              # from here a signal finishes the step (GracefulStop)
            for step in tqdm(range(start + 1, total + 1), desc="train", unit="step", initial=start, total=total,
                             disable=not dp.is_main):
                stop.step = step
                before = loader.state()
                try:
                    metrics = await rl_step(ctx, loader.next(), step)
                except RolloutFailed as e:                # nothing was trained this step: keep what the run has
                    raise HybridRLError(f"{e}; {save_before_failure(cfg, run_dir, step, ctx, loader, before)}") \
                        from None
                if dp.is_main:
                    warn_step(metrics, step, cfg.algorithm.adv_estimator)
                last = step == total
                if val_prompts and ((cfg.trainer.test_freq > 0 and step % cfg.trainer.test_freq == 0) or last):
                    metrics.update(await validate(ctx, val_prompts))
                log(metrics, step)
                saved = (cfg.trainer.save_freq > 0 and step % cfg.trainer.save_freq == 0) or last
                if saved:
                    last_ckpt = save_checkpoint(cfg, run_dir, step, ctx, loader)
                stopped_on = stop.agreed(dp)              # the safe point: every rank stops at the same step
                if stopped_on is not None:
                    if not saved:
                        last_ckpt = save_checkpoint(cfg, run_dir, step, ctx, loader)
                    break
        finally:
            try:
                await ctx.engine.close()
            finally:
                if tracker is not None:
                    tracker.close()
        if stopped_on is None and step > start:           # a signal while the engine closed, after the last step
            stopped_on = stop.agreed(dp)
        if stopped_on is None:
            stop.restore()                                # the run is done: Ctrl-C now interrupts the export
            return finish(run_dir, ctx, last_ckpt)
        finish(run_dir, ctx, last_ckpt, export=False)
        if dp.is_main:
            where = f"checkpoint: {last_ckpt}" if last_ckpt is not None else "no checkpoint"
            print(f"hybridrl: stopped after step {step} ({signal.Signals(stopped_on).name}); {where}\n"
                  f"hybridrl: to continue from it: {resume_command()}", file=sys.stderr, flush=True)
        raise Stopped(stopped_on, step, str(last_ckpt) if last_ckpt is not None else None)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:   # DCP's save wraps the second signal's KeyboardInterrupt in a CheckpointException
        if stop.interrupted:     # (a BaseException): it is still the user's stop-at-once
            raise KeyboardInterrupt(f"second signal: stopped at once ({type(e).__name__})") from None
        raise
    finally:
        stop.restore()


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


def make_agent(cfg: Config):
    """(tools, MultiTurnConfig) for rollout.multi_turn.enable, else None (single-turn rollouts)."""
    m = cfg.rollout.multi_turn
    if not m.enable:
        return None
    from hybridrl.rollout.multiturn import MultiTurnConfig
    from hybridrl.rollout.tools import load_tools
    tools = load_tools(m.tool_config_path) if m.tool_config_path else {}
    cap = lambda v: None if v < 0 else v  # noqa: E731
    return tools, MultiTurnConfig(
        enable=True, max_assistant_turns=cap(m.max_assistant_turns), max_user_turns=cap(m.max_user_turns),
        max_parallel_calls=m.max_parallel_calls, max_tool_response_length=m.max_tool_response_length,
        tool_response_truncate_side=m.tool_response_truncate_side, tool_timeout_s=m.tool_timeout_s,
        format=m.format, tokenization_sanity_check_mode=m.tokenization_sanity_check_mode,
        max_model_len=cfg.data.max_prompt_length + cfg.rollout.response_length)


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


def save_before_failure(cfg: Config, run_dir: Path, step: int, ctx: RLContext, loader: PromptLoader,
                        loader_state: dict) -> str:
    """The rollout of `step` failed before any update: checkpoint the end of step - 1 (the loader put back),
    so `trainer.resume_mode=auto` redoes exactly this step. -> what was kept, for the error message."""
    done = step - 1
    if done < 1:
        return "no step had finished, so there is no checkpoint"
    if any(ckpt.step_of(p) == done for p in ckpt.list_checkpoints(run_dir)):
        return f"the checkpoint of step {done} is intact; resume with trainer.resume_mode=auto"
    loader.load(loader_state)
    path = save_checkpoint(cfg, run_dir, done, ctx, loader)
    return f"saved the checkpoint of step {done} at {path}; resume with trainer.resume_mode=auto"


def finish(run_dir: Path, ctx: RLContext, last_ckpt: Path | None, export: bool = True) -> dict:
    """Export the actor and draw the plot; a failure here is reported, never fatal (the checkpoint is saved).
    The export gathers the weights on every rank (collective); rank 0 writes them and the plot.
    export=False (a run stopped by a signal): the plot only, on every rank alike."""
    out = {"run_dir": str(run_dir), "metrics": str(run_dir / "metrics.jsonl"), "checkpoint": str(last_ckpt)}
    weights = ({name: t.cpu() for name, t in ctx.actor.named_weights()}   # every rank takes part in the gathers
               if export else None)
    if not ctx.dp.is_main:
        return out
    steps = (("export", lambda: ckpt.export_hf(weights, ctx.actor.model.config, ctx.tokenizer,
                                               run_dir / "actor_hf")),) if export else ()
    for key, make in steps + (("plot", lambda: plot_run(run_dir / "metrics.jsonl", run_dir / "reward_curve.png")),):
        try:
            out[key] = str(make())
        except Exception as e:  # noqa: BLE001 - the run is done; say what is missing and go on
            out[key] = None
            tqdm.write(f"warning: {key} failed ({type(e).__name__}: {e}); the checkpoint at {last_ckpt} is intact")
    print("\n".join(f"{k:>10}: {v}" for k, v in out.items()))
    return out
