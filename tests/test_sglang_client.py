"""The sglang backend's client, launcher and shims on CPU, without SGLang.

In-process aiohttp servers play a flaky SGLang (503s, dropped connections, 4xx, a hanging
/generate); one `hybridrl serve` subprocess with a fake engine checks the launcher, abort on
cancel, and a server dying mid-request.
"""
import asyncio
import os
import signal
import sys
import time

import pytest
import torch
from aiohttp import web

from hybridrl import HybridRLError, sync
from hybridrl.config import Config
from hybridrl.rollout.base import SamplingParams
from hybridrl.rollout.sglang import compat
from hybridrl.rollout.sglang import launch as launcher
from hybridrl.rollout.sglang.client import HTTPClient, ServerError
from hybridrl.rollout.sglang.engine import SGLangEngine, parse_output, sampling_body

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TESTS = os.path.dirname(__file__)
FAKE_CMD = [sys.executable, "-m", "hybridrl.rollout.native.server", "--engine-factory", "sglang_fakes:make"]
INFO = {"version": "0.5.17", "weight_version": "default"}
NATIVE_INFO = {"version": "hybridrl-0.1.0", "sglang_api_version": "0.5.17", "weight_version": "0"}


def run(coro):
    return asyncio.run(coro)


async def start_app(routes, **runner_kw) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app, shutdown_timeout=0.2, **runner_kw)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


# ---- HTTP client: retries, no retry on 4xx, timeouts ---------------------------------------
def test_retries_on_503_then_succeeds():
    hits = []

    async def handler(request):
        hits.append(request.headers.get("X-Request-Id"))
        if len(hits) <= 2:
            return web.Response(status=503, text="busy")
        return web.json_response({"ok": True})

    async def main():
        runner, url = await start_app([web.post("/x", handler)])
        client = HTTPClient(url, timeout=10, retries=3, backoff=0.01)
        try:
            return await client.post("/x", {"a": 1})
        finally:
            await client.close()
            await runner.cleanup()
    assert run(main()) == {"ok": True}
    assert len(hits) == 3 and len(set(hits)) == 1 and hits[0]      # one request id across retries


def test_retries_on_dropped_connections():
    hits = []

    async def handler(request):
        hits.append(1)
        if len(hits) <= 2:
            request.transport.close()           # drop the connection without a reply
            await asyncio.sleep(0.1)
        return web.json_response({"n": len(hits)})

    async def main():
        runner, url = await start_app([web.post("/x", handler)])
        client = HTTPClient(url, timeout=10, retries=3, backoff=0.01)
        try:
            return await client.post("/x")
        finally:
            await client.close()
            await runner.cleanup()
    assert run(main()) == {"n": 3}


def test_idle_pooled_connections_expire_before_the_servers_keepalive():
    """SGLang's uvicorn drops idle connections after 5 s; reusing one whose close the client has not yet
    processed failed a weight push on the GPU with "Server disconnected"."""
    async def handler(request):
        return web.json_response({"ok": True})

    async def main():
        runner, url = await start_app([web.post("/x", handler)], keepalive_timeout=0.5)
        client = HTTPClient(url, timeout=10, retries=0, keepalive=0.2)
        try:
            await client.post("/x")
            time.sleep(0.8)         # loop blocked (as by a slow import): the server's FIN is not seen yet
            return await client.post("/x")
        finally:
            await client.close()
            await runner.cleanup()
    assert run(main()) == {"ok": True}


def test_4xx_is_not_retried_and_carries_the_reason():
    hits = []

    async def handler(request):
        hits.append(1)
        return web.json_response({"error": {"message": "bad input_ids"}}, status=400)

    async def main():
        runner, url = await start_app([web.post("/x", handler)])
        client = HTTPClient(url, timeout=10, retries=3, backoff=0.01)
        try:
            await client.post("/x")
        finally:
            await client.close()
            await runner.cleanup()
    with pytest.raises(ServerError, match="bad input_ids") as e:
        run(main())
    assert e.value.status == 400 and len(hits) == 1


