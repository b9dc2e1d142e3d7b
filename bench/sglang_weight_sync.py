"""A real SGLang server driven through hybridrl's launcher and client: rollout, sleep/wake, weight sync.

    python bench/sglang_weight_sync.py --out DIR              # GPU: SGLang 0.5.17, Qwen2.5-0.5B shape, dummy weights
    python bench/sglang_weight_sync.py --smoke --out DIR      # CPU: `hybridrl serve` + tiny model, checks the flow

On the GPU: launches `sglang.launch_server` through `SGLangEngine.from_config` (load_format dummy,
memory saver, triton attention), then
  1. rollout: 256 requests x (128 random prompt ids + 256 forced new tokens), one HTTP request
     each, all in flight at once, log-probs on; tokens/s = generated tokens / wall time
     (also 64 requests and 1 request);
  2. the colocated cycle: sleep(all) (freed GPU memory read by torch.cuda.mem_get_info in this
     process), then update_weights(whole model, version 1), which wakes the weights, pushes,
     flushes, checks the version and wakes the KV cache;
  3. weight sync of the whole model (0.99 GB bf16 random tensors on the GPU) through our
     `update_weights` (CUDA IPC, flattened buckets, flush + version check included), at two
     bucket sizes, next to the plain raw call: MultiprocessingSerializer + one POST
     /update_weights_from_tensor (as SGLang's own example does), 3 trials each, median;
  4. checks: the server's /model_info weight_version and each sample's weight_version equal ours.
Prints a table and writes JSON (device, date, versions, command) to --out.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybridrl.config import Config  # noqa: E402
from hybridrl.rollout.base import SamplingParams  # noqa: E402
from hybridrl.rollout.sglang.engine import SGLangEngine  # noqa: E402
from hybridrl.sync import bucketize, nbytes  # noqa: E402

QWEN05 = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896, intermediate_size=4864,
              num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
              max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
              torch_dtype="bfloat16", hidden_act="silu", bos_token_id=151643, eos_token_id=151645)
SGLANG_FLAGS = {"sampling_backend": "pytorch", "grammar_backend": "none", "mm_feature_transport": "cpu",
                "cuda_graph_max_bs": 256}


def qwen_named_tensors(cfg: dict, device: str, dtype=torch.bfloat16, seed: int = 1,
                       embed_std: float = 0.02) -> list[tuple[str, torch.Tensor]]:
    """Random HF-named tensors of a Qwen2 model (tied embeddings: no lm_head); norms are ones."""
    h, i, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"]
    hd = h // cfg["num_attention_heads"]
    shapes = {"self_attn.q_proj.weight": (h, h), "self_attn.q_proj.bias": (h,),
              "self_attn.k_proj.weight": (kv * hd, h), "self_attn.k_proj.bias": (kv * hd,),
              "self_attn.v_proj.weight": (kv * hd, h), "self_attn.v_proj.bias": (kv * hd,),
              "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
              "mlp.down_proj.weight": (h, i), "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)

    def ones(*shape):
        return torch.ones(*shape, dtype=dtype, device=device)
    named = [("model.embed_tokens.weight", rand(cfg["vocab_size"], h, std=embed_std)), ("model.norm.weight", ones(h))]
    for layer in range(cfg["num_hidden_layers"]):
        named += [(f"model.layers.{layer}.{k}", ones(*s) if "norm" in k else rand(*s)) for k, s in shapes.items()]
    return named


def make_config(args, model_dir: str) -> Config:
    cfg = Config()
    r = cfg.rollout
    r.name, r.free_cache_engine, r.load_format, r.weight_sync = "sglang", True, "dummy", "tensor"
    r.gpu_memory_utilization, r.max_num_seqs, r.log_level = 0.5, 256, "warning"
    r.server_start_timeout, r.request_timeout = 300.0, 180.0
    if not args.smoke:
        r.attention_backend, r.dtype = "triton", "bfloat16"
        r.engine_kwargs = {"sglang": dict(SGLANG_FLAGS)}
    cfg.model.path = model_dir
    return cfg


async def rollout(engine, n: int, plen: int, new: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(n + plen)
    prompts = torch.randint(100, vocab - 100, (n, plen), generator=g).tolist()
    sp = SamplingParams(max_new_tokens=new, temperature=1.0, ignore_eos=True)
    t = time.perf_counter()
    outs = await asyncio.gather(*[engine.generate(p, sp) for p in prompts])
    dt = time.perf_counter() - t
    flat = [o for group in outs for o in group]
    toks = sum(len(o.output_ids) for o in flat)
    ok = all(len(o.logprobs) == len(o.output_ids) == new and o.finish_reason == "length" for o in flat)
    finite = all(torch.isfinite(torch.tensor(o.logprobs)).all() for o in flat)
    return {"requests": n, "prompt": plen, "new": new, "s": round(dt, 3), "tok_s": round(toks / dt, 1),
            "all_full_length_with_logprobs": bool(ok), "logprobs_finite": bool(finite),
            "weight_versions": sorted({o.weight_version for o in flat}), "logprob_sample": flat[0].logprobs[:3]}


def free_gpu() -> int:
    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0


async def timed(coro) -> float:
    t = time.perf_counter()
    await coro
    return round(time.perf_counter() - t, 4)


async def colocated_cycle(engine, named, version: int) -> dict:
    """sleep, then the whole sync (wake weights → push → flush → version check → wake kv_cache), each timed."""
    free0 = free_gpu()
    res = {"sleep_s": await timed(engine.sleep(["kv_cache", "weights"]))}
    res["sleep_freed_GB"] = round((free_gpu() - free0) / 1e9, 2)
    res["sync_after_sleep_s"] = await timed(engine.update_weights(bucketize(named, 2048), version))
    res["free_after_sync_minus_before_sleep_GB"] = round((free_gpu() - free0) / 1e9, 2)
    return res


async def our_push(engine, named, bucket_mb: int, version: int) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return await timed(engine.update_weights(bucketize(named, bucket_mb), version))


def raw_push(url: str, named) -> tuple[float, float, int]:
    """The plain way: serialize the whole list, one POST /update_weights_from_tensor (flush_cache true)."""
    import requests
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    monkey_patch_torch_reductions()
    torch.cuda.synchronize()
    t = time.perf_counter()
    payload = MultiprocessingSerializer.serialize(named, output_str=True)
    t_ser = time.perf_counter() - t
    r = requests.post(f"{url}/update_weights_from_tensor", timeout=300,
                      json={"serialized_named_tensors": [payload], "load_format": None, "flush_cache": True})
    return round(time.perf_counter() - t, 4), round(t_ser, 4), r.status_code


async def weight_sync(engine, named, trials: int, smoke: bool) -> dict:
    res, version = {}, 10
    for bucket_mb in (2048, 512):
        times = []
        for _ in range(trials):
            version += 1
            times.append(await our_push(engine, named, bucket_mb, version))
        res[f"ours_bucket{bucket_mb}MB_s"] = times
        res[f"ours_bucket{bucket_mb}MB_median_s"] = statistics.median(times)
    if not smoke:
        raw = [await asyncio.to_thread(raw_push, engine.url, named) for _ in range(trials)]
        res["raw_s"] = [r[0] for r in raw]
        res["raw_serialize_s"] = [r[1] for r in raw]
        res["raw_status"] = [r[2] for r in raw]
        res["raw_median_s"] = statistics.median(res["raw_s"])
    version += 1                                             # end on our push, then check the server's version
    await our_push(engine, named, 512, version)
    info = await engine.model_info()
    res["final_version_ours"], res["final_version_server"] = version, info.get("weight_version")
    res["version_matches"] = str(info.get("weight_version")) == str(version)
    return res


async def run(args, engine, named, vocab: int, res: dict) -> None:
    """Fills `res` step by step, so a failure still leaves the figures measured before it."""
    n, plen, new = (16, 16, 16) if args.smoke else (args.requests, args.prompt_len, args.new_tokens)
    small = 8 if args.smoke else 64
    steps = [("warmup", lambda: rollout(engine, 8, 16, 8, vocab)),
             ("rollout", lambda: rollout(engine, n, plen, new, vocab)),
             ("rollout_repeat", lambda: rollout(engine, n, plen, new, vocab)),
             ("rollout_64", lambda: rollout(engine, min(n, 64), plen, new, vocab)),
             ("rollout_1", lambda: rollout(engine, 1, plen, new, vocab)),
             ("colocated", lambda: colocated_cycle(engine, named, version=1)),
             ("after_cycle", lambda: rollout(engine, small, plen, small, vocab)),
             ("sync", lambda: weight_sync(engine, named, args.trials, args.smoke)),
             ("after_sync", lambda: rollout(engine, small, plen, 32, vocab))]
    for name, step in steps:
        res[name] = await step()
        print(name, json.dumps(res[name]), flush=True)
    res["after_sync"]["expected_version"] = res["sync"]["final_version_ours"]


def smoke_model(out: Path) -> tuple[str, dict]:
    from hybridrl.testing import save_tiny_model
    d = save_tiny_model(out / "tiny", arch="qwen2")
    return d, json.loads((Path(d) / "config.json").read_text())


def table(res: dict) -> str:
    r, c, s = res["rollout_repeat"], res["colocated"], res["sync"]
    rows = [("server start (launch → healthy)", f"{res['start_s']:.1f} s"),
            (f"rollout {r['requests']} req x ({r['prompt']} + {r['new']} new), log-probs",
             f"{r['tok_s']:,.0f} tok/s (first run {res['rollout']['tok_s']:,.0f})"),
            ("rollout 64 / 1 requests", f"{res['rollout_64']['tok_s']:,.0f} / {res['rollout_1']['tok_s']:,.0f} tok/s"),
            ("sleep (release weights + kv_cache)", f"{c['sleep_s']:.3f} s, frees {c['sleep_freed_GB']} GB"),
            ("update_weights after sleep (wakes both, whole model, 1 bucket)", f"{c['sync_after_sleep_s']:.3f} s"),
            ("ours update_weights, 2048 MB buckets (median)", f"{s['ours_bucket2048MB_median_s']:.3f} s"),
            ("ours update_weights, 512 MB buckets (median)", f"{s['ours_bucket512MB_median_s']:.3f} s")]
    if "raw_median_s" in s:
        rows.append(("raw /update_weights_from_tensor (median)", f"{s['raw_median_s']:.3f} s"))
    rows.append(("server weight_version == ours", str(s["version_matches"])))
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"| {a:<{w}} | {b} |" for a, b in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "outputs/bench"))
    p.add_argument("--smoke", action="store_true", help="CPU: hybridrl serve + tiny model instead of SGLang")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--trials", type=int, default=3)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        model_dir, mcfg = smoke_model(out)
        launch_cmd, device = [sys.executable, "-m", "hybridrl.rollout.native.server", "--device", "cpu"], "cpu"
    else:
        model_dir, mcfg = str(out / "q05"), QWEN05
        os.makedirs(model_dir, exist_ok=True)
        (Path(model_dir) / "config.json").write_text(json.dumps(QWEN05))
        launch_cmd, device = None, "cuda"
    cfg = make_config(args, model_dir)
    t = time.perf_counter()
    engine = SGLangEngine.from_config(cfg, launch_cmd=launch_cmd, run_dir=str(out))
    res = {"start_s": round(time.perf_counter() - t, 1), "server_version": engine.server_version,
           "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "command": " ".join([Path(sys.executable).name] + sys.argv)}
    named = qwen_named_tensors(mcfg, device, torch.bfloat16 if device == "cuda" else torch.float32)
    res["model_bytes_GB"] = round(sum(nbytes(t) for _, t in named) / 1e9, 3)
    try:
        asyncio.run(run(args, engine, named, mcfg["vocab_size"], res))
    except BaseException as e:
        res["error"] = f"{type(e).__name__}: {e}"[:3000]
        raise
    finally:
        res["client_retries"] = engine.client.retried[:20]
        asyncio.run(engine.close())
        (out / "sglang_weight_sync.json").write_text(json.dumps(res, indent=1))
    print(table(res))


if __name__ == "__main__":
    main()
