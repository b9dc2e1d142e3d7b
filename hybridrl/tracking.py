"""Metrics sinks chosen by `trainer.logger`: console table, JSONL, TensorBoard, W&B; and the end-of-run plot.

    log = Tracker(cfg.trainer.logger, run_dir, cfg_dict); log.log(metrics, step); log.close()
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from hybridrl import HybridRLError

CONSOLE_KEYS = ("reward/mean", "val/reward/mean", "response_length/mean", "response_length/clip_ratio",
                "actor/pg_loss", "actor/entropy", "actor/ref_kl", "actor/pg_clipfrac", "actor/grad_norm",
                "rollout/rollout_probs_diff_mean", "timing/gen", "timing/update", "timing/sync", "timing/step")


class Tracker:
    def __init__(self, loggers: list[str], run_dir: str | Path, config: dict, project: str = "hybridrl",
                 name: str = "default", resume_step: int = 0):
        self.run_dir = Path(run_dir)
        self.loggers = list(loggers)
        self.jsonl = self.run_dir / "metrics.jsonl"
        self._tb = self._wandb = None
        # metrics.jsonl is always written: it is the run's record and the plot's source
        if self.jsonl.exists():
            rows = read_jsonl(self.jsonl)
            if rows and not resume_step:
                raise HybridRLError(
                    f"{self.jsonl} holds the metrics of an earlier run ({len(rows)} rows, last step "
                    f"{rows[-1].get('step')}) and this run starts fresh, so they would be lost; fix: use another "
                    "trainer.experiment_name or trainer.default_local_dir, resume that run (trainer.resume_mode=auto), "
                    f"or delete {self.jsonl}")
            # a resumed run rewrites the steps after its checkpoint (and drops a torn last line)
            kept = [r for r in rows if r.get("step", 0) <= resume_step]
            _write_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept))
        if "tensorboard" in loggers:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise HybridRLError("trainer.logger has tensorboard but it is not installed: "
                                    "pip install tensorboard") from None
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if "wandb" in loggers:
            try:
                import wandb
            except ImportError:
                raise HybridRLError("trainer.logger has wandb but it is not installed: pip install wandb") from None
            self._wandb = wandb.init(project=project, name=name, config=config, dir=str(self.run_dir))

    def log(self, metrics: dict, step: int) -> None:
        metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        with self.jsonl.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if "console" in self.loggers:
            from tqdm.auto import tqdm
            tqdm.write(console_line(metrics, step))
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def console_line(metrics: dict, step: int) -> str:
    parts = [f"step {step:>4}"]
    for k in CONSOLE_KEYS:
        if k in metrics and math.isfinite(metrics[k]):
            parts.append(f"{k.split('/', 1)[-1] if k.startswith(('timing', 'actor')) else k}={metrics[k]:.4g}")
    return " | ".join(parts)


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a metrics log; a torn line (a crash mid-write) is skipped with a warning."""
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            print(f"warning: {p} line {n} is torn or not a JSON object ({line[:60]!r}); skipped it", file=sys.stderr,
                  flush=True)
            continue
        rows.append(row)
    return rows


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def plot_run(jsonl_path: str | Path, out_png: str | Path) -> Path | None:
    """Reward (train and validation) and response length over steps, as one PNG."""
    rows = read_jsonl(jsonl_path)
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("reward/mean", "train reward"), ("val/reward/mean", "validation reward")):
        x, y = series(key)
        if x:
            ax1.plot(x, y, marker="o", ms=3, label=label)
    ax1.set_xlabel("step"), ax1.set_ylabel("reward"), ax1.legend(), ax1.grid(alpha=0.3)
    x, y = series("response_length/mean")
    ax2.plot(x, y, marker="o", ms=3, color="tab:green")
    ax2.set_xlabel("step"), ax2.set_ylabel("mean response length (tokens)"), ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