def test_unreachable_server_gives_a_clear_error_not_a_hang():
    port = launcher.find_free_port(41000)

    async def main():
        client = HTTPClient(f"http://127.0.0.1:{port}", timeout=5, retries=2, backoff=0.01)
        try:
            await client.get("/health")
        finally:
            await client.close()
    with pytest.raises(HybridRLError, match="failed after 3 attempts"):
        run(main())


def test_request_timeout_is_reported_and_the_request_aborted():
    aborted = []

    async def slow(request):
        await asyncio.sleep(30)
        return web.json_response({})

    async def abort(request):
        aborted.append(await request.json())
        return web.Response(status=200)

    async def main():
        runner, url = await start_app([web.post("/generate", slow), web.post("/abort_request", abort)])
        engine = SGLangEngine(url, INFO, request_timeout=0.5, retries=0)
        try:
            await engine.generate([1, 2], SamplingParams(max_new_tokens=4), request_id="req-7")
        finally:
            await engine.close()
            await runner.cleanup()
    with pytest.raises(HybridRLError, match="timed out"):
        run(main())
    assert aborted == [{"rid": "req-7", "abort_all": False}]


def test_cancel_sends_abort_for_the_request_id():
    aborted, started = [], asyncio.Event

    async def main():
        ev = started()

        async def hang(request):
            ev.set()
            await asyncio.sleep(30)
            return web.json_response({})

        async def abort(request):
            aborted.append(await request.json())
            return web.Response(status=200)

        runner, url = await start_app([web.post("/generate", hang), web.post("/abort_request", abort)])
        engine = SGLangEngine(url, INFO)
        task = asyncio.ensure_future(engine.generate([1], SamplingParams(max_new_tokens=4), request_id="r1"))
        await asyncio.wait_for(ev.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await engine.close()
        await runner.cleanup()
    run(main())
    assert aborted == [{"rid": "r1", "abort_all": False}]


def test_sleep_and_wake_send_each_tag_once():
    calls = []

    def route(path):
        async def handler(request):
            calls.append((path, (await request.json())["tags"]))
            return web.json_response(None)
        return web.post(path, handler)

    async def main():
        runner, url = await start_app([route("/release_memory_occupation"), route("/resume_memory_occupation")])
        engine = SGLangEngine(url, INFO)
        try:
            await engine.wake(["weights"])                 # first sync of a fresh server: nothing is released
            await engine.sleep()
            await engine.sleep(["kv_cache"])
            await engine.wake(["weights"])
            await engine.wake(["kv_cache", "weights"])
            with pytest.raises(HybridRLError, match="unknown memory tags"):
                await engine.sleep(["gpu"])
        finally:
            await engine.close()
            await runner.cleanup()
    run(main())
    assert calls == [("/release_memory_occupation", ["weights", "kv_cache"]),
                     ("/resume_memory_occupation", ["weights"]), ("/resume_memory_occupation", ["kv_cache"])]


def test_update_weights_is_the_whole_sync_with_one_flush():
    """sleep → update_weights: resume weights, push each bucket (no flush in the bodies), flush once (a 400
    while requests run is retried), check the version, resume the KV cache; a sync without sleep wakes nothing."""
    calls, state = [], {"version": "default", "flush_busy": 1}

    def route(path, reply=None):
        async def handler(request):
            body = await request.json() if request.can_read_body else None
            calls.append((path, body.get("tags") if path.endswith("occupation") else None))
            if path == "/update_weights_from_tensor":
                assert body["flush_cache"] is False and body["load_format"] == sync.CPU_LOAD_FORMAT
                state["version"] = body["weight_version"]
            if path == "/flush_cache" and state["flush_busy"]:
                state["flush_busy"] -= 1
                return web.json_response({"message": "Cache not flushed: pending requests"}, status=400)
            return web.json_response({"success": True} if "update" in path else None)
        return web.post(path, handler)

    async def model_info(request):
        calls.append(("/model_info", None))
        return web.json_response({"weight_version": state["version"]})

    async def main():
        routes = [route(p) for p in ("/release_memory_occupation", "/resume_memory_occupation",
                                     "/update_weights_from_tensor", "/flush_cache")]
        runner, url = await start_app(routes + [web.get("/model_info", model_info)])
        engine = SGLangEngine(url, NATIVE_INFO)
        buckets = [[("a", torch.ones(2))], [("b", torch.zeros(3))]]
        try:
            await engine.sleep(["kv_cache", "weights"])
            await engine.update_weights(iter(buckets), 3)
            first = list(calls)
            calls.clear()
            await engine.update_weights(iter(buckets), 4)
            return first, list(calls), engine.weight_version
        finally:
            await engine.close()
            await runner.cleanup()
    first, second, version = run(main())
    push = [("/update_weights_from_tensor", None)] * 2
    flush = [("/flush_cache", None)] * 2                    # one flush: refused once (busy), then done
    assert first == [("/release_memory_occupation", ["kv_cache", "weights"]), ("/resume_memory_occupation", ["weights"]),
                     *push, *flush, ("/model_info", None), ("/resume_memory_occupation", ["kv_cache"])]
    assert second == [*push, ("/flush_cache", None), ("/model_info", None)] and version == 4


def test_update_weights_refuses_a_server_that_kept_its_old_version():
    async def ok(request):
        return web.json_response({"success": True})

    async def model_info(request):
        return web.json_response({"weight_version": "2"})

    async def main():
        runner, url = await start_app([web.post("/update_weights_from_tensor", ok), web.post("/flush_cache", ok),
                                       web.get("/model_info", model_info)])
        engine = SGLangEngine(url, NATIVE_INFO)
        try:
            await engine.update_weights([[("a", torch.ones(2))]], 3)
        finally:
            assert engine.weight_version == 0
            await engine.close()
            await runner.cleanup()
    with pytest.raises(HybridRLError, match="reports weight_version='2', expected 3"):
        run(main())


def test_transport_is_chosen_once_by_name():
    engine = SGLangEngine("http://127.0.0.1:1", INFO, weight_sync="disk")
    assert type(engine.transport).__name__ == "DiskTransport" and engine.weight_sync == "disk"
    with pytest.raises(HybridRLError, match=r"unknown rollout.weight_sync='shm': choose one of tensor \| disk \| nccl"):
        SGLangEngine("http://127.0.0.1:1", INFO, weight_sync="shm")


# ---- version shims ----------------------------------------------------------------------------
def test_version_check_and_shims():
    assert compat.parse_version("0.5.17.post1") == (0, 5, 17)
    assert compat.check_version({"version": "0.4.8"}) == ((0, 4, 8), False)
    assert compat.check_version({"version": "hybridrl-0.1.0", "sglang_api_version": "0.5.17"}) == ((0, 5, 17), True)
    for bad in ("0.4.7", "0.6.0", "1.0"):
        with pytest.raises(HybridRLError, match=r">=0.4.8 <0.6"):
            compat.check_version({"version": bad})
    assert compat.tp_memory_check_env((0, 5, 17), check=False) == {"SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK": "false"}
    assert compat.tp_memory_check_env((0, 4, 9), check=False) == {"SGL_DISABLE_TP_MEMORY_INBALANCE_CHECK": "true"}


def test_unsupported_server_version_is_refused_with_fallback_to_get_server_info():
    seen = []

    async def get_server_info(request):
        seen.append(request.path)
        return web.json_response({"version": "0.3.6"})

    async def model_info(request):
        return web.json_response({"weight_version": "default"})

    async def main():
        runner, url = await start_app([web.get("/get_server_info", get_server_info),
                                       web.get("/get_model_info", model_info)])
        try:
            cfg = Config()
            cfg.rollout.server_url = url
            await asyncio.to_thread(SGLangEngine.from_config, cfg)
        finally:
            await runner.cleanup()
    with pytest.raises(HybridRLError, match="0.3.6 is not supported"):
        run(main())
    assert seen == ["/get_server_info"]          # /server_info answered 404 first, then the old name


# ---- mapping ----------------------------------------------------------------------------------
def test_sampling_and_output_mapping():
    body = sampling_body(SamplingParams(max_new_tokens=8, temperature=0.7, top_k=5, n=2, stop_token_ids=[3], seed=1))
    assert body["max_new_tokens"] == 8 and body["top_k"] == 5 and body["n"] == 2
    assert body["stop_token_ids"] == [3] and body["sampling_seed"] == 1 and "stop" not in body
    item = {"output_ids": [5, 3], "meta_info": {"finish_reason": {"type": "stop", "matched": 3}, "prompt_tokens": 4,
            "completion_tokens": 2, "weight_version": "7", "output_token_logprobs": [[-0.5, 5, None], [-1.25, 3, None]]}}
    out = parse_output(item, default_version=0)
    assert (out.output_ids, out.logprobs, out.finish_reason, out.weight_version) == ([5, 3], [-0.5, -1.25], "stop", 7)
    item["meta_info"].update(finish_reason={"type": "abort", "message": "x"}, weight_version="default")
    assert parse_output(item, default_version=2).finish_reason == "abort"
    assert parse_output(item, default_version=2).weight_version == 2


def test_bucketize_and_cpu_wire_format():
    named = [(f"t{i}", torch.full((256, 1024), float(i))) for i in range(5)]     # 1 MB each (fp32)
    buckets = list(sync.bucketize(named, bucket_mb=2))
    assert [len(b) for b in buckets] == [2, 2, 1]
    assert [n for b in buckets for n, _ in b] == [n for n, _ in named]
    assert sync.bucket_label(buckets[0]) == "t0 .. t1 (2 tensors, 2.0 MB)"
    back = sync.decode_cpu_bucket(sync.encode_cpu_bucket(buckets[1]))
    assert [n for n, _ in back] == ["t2", "t3"] and torch.equal(back[1][1], named[3][1])


# ---- launcher ---------------------------------------------------------------------------------
def test_server_flags_map_the_config():
    cfg = Config()
    r = cfg.rollout
    r.tensor_model_parallel_size, r.gpu_memory_utilization, r.enforce_eager, r.max_num_seqs = 2, 0.7, True, 64
    r.free_cache_engine = True
    r.attention_backend, r.load_format, r.dtype = "triton", "dummy", "bfloat16"
    r.engine_kwargs = {"sglang": {"chunked_prefill_size": 4096, "enable_foo": True, "disable_bar": False}}
    flags = launcher.server_flags(cfg, "/m", "127.0.0.1", 30001)
    joined = " ".join(flags)
    for part in ("--model-path /m", "--port 30001", "--tp-size 2", "--mem-fraction-static 0.7", "--disable-cuda-graph",
                 "--max-running-requests 64", "--attention-backend triton", "--load-format dummy", "--dtype bfloat16",
                 "--enable-memory-saver", "--skip-tokenizer-init", "--chunked-prefill-size 4096", "--enable-foo"):
        assert part in joined
    assert "--disable-bar" not in joined
    r.free_cache_engine = False
    assert "--enable-memory-saver" not in launcher.server_flags(cfg, "/m", "127.0.0.1", 1)


def test_real_sglang_starts_with_the_tp_memory_check_off_and_says_so(monkeypatch, capsys):
    monkeypatch.setattr(compat, "installed_sglang_version", lambda: (0, 5, 17))
    env = launcher.launch_env(real_sglang=True)
    assert env["SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK"] == "false" and env["NCCL_CUMEM_ENABLE"] == "0"
    assert "SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK=false" in capsys.readouterr().err
    monkeypatch.setattr(compat, "installed_sglang_version", lambda: (0, 4, 9))
    assert launcher.launch_env(real_sglang=True)["SGL_DISABLE_TP_MEMORY_INBALANCE_CHECK"] == "true"
    capsys.readouterr()
    env = launcher.launch_env(real_sglang=False)           # `hybridrl serve`: no SGLang env, no line
    assert not any("INBALANCE" in k for k in env) and capsys.readouterr().err == ""


def test_missing_sglang_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(launcher.importlib.util, "find_spec", lambda name: None)
    cfg = Config()
    with pytest.raises(HybridRLError, match=r"pip install hybridrl\[sglang\]"):
        SGLangEngine.from_config(cfg, "/some/model", run_dir=str(tmp_path))


def test_server_exiting_during_start_shows_its_last_log_lines(tmp_path):
    cfg = Config()
    cfg.rollout.server_start_timeout = 30
    cmd = [sys.executable, "-c", "import sys; print('loading...'); print('CUDA out of memory: boom'); sys.exit(3)"]
    with pytest.raises(HybridRLError, match="(?s)exited with code 3.*CUDA out of memory: boom"):
        SGLangEngine.from_config(cfg, "/m", launch_cmd=cmd, run_dir=str(tmp_path))
    assert "boom" in (tmp_path / launcher.LOG_NAME).read_text()


def test_server_never_healthy_times_out_and_is_stopped(tmp_path):
    cfg = Config()
    cfg.rollout.server_start_timeout = 1.5
    cmd = [sys.executable, "-c", "import time; print('stuck', flush=True); time.sleep(60)"]
    with pytest.raises(HybridRLError, match="(?s)not healthy within 2 s.*stuck"):
        launcher.launch(cfg, "/m", str(tmp_path), launch_cmd=cmd)


def test_port_in_use_moves_to_another_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        taken = s.getsockname()[1]
        assert not launcher.port_is_free(taken)
        assert launcher.find_free_port(taken) != taken


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory):
    """`hybridrl serve` with the fake engine, started through the launcher (one process for this module)."""
    cfg = Config()
    cfg.rollout.server_start_timeout = 60
    run_dir = str(tmp_path_factory.mktemp("fake"))
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = TESTS + (os.pathsep + env_path if env_path else "")
    try:
        engine = SGLangEngine.from_config(cfg, "/no/model", launch_cmd=FAKE_CMD, run_dir=run_dir)
    finally:
        os.environ["PYTHONPATH"] = env_path
    engine.client.retries, engine.client.backoff = 1, 0.05
    yield engine
    run(engine.close())


