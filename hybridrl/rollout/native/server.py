"""`hybridrl serve`: the native engine behind SGLang 0.5.17's HTTP subset, same JSON shapes.

    python -m hybridrl.rollout.native.server --model-path DIR --port 30000   # sglang.launch_server's flags
    curl -s localhost:30000/generate -d '{"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 8}, "return_logprob": true}'

Routes: /generate (token-in/token-out; `input_ids` one prompt or a batch), /health,
/health_generate, /server_info (+ /get_server_info), /model_info (+ /get_model_info; holds
`weight_version`, as in 0.5.17, where /weight_version answers 404), /flush_cache, /abort_request,
/release_memory_occupation, /resume_memory_occupation, /update_weights_from_disk,
/update_weights_from_tensor. Errors: HTTP 400 with {"error": {"message"}} or {"success": false, "message"}.

Every field is checked at the door (input_ids ints in the vocabulary, known sampling_params keys
with sane types and ranges, rid, return_logprob), so a bad request gets a 400 naming the field and
never reaches the engine's step loop, where it would hurt the requests in flight. A weight push
is all or nothing: a refused one (unknown name, wrong shape, NaN, no tensors) changes nothing.

/update_weights_from_tensor takes CPU tensors (no CUDA IPC here): each entry of
`serialized_named_tensors` is base64 of safetensors bytes, with `load_format="safetensors_b64"`
(`hybridrl.sync.encode_cpu_bucket`). /update_weights_from_disk reads the whole folder into host
memory before loading, so that a bad tensor anywhere in it is refused before anything changes.
/server_info reports `version="hybridrl-<version>"` and `sglang_api_version="0.5.17"`, which the
sglang client reads as SGLang 0.5.17.
Binds 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import glob
import importlib
import json
import os
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

import hybridrl
from hybridrl import HybridRLError, sync
from hybridrl.rollout.base import TAGS, GenerateOutput, SamplingParams
from hybridrl.rollout.native.engine import check_sampling, prompt_ids

SAMPLING_KEYS = {"max_new_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop_token_ids", "stop",
                 "ignore_eos"}
SEED_KEYS = ("sampling_seed", "seed")


def json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def to_sampling(d, field: str = "sampling_params") -> SamplingParams:
    """SGLang `sampling_params` dict → SamplingParams; unknown keys, wrong types and ranges → HybridRLError."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise HybridRLError(f"{field} must be a JSON object, got {json_type(d)}")
    unknown = sorted(set(d) - SAMPLING_KEYS - set(SEED_KEYS))
    if unknown:
        raise HybridRLError(f"{field} has unknown keys {unknown}; hybridrl serve knows "
                            f"{sorted(SAMPLING_KEYS | set(SEED_KEYS))}")
    kw = {k: v for k, v in d.items() if k in SAMPLING_KEYS and v is not None}
    if isinstance(kw.get("stop"), str):
        kw["stop"] = [kw["stop"]]
    seed = next((d[k] for k in SEED_KEYS if d.get(k) is not None), None)
    s = SamplingParams(**{"max_new_tokens": 128, **kw}, seed=seed)
    try:
        check_sampling(s)
    except HybridRLError as e:
        raise HybridRLError(f"{field}: {e}") from None
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


def parse_generate(body: dict, vocab: int | None) -> tuple[bool, list[tuple]]:
    """Check every field of a /generate body -> (one prompt?, [(ids, SamplingParams, rid, return_logprob)])."""
    ids = body.get("input_ids")
    if ids is None:
        raise HybridRLError("/generate needs `input_ids` (token ids; this server has no tokenizer, send tokens)")
    if not isinstance(ids, list) or not ids:
        got = "an empty list" if ids == [] else json_type(ids)
        raise HybridRLError(f"input_ids must be a non-empty list of token ids (or a list of such lists), got {got}")
    single = not isinstance(ids[0], list)
    prompts = [prompt_ids(ids, vocab)] if single else [prompt_ids(p, vocab, f"input_ids[{i}]")
                                                      for i, p in enumerate(ids)]
    n = len(prompts)
    samplings = [to_sampling(s, "sampling_params" if single else f"sampling_params[{i}]")
                 for i, s in enumerate(per_item(body.get("sampling_params"), n, "sampling_params"))]
    logprobs = per_item(body.get("return_logprob", False), n, "return_logprob")
    for lp in logprobs:
        if not isinstance(lp, bool) and lp is not None:
            raise HybridRLError(f"return_logprob must be true or false, got {json_type(lp)}")
    return single, list(zip(prompts, samplings, request_ids(body.get("rid"), n, single), map(bool, logprobs)))


