"""Rollout throughput: the native engine next to Hugging Face `generate`, same model, same run.

    python bench/rollout_throughput.py                       # GPU: Qwen2.5-0.5B shape, bf16, batch 1/64/256
    python bench/rollout_throughput.py --shape small --batches 1,8,32 --prompt-len 64 --new-tokens 64   # CPU

Random weights of a real shape (the cost of a trained model), random prompt ids, every sequence
forced to exactly --new-tokens tokens (ignore_eos / min_new_tokens), sampling at temperature 1 with
log-probs of the sampled tokens on both sides. Tokens/s counts generated tokens over wall time
(prefill included). Each engine runs each batch once untimed first (CUDA graphs, allocator).
Prints a table and writes JSON (device, date, versions, command) to --out.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybridrl.models import qwen25_shape_config  # noqa: E402
from hybridrl.rollout.base import SamplingParams  # noqa: E402
from hybridrl.rollout.native.engine import NativeEngine  # noqa: E402

SMALL = dict(model_type="qwen2", vocab_size=32000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=1024, max_position_embeddings=4096, rope_theta=1e6,
             rms_norm_eps=1e-6, eos_token_id=2, tie_word_embeddings=True)


def make_model(shape: str, device: torch.device, dtype: torch.dtype, out: Path) -> str:
    from transformers import AutoModelForCausalLM, Qwen2Config

    kwargs = SMALL if shape == "small" else qwen25_shape_config(shape)
    kwargs = {k: v for k, v in kwargs.items() if k != "model_type"}
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**kwargs), dtype=dtype)
    model.save_pretrained(str(out))
    return str(out)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_native(engine: NativeEngine, prompts: list[list[int]], new_tokens: int) -> float:
    sp = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, ignore_eos=True, seed=0)

    async def main():
        return await asyncio.gather(*[engine.generate(p, sp) for p in prompts])
    sync(engine.device)
    t0 = time.perf_counter()
    outs = asyncio.run(main())
    sync(engine.device)
    dt = time.perf_counter() - t0
    assert all(len(o[0].output_ids) == new_tokens == len(o[0].logprobs) for o in outs)
    return dt


class LogprobRecorder:
    """A logits processor that keeps log-probs of each sampled token (HF's side of "log-probs on")."""

    def __init__(self):
        self.prev, self.out = None, []

    def __call__(self, input_ids, scores):
        if self.prev is not None:
            self.out.append(self.prev.gather(1, input_ids[:, -1:]))
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores


def run_hf(model, prompts: list[list[int]], new_tokens: int, device) -> float:
    from transformers import LogitsProcessorList

    ids = torch.tensor(prompts, device=device)
    rec = LogprobRecorder()
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             logits_processor=LogitsProcessorList([rec]), pad_token_id=0)
        rec.out.append(rec.prev.gather(1, out[:, -1:]))
        logprobs = torch.cat(rec.out, dim=1).cpu()
    sync(device)
    dt = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new_tokens and logprobs.shape[1] == new_tokens
    return dt


def profile_decode(engine: NativeEngine, prompts: list[list[int]], steps: int) -> dict:
    """Milliseconds per decode step by phase (device synchronised): where a step's time goes."""
    from hybridrl.rollout.native.sampler import batch_flags, params_block, sample
    from hybridrl.rollout.native.scheduler import Sequence

    for p in prompts:
        req = engine._new_request(p, SamplingParams(max_new_tokens=steps + 1, ignore_eos=True), None)
        req.seqs.append(Sequence(req, 0, list(p)))
        engine.scheduler.add(req.seqs[0])
    while engine.scheduler.waiting:
        engine._step()
    phases = dict(schedule=0.0, forward=0.0, sample=0.0, postprocess=0.0)
    for _ in range(steps):
        t0 = time.perf_counter()
        _, seqs = engine.scheduler.schedule()
        t1 = time.perf_counter()
        logits = engine.runner.decode(seqs, engine.block_table)
        sync(engine.device)
        t2 = time.perf_counter()
        rows = [s.req.knobs + (s.rng.random(),) for s in seqs]
        tokens, logprobs = sample(logits, params_block(rows).to(logits.device),
                                  **batch_flags({s.req.knobs for s in seqs}))
        tokens, logprobs = torch.stack([tokens.double(), logprobs.double()]).tolist()
        t3 = time.perf_counter()
        engine.scheduler.postprocess(seqs, [int(t) for t in tokens], logprobs)
        t4 = time.perf_counter()
        for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            phases[k] += dt * 1e3 / steps
    for req in list(engine._requests.values()) or {s.req for s in engine.scheduler.running}:
        engine.scheduler.abort(req)
    return {k: round(v, 3) for k, v in phases.items()}