def test_launched_server_abort_and_cancel(fake_server):
    engine = fake_server
    assert engine.native and engine.process.alive and engine.api_version == (0, 5, 17)

    async def main():
        long = SamplingParams(max_new_tokens=2000, temperature=1.0, seed=3)
        task = asyncio.ensure_future(engine.generate([1, 2, 3], long, request_id="long-1"))
        await asyncio.sleep(0.3)
        await engine.abort("long-1")
        out = (await asyncio.wait_for(task, 20))[0]
        assert out.finish_reason == "abort" and 0 < len(out.output_ids) < 2000
        assert len(out.logprobs) == len(out.output_ids)
        many = [engine.generate([i], SamplingParams(max_new_tokens=2000)) for i in range(3)]
        tasks = [asyncio.ensure_future(m) for m in many]
        await asyncio.sleep(0.3)
        await engine.abort()                                    # abort all
        outs = await asyncio.wait_for(asyncio.gather(*tasks), 20)
        assert all(o[0].finish_reason == "abort" for o in outs)
        short = await engine.generate([4], SamplingParams(max_new_tokens=3, n=2))
        assert [o.finish_reason for o in short] == ["length", "length"] and len(short[1].output_ids) == 3
    run(main())


def test_attach_to_a_running_server_leaves_it_running(fake_server):
    cfg = Config()
    cfg.rollout.server_url = fake_server.url + "/"
    attached = SGLangEngine.from_config(cfg)
    assert attached.process is None and attached.native
    out = run(attached.generate([7], SamplingParams(max_new_tokens=4, temperature=0.0)))[0]
    assert out.finish_reason == "length" and len(out.output_ids) == 4 and len(out.logprobs) == 4
    run(attached.close())
    assert fake_server.process.alive                    # closing an attached engine stops nothing


def test_server_dying_mid_request_is_a_clear_error(fake_server):
    engine = fake_server
    engine.restarts_left = 0                 # rollout.server_restarts=0: no second chance, a clear error at once

    async def main():
        task = asyncio.ensure_future(engine.generate([1], SamplingParams(max_new_tokens=5000)))
        await asyncio.sleep(0.5)
        os.killpg(engine.process.proc.pid, signal.SIGKILL)
        await asyncio.wait_for(task, 30)
    with pytest.raises(HybridRLError, match="(?s)exited with code -9.*last lines"):
        run(main())
