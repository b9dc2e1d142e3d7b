"""GRPO step time with a rollout backend, on the standard workload of docs/benchmarks (ANCHOR_FIGURES.md):
Qwen2.5-0.5B shape, random weights, 32 prompts x 8 samples, prompts ~130 tokens, completions forced
to 256 tokens (ignore_eos). The trainer pushes its weights to the engine at start (load_format=dummy).

    python bench/grpo_step.py --backend sglang native --steps 4 --out results.json

Prints a table (median step time after the first step, and the timing breakdown) and writes JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import time
from pathlib import Path

def make_inputs(root: Path, size: str, n_prompts: int) -> tuple[str, str, str]:
    """The standard workload's model folder, prompts and reward: `hybridrl bench`'s (hybridrl/bench.py)."""
    from hybridrl.bench import make_inputs as bench_inputs
    return bench_inputs(Path(root), size, n_prompts)


def run(backend: str, model_dir: str, data: str, reward: str, root: Path, args) -> dict:
    from hybridrl.config import load_config
    from hybridrl.train import train
    run_dir = root / f"run_{backend}"
    shutil.rmtree(run_dir, ignore_errors=True)
    over = [f"model.path={model_dir}", f"data.train_files=[{data}]", f"reward.custom_path={reward}",
            f"data.train_batch_size={args.prompts}", f"rollout.n={args.n}", f"actor.ppo_mini_batch_size={args.prompts}",
            f"actor.ppo_micro_batch_size_per_gpu={args.micro}", f"rollout.log_prob_micro_batch_size_per_gpu={args.micro}",
            "data.max_prompt_length=256", f"data.max_response_length={args.new_tokens}", "rollout.ignore_eos=true",
            f"rollout.name={backend}", "rollout.load_format=dummy", "rollout.gpu_memory_utilization=0.5",
            f"trainer.total_training_steps={args.steps}", "trainer.val_before_train=false", "trainer.test_freq=-1",
            "trainer.logger=[console,jsonl]", f"trainer.default_local_dir={run_dir}", "trainer.resume_mode=disable",
            "actor.lr=1e-6", *args.extra]
    t = time.perf_counter()
    train(load_config(over))
    wall = time.perf_counter() - t
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows
    med = lambda k: statistics.median(r[k] for r in steady if k in r) if any(k in r for r in steady) else None
    keys = ["timing/step", "timing/gen", "timing/sleep", "timing/reward", "timing/old_log_prob", "timing/adv",
            "timing/update", "timing/sync", "timing/ref", "timing/collate", "timing/metrics", "timing/other",
            "rollout/rollout_probs_diff_mean", "rollout/rollout_probs_diff_max",
            "rollout/rollout_logp_abs_diff_mean", "response_length/mean", "perf/gpu_peak_gb",
            "perf/gpu_held_during_rollout_gb", "perf/gpu_reserved_gb"]
    return {"backend": backend, "label": args.label, "wall_s": wall, "steps": len(rows), **{k: med(k) for k in keys}, "per_step": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", nargs="+", default=["native"])
    ap.add_argument("--size", default="0.5B")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--micro", type=int, default=32)
    ap.add_argument("--root", default="/tmp/hybridrl_bench")
    ap.add_argument("--out", default="grpo_step.json")
    ap.add_argument("--label", default="", help="a name for this variant in the table (e.g. offload)")
    ap.add_argument("extra", nargs="*", help="extra config overrides")
    args = ap.parse_args()
    import torch
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    model_dir, data, reward = make_inputs(root, args.size, args.prompts)
    res = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "date": datetime.date.today().isoformat(), "torch": torch.__version__, "args": vars(args), "runs": []}
    for b in args.backend:
        try:
            res["runs"].append(run(b, model_dir, data, reward, root, args))
        except Exception as e:  # keep the other backend's figures
            res["runs"].append({"backend": b, "error": f"{type(e).__name__}: {e}"[:2000]})
        json.dump(res, open(args.out, "w"), indent=1)
    print(f"\n{'backend':8} {'step_s':>7} {'gen':>6} {'old_lp':>6} {'update':>6} {'sync':>6} {'sleep':>6} {'p_diff':>8}"
          f" {'peak_gb':>7} {'held_gb':>7}  {args.label}")
    for r in res["runs"]:
        if "error" in r:
            print(f"{r['backend']:8} error: {r['error'][:200]}")
            continue
        f = lambda k: f"{r[k]:.3g}" if r.get(k) is not None else "-"
        print(f"{r['backend']:8} {f('timing/step'):>7} {f('timing/gen'):>6} {f('timing/old_log_prob'):>6} "
              f"{f('timing/update'):>6} {f('timing/sync'):>6} {f('timing/sleep'):>6} {f('rollout/rollout_probs_diff_mean'):>8}"
              f" {f('perf/gpu_peak_gb'):>7} {f('perf/gpu_held_during_rollout_gb'):>7}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