def request_ids(rid, n: int, single: bool) -> list[str]:
    """`rid`: a string (a batch's prefix), a list of strings (one per prompt, batches only), or none."""
    base = uuid.uuid4().hex
    if rid is None or isinstance(rid, str):
        return [rid or base] if single else [f"{rid or base}_{i}" for i in range(n)]
    if isinstance(rid, list) and not single:
        if len(rid) != n or not all(r is None or isinstance(r, str) for r in rid):
            raise HybridRLError(f"rid must be a string or a list of {n} strings, one per prompt")
        return [r or f"{base}_{i}" for i, r in enumerate(rid)]
    raise HybridRLError(f"rid must be a string, got {json_type(rid)}")


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

    @app.exception_handler(HybridRLError)
    async def bad_request(request: Request, e: HybridRLError):
        return error(str(e))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):     # a JSON message, not a traceback page
        return error(f"hybridrl serve failed on {request.url.path}: {type(e).__name__}: {e}", 500)

    @app.post("/generate")
    @app.put("/generate")
    async def generate(request: Request):
        return JSONResponse(await _generate(engine, await _json(request), hf.get("vocab_size")))

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
    async def flush_cache():            # the native engine has no prefix cache; update_weights flushes anyway
        return PlainTextResponse("Cache flushed.\n")

    @app.post("/abort_request")
    async def abort_request(request: Request):
        body = await _json(request)
        rid, abort_all = body.get("rid"), body.get("abort_all", False)
        if not (rid is None or isinstance(rid, str)) or not isinstance(abort_all, bool):
            raise HybridRLError(f"/abort_request takes rid (a string) and abort_all (true or false); got rid "
                                f"{json_type(rid)}, abort_all {json_type(abort_all)}")
        if abort_all:
            await engine.abort(None)
        elif rid:
            await engine.abort(rid)
        return Response(status_code=200)

    @app.api_route("/release_memory_occupation", methods=["GET", "POST"])
    async def release(request: Request):
        tags = memory_tags(await _json(request))
        await engine.sleep(tags)
        asleep.update(tags)
        return JSONResponse(None)

    @app.api_route("/resume_memory_occupation", methods=["GET", "POST"])
    async def resume(request: Request):
        tags = memory_tags(await _json(request))
        await engine.wake(tags)
        asleep.difference_update(tags)
        return JSONResponse(None)

    async def update(buckets, body: dict, **extra):
        reply = await _update(engine, buckets, body, **extra)
        if reply.status_code == 200:
            asleep.clear()                  # update_weights wakes whatever was asleep
        return reply

    @app.post("/update_weights_from_tensor")
    async def update_from_tensor(request: Request):
        body = await _json(request)
        if body.get("load_format") != sync.CPU_LOAD_FORMAT:
            return result(False, f"hybridrl serve takes CPU tensors only: load_format={sync.CPU_LOAD_FORMAT!r} with "
                                 f"base64 safetensors bytes in serialized_named_tensors (got {body.get('load_format')!r})")
        payloads = body.get("serialized_named_tensors")
        if not isinstance(payloads, list) or not payloads or not all(isinstance(p, str) for p in payloads):
            return result(False, "empty or malformed weight update: serialized_named_tensors must be a non-empty "
                                 "list of base64 safetensors strings, one per TP rank")
        try:
            bucket = sync.decode_cpu_bucket(payloads[0])               # one entry per TP rank; we are rank 0
        except Exception as e:  # noqa: BLE001 - whatever the decoder says, the payload is the client's fault
            return result(False, f"serialized_named_tensors[0] is not base64 safetensors bytes "
                                 f"({type(e).__name__}: {e})")
        if not bucket:
            return result(False, "empty weight update: serialized_named_tensors[0] holds no tensors; nothing changed")
        return await update([bucket], body)

    @app.post("/update_weights_from_disk")
    async def update_from_disk(request: Request):
        body = await _json(request)
        path = body.get("model_path")
        if not isinstance(path, str) or not os.path.isdir(path):
            return result(False, f"model_path {path!r} is not a folder of safetensors files", num_paused_requests=0)
        if not glob.glob(os.path.join(glob.escape(path), "*.safetensors")):
            return result(False, f"no *.safetensors files in {path}: nothing to load, nothing changed",
                          num_paused_requests=0)
        try:
            buckets = list(sync.load_hf_folder(path))       # read it all first: the push is then all or nothing
        except Exception as e:  # noqa: BLE001 - a torn or foreign file is the sender's problem
            return result(False, f"cannot read the safetensors files in {path}: {type(e).__name__}: {e}",
                          num_paused_requests=0)
        return await update(buckets, body, num_paused_requests=0)

    return app


