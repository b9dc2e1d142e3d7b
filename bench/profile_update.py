"""Where the trainer's update time goes, on the standard GRPO batch (256 sequences, ~130 prompt + 256
response tokens, Qwen2.5-0.5B shape, random weights): times `Policy.update` and `Policy.log_probs` for a few
micro-batch sizes, then profiles one update and prints the top CUDA kernels.

    python bench/profile_update.py --out profile_update.json      # on a GPU
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch


def make_batch(n: int, prompt: int, response: int, vocab: int):
    from hybridrl.trainer.batch import collate
    from hybridrl.types import Sample
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        s = Sample(prompt_ids=torch.randint(100, vocab - 100, (prompt - i % 7,), generator=g).tolist(), group=i // 8)
        s.append(torch.randint(100, vocab - 100, (response,), generator=g).tolist(), [-1.0] * response)
        s.reward = float(i % 3)
        samples.append(s)
    return collate(samples, pad_id=0)


def timed(fn, repeat: int = 2) -> float:
    fn()                                    # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeat


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/hybridrl_bench")
    ap.add_argument("--out", default="profile_update.json")
    args = ap.parse_args()
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from grpo_step import make_inputs
    from hybridrl.config import load_config
    from hybridrl.trainer.actor import Policy
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    model_dir, _, _ = make_inputs(root, "0.5B", 32)
    cfg = load_config([f"model.path={model_dir}", "data.train_batch_size=32", "actor.ppo_mini_batch_size=32",
                       "rollout.n=8"])
    policy = Policy(model_dir, cfg.model, cfg.actor, torch.device("cuda"), norm_len=256)
    batch = make_batch(256, 130, 256, 151936)
    adv = torch.randn(batch.response_mask.shape)
    res = {"device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
           "torch": torch.__version__, "tokens": int(batch.attention_mask.sum()), "runs": []}
    for micro in (16, 32, 64):
        policy.cfg.ppo_micro_batch_size_per_gpu = micro
        old = policy.log_probs(batch, 1.0, micro)[0]
        t_lp = timed(lambda: policy.log_probs(batch, 1.0, micro))
        t_up = timed(lambda: policy.update(batch, old, adv, None, 1.0))
        peak = torch.cuda.max_memory_allocated() / 1e9
        res["runs"].append({"micro": micro, "log_probs_s": round(t_lp, 3), "update_s": round(t_up, 3),
                            "peak_GB": round(peak, 1)})
        print(f"micro {micro:3d}: log_probs {t_lp:.3f} s, update {t_up:.3f} s, peak {peak:.1f} GB", flush=True)
        torch.cuda.reset_peak_memory_stats()
    policy.cfg.ppo_micro_batch_size_per_gpu = 32
    old = policy.log_probs(batch, 1.0, 32)[0]
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        policy.update(batch, old, adv, None, 1.0)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
    print(table)
    res["profile_top"] = table
    res["note"] = "profile_top: one update at micro 32, sorted by CUDA time"
    json.dump(res, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
