"""The disaggregated NCCL weight transport against a real SGLang server on a second GPU.

    python bench/sglang_nccl.py --out DIR          # 2 GPUs: SGLang 0.5.17 on GPU 1, this "trainer" on GPU 0

Launches `sglang.launch_server` through `SGLangEngine.from_config` (Qwen2.5-0.5B shape,
load_format dummy, triton attention, pytorch sampling, grammar none) with CUDA_VISIBLE_DEVICES=1
for the server process only, then, from this process on GPU 0:
  1. control: greedy generation on the server's dummy weights (log-probs kept);
  2. `engine.transport.init()` (what the first push would do anyway, timed on its own here):
     the trainer is rank 0 at 127.0.0.1 on a free port, the server's TP rank is rank 1;
  3. `update_weights(buckets, version)` with weight_sync=nccl, whole model (bf16 random tensors on
     GPU 0), `--trials` times, each timed (push + flush + version check), the server's
     /model_info weight_version checked against ours after each push;
  4. greedy generation with log-probs, compared with an HF `transformers` Qwen2 holding the same
     tensors on GPU 0 (teacher-forced on the server's tokens): greedy tokens must agree for the
     first `--check-tokens` tokens and log-probs within `--tol` (bf16).
Prints a table and writes sglang_nccl.json (device, date, versions, command) to --out.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybridrl.config import Config  # noqa: E402
from hybridrl.rollout.base import SamplingParams  # noqa: E402
from hybridrl.sync import bucketize, nbytes  # noqa: E402
from sglang_weight_sync import QWEN05, SGLANG_FLAGS, qwen_named_tensors  # noqa: E402  (same folder)

EMBED_STD = 0.1     # tied embeddings: logits std ~ sqrt(hidden) * 0.1 ~ 3, a peaked next-token distribution


def make_config(model_dir: str) -> Config:
    cfg = Config()
    r = cfg.rollout
    r.name, r.free_cache_engine, r.load_format, r.weight_sync = "sglang", False, "dummy", "nccl"
    r.gpu_memory_utilization, r.max_num_seqs, r.log_level = 0.5, 64, "warning"
    r.server_start_timeout, r.request_timeout = 300.0, 120.0
    r.attention_backend, r.dtype = "triton", "bfloat16"
    r.engine_kwargs = {"sglang": dict(SGLANG_FLAGS)}
    cfg.model.path = model_dir
    return cfg


def launch_on_gpu(cfg, gpu: str, run_dir: str):
    """The server process sees only `gpu`; this process keeps all GPUs.

    CUDA reads CUDA_VISIBLE_DEVICES once, at its first call in a process: count the GPUs here before
    the variable changes for the child (from_config's NCCL check asks CUDA too, inside that window).
    """
    from hybridrl.rollout.sglang.engine import SGLangEngine
    assert torch.cuda.device_count() >= 2, "the NCCL bench needs 2 GPUs: one for the server, one for the trainer"
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        return SGLangEngine.from_config(cfg, run_dir=run_dir)
    finally:
        if old is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(100, vocab - 100, (n, length), generator=g).tolist()


async def greedy(engine, batch: list[list[int]], new: int) -> list[dict]:
    sp = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)
    outs = await asyncio.gather(*[engine.generate(p, sp) for p in batch])
    return [{"ids": o[0].output_ids, "logprobs": o[0].logprobs, "weight_version": o[0].weight_version} for o in outs]


def hf_model(cfg: dict, named, device: str):
    """An HF Qwen2ForCausalLM holding `named` (lm_head tied to the embedding)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    conf = Qwen2Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype", "model_type")})
    with torch.device(device):
        model = Qwen2ForCausalLM(conf)
    model = model.to(named[0][1].dtype).eval()
    missing, unexpected = model.load_state_dict(dict(named), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"HF state dict mismatch: missing={missing} unexpected={unexpected}")
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


@torch.no_grad()
def hf_reference(model, prompt: list[int], out_ids: list[int]) -> dict:
    """Teacher-forced on the server's tokens: HF's greedy choice and log-prob of each server token."""
    dev = next(model.parameters()).device
    ids = torch.tensor([prompt + out_ids], device=dev)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()       # [new, vocab]
    lp = torch.log_softmax(logits, -1)
    top2 = lp.topk(2, -1).values
    return {"argmax": lp.argmax(-1).tolist(), "logprobs": lp.gather(1, torch.tensor(out_ids, device=dev)[:, None])[:, 0].tolist(),
            "top2_gap": (top2[:, 0] - top2[:, 1]).tolist()}


def compare(server: list[dict], refs: list[dict], k: int, tol: float) -> dict:
    """Greedy agreement on the first k tokens, and |server log-prob - HF log-prob| over all tokens."""
    first_diff, diffs = [], []
    for s, r in zip(server, refs):
        mism = [i for i, (a, b) in enumerate(zip(s["ids"], r["argmax"])) if a != b]
        first_diff.append(mism[0] if mism else len(s["ids"]))
        diffs += [abs(a - b) for a, b in zip(s["logprobs"], r["logprobs"])]
    return {"first_greedy_mismatch": first_diff, "greedy_equal_first_k": all(d >= k for d in first_diff),
            "logprob_max_abs_diff": round(max(diffs), 4), "logprob_mean_abs_diff": round(sum(diffs) / len(diffs), 4),
            "logprobs_close": max(diffs) <= tol, "k": k, "tol": tol}


async def push(engine, named, bucket_mb: int, version: int) -> dict:
    torch.cuda.synchronize()
    t = time.perf_counter()
    await engine.update_weights(bucketize(named, bucket_mb), version)     # push + flush + version check
    dt = time.perf_counter() - t
    info = await engine.model_info()
    return {"version": version, "s": round(dt, 4), "server_version": info.get("weight_version"),
            "version_matches": str(info.get("weight_version")) == str(version)}


async def run(args, engine, res: dict) -> None:
    """Fills `res` step by step, so a failure still leaves what was measured before it."""
    batch = prompts(args.prompts, args.prompt_len, QWEN05["vocab_size"])
    res["before_push"] = await greedy(engine, batch, args.new_tokens)
    torch.cuda.set_device(0)
    named = qwen_named_tensors(QWEN05, "cuda:0", embed_std=EMBED_STD)
    res["model_bytes_GB"] = round(sum(nbytes(t) for _, t in named) / 1e9, 3)
    res["tensors"] = len(named)
    t = time.perf_counter()
    await engine.transport.init()
    res["init_nccl_s"] = round(time.perf_counter() - t, 3)
    print("init_nccl", res["init_nccl_s"], "s", flush=True)
    res["pushes"] = []
    for trial in range(args.trials):
        res["pushes"].append(await push(engine, named, args.bucket_mb, version=trial + 1))
        print("push", json.dumps(res["pushes"][-1]), flush=True)
    res["after_push"] = await greedy(engine, batch, args.new_tokens)
    model = hf_model(QWEN05, named, "cuda:0")
    refs = [hf_reference(model, p, s["ids"]) for p, s in zip(batch, res["after_push"])]
    res["hf_ref"] = refs
    res["check"] = compare(res["after_push"], refs, args.check_tokens, args.tol)
    ctrl = [hf_reference(model, p, s["ids"]) for p, s in zip(batch, res["before_push"])]
    res["control_dummy_weights"] = compare(res["before_push"], ctrl, args.check_tokens, args.tol)
    res["samples_version"] = sorted({s["weight_version"] for s in res["after_push"]})


def table(res: dict) -> str:
    p, c, ctl = res["pushes"], res["check"], res["control_dummy_weights"]
    times = [x["s"] for x in p]
    rows = [("server start (launch → healthy), GPU 1", f"{res['start_s']:.1f} s"),
            ("transport.init (NCCL group of 2: trainer rank 0 + server rank 1)", f"{res['init_nccl_s']:.3f} s"),
            (f"update_weights nccl, whole model ({res['model_bytes_GB']} GB, {res['tensors']} tensors), per trial",
             ", ".join(f"{t:.3f}" for t in times) + " s"),
            ("median of trials 2.. (first includes NCCL communicator setup)",
             f"{sorted(times[1:])[len(times[1:]) // 2]:.3f} s" if len(times) > 1 else "-"),
            ("server weight_version == ours after each push", str(all(x["version_matches"] for x in p))),
            (f"greedy tokens == HF for first {c['k']} (first mismatch per prompt)",
             f"{c['greedy_equal_first_k']} ({c['first_greedy_mismatch']})"),
            ("log-prob |server - HF| max / mean", f"{c['logprob_max_abs_diff']} / {c['logprob_mean_abs_diff']}"),
            ("control, dummy weights before the push: max / mean", f"{ctl['logprob_max_abs_diff']} / {ctl['logprob_mean_abs_diff']}")]
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"| {a:<{w}} | {b} |" for a, b in rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "outputs/bench"))
    p.add_argument("--server-gpu", default="1", help="CUDA_VISIBLE_DEVICES of the server process")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--bucket-mb", type=int, default=2048)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--check-tokens", type=int, default=4)
    p.add_argument("--tol", type=float, default=0.1, help="max |log-prob difference| accepted (bf16)")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "q05"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(QWEN05))
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "command": " ".join(["python3"] + sys.argv)}
    t = time.perf_counter()
    engine = launch_on_gpu(make_config(str(model_dir)), args.server_gpu, str(out))
    res.update(start_s=round(time.perf_counter() - t, 1), server_version=engine.server_version,
               device=f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    try:
        asyncio.run(run(args, engine, res))
    except BaseException as e:
        res["error"] = f"{type(e).__name__}: {e}"[:3000]
        import traceback
        traceback.print_exc()
    finally:
        res["client_retries"] = engine.client.retried[:20]
        asyncio.run(engine.close())
        (out / "sglang_nccl.json").write_text(json.dumps(res, indent=1))
    if "error" in res:
        print("RESULT: FAIL", res["error"], flush=True)
        os._exit(1)             # a trainer-side NCCL thread may still wait for a peer that is gone
    print(table(res))
    ok = res["check"]["greedy_equal_first_k"] and res["check"]["logprobs_close"]
    print("RESULT:", "PASS" if ok and all(x["version_matches"] for x in res["pushes"]) else "FAIL")


if __name__ == "__main__":
    main()