def memory_tags(body: dict) -> list[str]:
    tags = body.get("tags")
    if tags is None:
        return list(TAGS)
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise HybridRLError(f"tags must be a list of {list(TAGS)}, got {json_type(tags)}")
    return tags or list(TAGS)


async def _json(request) -> dict:
    """The request body as a JSON object ({} when empty); anything else is a HybridRLError (400)."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise HybridRLError(f"the request body is not JSON ({e}); send a JSON object") from None
    if not isinstance(body, dict):
        raise HybridRLError(f"the request body must be a JSON object, got {json_type(body)}")
    return body


def weight_version(given, current: int) -> int:
    """A push's `weight_version` (an integer or a string of one; SGLang sends strings), else current + 1."""
    if given is None:
        return current + 1
    if isinstance(given, int) and not isinstance(given, bool):
        return given
    if isinstance(given, str) and given.strip().lstrip("-").isdigit():
        return int(given)
    raise HybridRLError(f"weight_version must be an integer (or a string of one), got {given!r}")


async def _update(engine, buckets, body: dict, **extra):
    """Load buckets, set the version (given, else current + 1), optionally abort running requests first."""
    try:
        version = weight_version(body.get("weight_version"), engine.weight_version)
        if body.get("abort_all_requests"):
            await engine.abort(None)
        await engine.update_weights(buckets, version)
    except (HybridRLError, KeyError, ValueError, RuntimeError) as e:
        return result(False, f"{type(e).__name__}: {e}", **extra)
    return result(True, "Succeeded to update model weights.", **extra)


async def _generate(engine, body: dict, vocab: int | None):
    """SGLang /generate semantics: one prompt → one dict (n == 1) or a list of n; a batch → a flat list.

    Every prompt is checked before any starts; if one fails in the engine, the others are aborted."""
    single, jobs = parse_generate(body, vocab)
    tasks = [asyncio.ensure_future(engine.generate(p, s, request_id=r)) for p, s, r, _ in jobs]
    try:
        outs = await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    items = []
    for (_, _, rid, lp), group in zip(jobs, outs):
        ids_ = [rid] if len(group) == 1 else [f"{rid}-{i}" for i in range(len(group))]
        items += [output_json(o, i, lp) for o, i in zip(group, ids_)]
    return items[0] if single and len(items) == 1 else items


def _model_config(model_path: str) -> dict:
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
    engine = NativeEngine.from_config(cfg, model_path=cfg.model.path or None)
    engine.weights_backup = True     # a server may be woken without a push (as SGLang's --enable-weights-cpu-backup)
    return engine


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
