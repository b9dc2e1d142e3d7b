"""`hybridrl serve`: the native engine behind SGLang 0.5.17's HTTP subset, same JSON shapes.

    python -m hybridrl.rollout.native.server --model-path DIR --port 30000   # sglang.launch_server's flags
    curl -s localhost:30000/generate -d '{"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 8}, "return_logprob": true}'

Routes: /generate (token-in/token-out; `input_ids` one prompt or a batch), /health,
/health_generate, /server_info (+ /get_server_info), /model_info (+ /get_model_info; holds
`weight_version`, as in 0.5.17, where /weight_version answers 404), /flush_cache, /abort_request,
/release_memory_occupation, /resume_memory_occupation, /update_weights_from_disk,
/update_weights_from_tensor. Errors: HTTP 400 with {"error": {"message"}} or {"success": false, "message"}.

/update_weights_from_tensor takes CPU tensors (no CUDA IPC here): each entry of
`serialized_named_tensors` is base64 of safetensors bytes, with `load_format="safetensors_b64"`
(`hybridrl.sync.encode_cpu_bucket`). /server_info reports `version="hybridrl-<version>"` and
`sglang_api_version="0.5.17"`, which the sglang client reads as SGLang 0.5.17.
Binds 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

import hybridrl
from hybridrl import HybridRLError, sync
from hybridrl.rollout.base import TAGS, GenerateOutput, SamplingParams

SAMPLING_KEYS = {"max_new_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop_token_ids", "stop",
                 "ignore_eos"}


def to_sampling(d: dict | None) -> SamplingParams:
    """SGLang `sampling_params` dict → SamplingParams (unknown keys are ignored, as SGLang's extras)."""
    d = dict(d or {})
    kw = {k: d[k] for k in SAMPLING_KEYS if d.get(k) is not None}
    seed = d.get("sampling_seed", d.get("seed"))
    s = SamplingParams(**{"max_new_tokens": 128, **kw}, seed=seed)
    s.stop_token_ids, s.stop = list(s.stop_token_ids), [s.stop] if isinstance(s.stop, str) else list(s.stop)
    s.validate()
    return s


def finish_json(out: GenerateOutput) -> dict:
    if out.finish_reason == "length":
        return {"type": "length", "length": out.completion_tokens}
    if out.finish_reason == "stop":
        return {"type": "stop", "matched": out.output_ids[-1] if out.output_ids else None}
    return {"type": "abort", "message": "aborted", "status_code": None, "err_type": None}


def output_json(out: GenerateOutput, rid: str, logprob: bool) -> dict:
    meta = {"id": rid, "finish_reason": finish_json(out), "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens, "cached_tokens": 0,
            "weight_version": str(out.weight_version)}
    if logprob:
        meta["output_token_logprobs"] = [[lp, tok, None] for lp, tok in zip(out.logprobs, out.output_ids)]
    return {"text": "", "output_ids": list(out.output_ids), "meta_info": meta}


def per_item(value, n: int, name: str) -> list:
    """A batch field: one value for all prompts, or a list of one per prompt."""
    if isinstance(value, list):
        if len(value) != n:
            raise HybridRLError(f"{name} has {len(value)} entries for {n} prompts")
        return value
    return [value] * n


def error(message: str, status: int = 400):
    return JSONResponse({"error": {"message": message}}, status_code=status)


def result(ok: bool, message: str, **extra):
    return JSONResponse({"success": ok, "message": message, **extra}, status_code=200 if ok else 400)


def build_app(engine, model_path: str = "", model_config: dict | None = None):
    """A FastAPI app serving `engine` (any RolloutEngine with a `weight_version` attribute)."""
    app = FastAPI(title="hybridrl serve")
    asleep: set[str] = set()
    hf = model_config or {}

    def model_info() -> dict:
        return {"model_path": model_path, "tokenizer_path": model_path, "is_generation": True,
                "preferred_sampling_params": None, "weight_version": str(engine.weight_version),
                "has_image_understanding": False, "has_audio_understanding": False,
                "model_type": hf.get("model_type"), "architectures": hf.get("architectures")}

    def server_info() -> dict:
        return {"version": f"hybridrl-{hybridrl.__version__}", "sglang_api_version": "0.5.17",
                "engine": type(engine).__name__, "model_path": model_path, "tp_size": 1,
                "skip_tokenizer_init": True, "weight_version": str(engine.weight_version),
                "internal_states": [], "memory_released": sorted(asleep)}

    @app.post("/generate")
    @app.put("/generate")
    async def generate(request: Request):
        try:
            body = await request.json()
            return JSONResponse(await _generate(engine, body))
        except (HybridRLError, ValueError, TypeError) as e:
            return error(str(e))

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate():
        if asleep:
            return Response(status_code=200)          # memory released: nothing to run, like a busy SGLang
        try:
            await asyncio.wait_for(engine.generate([0], SamplingParams(max_new_tokens=1, temperature=0.0)), 20)
            return Response(status_code=200)
        except Exception:
            return Response(status_code=503)

    for path in ("/model_info", "/get_model_info"):
        app.get(path)(model_info)
    for path in ("/server_info", "/get_server_info"):
        app.get(path)(server_info)

    @app.get("/weight_version")
    @app.get("/get_weight_version")
    async def weight_version():
        return JSONResponse({"detail": "Endpoint '/get_weight_version' or '/weight_version' is deprecated. "
                                       "Please use '/model_info' instead."}, status_code=404)

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        await engine.flush_cache()
        return PlainTextResponse("Cache flushed.\n")

    @app.post("/abort_request")
    async def abort_request(request: Request):
        body = await _json(request)
        if body.get("abort_all"):
            await engine.abort(None)
        elif body.get("rid"):
            await engine.abort(str(body["rid"]))
        return Response(status_code=200)

    @app.api_route("/release_memory_occupation", methods=["GET", "POST"])
    async def release(request: Request):
        tags = (await _json(request)).get("tags") or list(TAGS)
        try:
            await engine.sleep(tags)
        except (HybridRLError, ValueError) as e:
            return error(str(e))
        asleep.update(tags)
        return JSONResponse(None)

    @app.api_route("/resume_memory_occupation", methods=["GET", "POST"])
    async def resume(request: Request):
        tags = (await _json(request)).get("tags") or list(TAGS)
        try:
            await engine.wake(tags)
        except (HybridRLError, ValueError) as e:
            return error(str(e))
        asleep.difference_update(tags)
        return JSONResponse(None)

    @app.post("/update_weights_from_tensor")
    async def update_from_tensor(request: Request):
        body = await _json(request)
        if body.get("load_format") != sync.CPU_LOAD_FORMAT:
            return result(False, f"hybridrl serve takes CPU tensors only: load_format={sync.CPU_LOAD_FORMAT!r} with "
                                 f"base64 safetensors bytes in serialized_named_tensors (got {body.get('load_format')!r})")
        payloads = body.get("serialized_named_tensors") or []
        buckets = (sync.decode_cpu_bucket(p) for p in payloads[:1])    # one entry per TP rank; we are rank 0
        return await _update(engine, buckets, body)

    @app.post("/update_weights_from_disk")
    async def update_from_disk(request: Request):
        body = await _json(request)
        path = body.get("model_path") or ""
        if not os.path.isdir(path):
            return result(False, f"model_path {path!r} is not a folder of safetensors files", num_paused_requests=0)
        return await _update(engine, sync.load_hf_folder(path), body, num_paused_requests=0)

    return app


async def _json(request) -> dict:
    raw = await request.body()
    if not raw:
        return {}
    import json
    body = json.loads(raw)
    return body if isinstance(body, dict) else {}


async def _update(engine, buckets, body: dict, **extra):
    """Load buckets, set the version (given, else current + 1), optionally abort running requests first."""
    try:
        if body.get("abort_all_requests"):
            await engine.abort(None)
        given = body.get("weight_version")
        version = int(given) if given is not None else engine.weight_version + 1
        await engine.update_weights(buckets, version)
        if body.get("flush_cache", True):
            await engine.flush_cache()
    except (HybridRLError, KeyError, ValueError, RuntimeError) as e:
        return result(False, f"{type(e).__name__}: {e}", **extra)
    return result(True, "Succeeded to update model weights.", **extra)


async def _generate(engine, body: dict):
    """SGLang /generate semantics: one prompt → one dict (n == 1) or a list of n; a batch → a flat list."""
    ids = body.get("input_ids")
    if not isinstance(ids, list) or not ids:
        raise HybridRLError("/generate needs `input_ids` (token ids; this server has no tokenizer, send tokens)")
    single = not isinstance(ids[0], list)
    prompts = [ids] if single else ids
    rid = body.get("rid") or uuid.uuid4().hex
    rids = [rid] if single else per_item(rid if isinstance(rid, list) else None, len(prompts), "rid")
    rids = [r or f"{rid}_{i}" for i, r in enumerate(rids)]
    samplings = [to_sampling(s) for s in per_item(body.get("sampling_params"), len(prompts), "sampling_params")]
    logprob = per_item(body.get("return_logprob") or False, len(prompts), "return_logprob")
    outs = await asyncio.gather(*(engine.generate(p, s, request_id=r) for p, s, r in zip(prompts, samplings, rids)))
    items = []
    for rid, lp, group in zip(rids, logprob, outs):
        ids_ = [rid] if len(group) == 1 else [f"{rid}-{i}" for i in range(len(group))]
        items += [output_json(o, i, bool(lp)) for o, i in zip(group, ids_)]
    return items[0] if single and len(items) == 1 else items


def _model_config(model_path: str) -> dict:
    import json
    try:
        with open(os.path.join(model_path, "config.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def make_engine(cfg, factory: str = ""):
    """NativeEngine.from_config, or `module:function(cfg)` when a factory is named (tests, custom engines)."""
    if factory:
        module, fn = factory.split(":")
        return getattr(importlib.import_module(module), fn)(cfg)
    from hybridrl.rollout.native.engine import NativeEngine
    return NativeEngine.from_config(cfg, model_path=cfg.model.path or None)


def serve(cfg, host: str = "127.0.0.1", port: int = 30000, engine_factory: str = "") -> None:
    """Build the engine from cfg and serve it until interrupted."""
    import uvicorn
    engine = make_engine(cfg, engine_factory)
    model_path = cfg.model.path
    app = build_app(engine, model_path, _model_config(model_path) if model_path else {})
    level = {"warn": "warning"}.get(cfg.rollout.log_level, cfg.rollout.log_level)
    uvicorn.run(app, host=host, port=port, log_level=level, access_log=False, timeout_graceful_shutdown=5)


def parse_args(argv=None):
    """The `sglang.launch_server` flags we use; the rest are accepted and ignored."""
    p = argparse.ArgumentParser(prog="hybridrl serve", description=__doc__.split("\n")[0])
    p.add_argument("--model-path", default="")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--mem-fraction-static", type=float, default=None)
    p.add_argument("--max-running-requests", type=int, default=None)
    p.add_argument("--random-seed", type=int, default=None)
    p.add_argument("--log-level", default="warning")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (ours; not an SGLang flag)")
    p.add_argument("--engine-factory", default="", help="module:function(cfg) building the engine (tests)")
    return p.parse_known_args(argv)[0]


def config_from_args(a):
    from hybridrl.config import Config
    cfg = Config()
    cfg.model.path, cfg.rollout.dtype, cfg.rollout.log_level, cfg.trainer.device = a.model_path, a.dtype, a.log_level, a.device
    if a.mem_fraction_static is not None:
        cfg.rollout.gpu_memory_utilization = a.mem_fraction_static
    if a.max_running_requests is not None:
        cfg.rollout.max_num_seqs = a.max_running_requests
    if a.random_seed is not None:
        cfg.rollout.seed = a.random_seed
    return cfg


def main(argv=None) -> None:
    a = parse_args(argv)
    try:
        serve(config_from_args(a), a.host, a.port, a.engine_factory)
    except HybridRLError as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