def hf_rows(path, prompts, batches, new_tokens, device, dtype, rows) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    run_hf(model, prompts[:1], 8, device)                                   # warm-up
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        for _ in range(5):
            model(torch.tensor(prompts[:1], device=device)[:, :16])
        sync(device)
    print(f"hf     one forward of 16 tokens, batch 1: {(time.perf_counter() - t0) / 5 * 1e3:.1f} ms", flush=True)
    for b in batches:
        dt = run_hf(model, prompts[:b], new_tokens, device)
        rows[b]["hf_tok_s"] = b * new_tokens / dt
        print(f"hf     batch {b}: {rows[b]['hf_tok_s']:.0f} tok/s ({dt:.2f} s)", flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="0.5B", help="Qwen2.5 shape (0.5B | 1.5B | 7B) or `small` (CPU)")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-hf", action="store_true", help="skip Hugging Face generate")
    ap.add_argument("--eager", action="store_true", help="native engine without CUDA graphs")
    ap.add_argument("--no-triton", action="store_true", help="native decode attention in torch (gather) instead")
    ap.add_argument("--profile", action="store_true", help="also print ms per decode phase at the largest batch")
    ap.add_argument("--threads", type=int, default=0, help="CPU: torch threads (0 = torch's default)")
    ap.add_argument("--out", default="rollout_throughput.json")
    a = ap.parse_args()
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          "cpu" if a.device == "auto" else a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batches = [int(b) for b in a.batches.split(",")]
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(a.shape, device, dtype, Path(tmp) / "model")
        vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
        prompts = torch.randint(3, vocab, (max(batches), a.prompt_len)).tolist()
        rows = {b: {"batch": b} for b in batches}
        max_len = a.prompt_len + a.new_tokens
        if not a.no_hf:  # first, so nothing of the native engine (threads, graphs, pool) is around
            hf_rows(path, prompts, batches, a.new_tokens, device, dtype, rows)
        engine = NativeEngine(path, device=str(device), max_num_seqs=max(batches), max_model_len=max_len,
                              kv_cache_tokens=None if device.type == "cuda" else max(batches) * max_len,
                              enforce_eager=a.eager)
        engine.runner.use_triton = engine.runner.use_triton and not a.no_triton
        for b in batches:
            run_native(engine, prompts[:b], a.new_tokens)                 # warm-up: graphs, allocator
            dt = run_native(engine, prompts[:b], a.new_tokens)
            rows[b]["native_tok_s"] = b * a.new_tokens / dt
            print(f"native batch {b}: {rows[b]['native_tok_s']:.0f} tok/s ({dt:.2f} s)", flush=True)
        if a.profile:
            rows[max(batches)]["native_decode_ms"] = profile_decode(engine, prompts[:max(batches)],
                                                                    min(64, a.new_tokens - 2))
            print(f"native decode phases at batch {max(batches)} (ms/step): {rows[max(batches)]['native_decode_ms']}")
        from hybridrl.rollout.native.sampler import fused_ok
        paths = {"triton_decode_attention": engine.runner.use_triton, "fused_sampler": engine.device.type == "cuda"
                 and fused_ok(), "cuda_graphs": engine.runner.use_graphs}
        asyncio.run(engine.close())

    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "command": " ".join(["python"] + sys.argv), "shape": a.shape, "dtype": str(dtype).replace("torch.", ""),
        "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, **paths,
        "results": list(rows.values()),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{report['device']}, {a.shape} shape, {report['dtype']}, prompt {a.prompt_len}, "
          f"{a.new_tokens} new tokens, torch {torch.__version__}")
    print("| batch | native tok/s | HF generate tok/s | native / HF |\n|---:|---:|---:|---:|")
    for r in rows.values():
        nat, hf = r["native_tok_s"], r.get("hf_tok_s")
        ratio = f"{nat / hf:.2f}x" if hf else "-"
        print(f"| {r['batch']} | {nat:.0f} | {f'{hf:.0f}' if hf else '-'} | {ratio} |")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
