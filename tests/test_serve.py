"""`hybridrl serve` as a real subprocess, driven by the sglang client (CPU, tiny Qwen2).

One server process for the module (started through the sglang launcher), checked against the
in-process NativeEngine on the same weights: greedy tokens and log-probs, batches and n,
weight pushes from tensor and from disk (outputs change, version reported), a rejected weight
name, sleep / wake, abort; plus the raw JSON shapes of SGLang 0.5.17's routes, refused pushes that
change nothing, and bad requests that get a 400 while a healthy one in flight completes.
"""
import asyncio
import json
import re
import sys
import urllib.request

import pytest
import torch

from hybridrl import HybridRLError
from hybridrl.config import Config
from hybridrl.rollout.base import SamplingParams
from hybridrl.rollout.native.engine import NativeEngine
from hybridrl.rollout.sglang.engine import SGLangEngine

SERVE_CMD = [sys.executable, "-m", "hybridrl.rollout.native.server", "--device", "cpu"]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 30, 40], list(range(40, 72))]


def greedy(max_new=10, **kw):
    return SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True, **kw)


def gen_all(engine, prompts, sp):
    async def main():
        return await asyncio.gather(*[engine.generate(p, sp) for p in prompts])
    return asyncio.run(main())


def original_weights(model_dir):
    from hybridrl.rollout.native.loader import safetensors_weights
    return dict(safetensors_weights(model_dir))


@pytest.fixture(scope="module")
def server(tiny_qwen2_dir, tmp_path_factory):
    cfg = Config()
    cfg.model.path = tiny_qwen2_dir
    cfg.rollout.server_start_timeout, cfg.rollout.max_num_seqs = 120, 32
    engine = SGLangEngine.from_config(cfg, launch_cmd=SERVE_CMD, run_dir=str(tmp_path_factory.mktemp("serve")))
    yield engine
    asyncio.run(engine.close())


@pytest.fixture(scope="module")
def local(tiny_qwen2_dir):
    return NativeEngine(tiny_qwen2_dir, device="cpu", kv_cache_tokens=4096)


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def post(url, data) -> tuple[int, dict | None]:
    """POST raw bytes (or a JSON-able object) -> (status, JSON reply or None)."""
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    req = urllib.request.Request(url, raw, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, text = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, None


def message(reply: dict) -> str:
    return reply["error"]["message"] if "error" in reply else reply["message"]


def test_routes_have_sglang_shapes(server):
    info = get(server.url + "/server_info")
    assert info["version"].startswith("hybridrl-") and info["sglang_api_version"] == "0.5.17"
    assert get(server.url + "/get_server_info")["version"] == info["version"]
    model = get(server.url + "/get_model_info")
    assert model["weight_version"] == "0" and model["architectures"] == ["Qwen2ForCausalLM"]
    body = {"input_ids": PROMPTS[1], "return_logprob": True,
            "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}}
    req = urllib.request.Request(server.url + "/generate", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        out = json.loads(r.read())
    meta = out["meta_info"]
    assert len(out["output_ids"]) == 4 and meta["finish_reason"] == {"type": "length", "length": 4}
    assert [t for _, t, _ in meta["output_token_logprobs"]] == out["output_ids"]
    assert meta["prompt_tokens"] == 3 and meta["completion_tokens"] == 4 and meta["weight_version"] == "0"
    assert urllib.request.urlopen(server.url + "/health_generate", timeout=30).status == 200
    with pytest.raises(urllib.error.HTTPError) as e:                  # as in 0.5.17: use /model_info
        urllib.request.urlopen(server.url + "/weight_version", timeout=10)
    assert e.value.code == 404


def test_generate_matches_in_process_engine(server, local):
    remote = gen_all(server, PROMPTS, greedy())
    ref = gen_all(local, PROMPTS, greedy())
    for r, l in zip(remote, ref):
        assert r[0].output_ids == l[0].output_ids
        assert r[0].logprobs == pytest.approx(l[0].logprobs, abs=1e-5)
        assert r[0].finish_reason == "length" and r[0].weight_version == 0
    seeded = SamplingParams(max_new_tokens=8, temperature=1.0, n=3, seed=11, ignore_eos=True)
    r, l = gen_all(server, PROMPTS[:1], seeded)[0], gen_all(local, PROMPTS[:1], seeded)[0]
    assert len(r) == 3 and [o.output_ids for o in r] == [o.output_ids for o in l]
    assert r[2].logprobs == pytest.approx(l[2].logprobs, abs=1e-5)


def test_weight_push_from_tensor_and_disk(server, local, tiny_qwen2_dir):
    before = [o[0].output_ids for o in gen_all(server, PROMPTS, greedy())]
    original = original_weights(tiny_qwen2_dir)
    torch.manual_seed(1)
    changed = [(k, torch.randn_like(v)) for k, v in original.items() if "layers.1" in k]
    server.weight_sync = "tensor"
    asyncio.run(server.update_weights([changed[:3], changed[3:]], 5))
    asyncio.run(local.update_weights([changed], 5))
    after = gen_all(server, PROMPTS, greedy())
    assert [o[0].output_ids for o in after] != before
    assert [o[0].output_ids for o in after] == [o[0].output_ids for o in gen_all(local, PROMPTS, greedy())]
    assert after[0][0].weight_version == 5 and server.weight_version == 5
    server.weight_sync = "disk"                                 # the original weights back, through a folder
    try:
        asyncio.run(server.update_weights([list(original.items())], 6))
    finally:
        server.weight_sync = "tensor"
    assert [o[0].output_ids for o in gen_all(server, PROMPTS, greedy())] == before
    assert asyncio.run(server.model_info())["weight_version"] == "6"
    asyncio.run(local.update_weights([list(original.items())], 6))


def test_rejected_weight_name_says_which_and_why(server):
    bad = [("model.layers.0.self_attn.qq_proj.weight", torch.zeros(2, 2))]
    with pytest.raises(HybridRLError, match=r"(?s)refused weights \[model.layers.0.self_attn.qq_proj.weight.*qq_proj"):
        asyncio.run(server.update_weights([bad], 99))
    assert asyncio.run(server.model_info())["weight_version"] != "99"


def test_sleep_wake_multi_stage(server):
    before = [o[0].output_ids for o in gen_all(server, PROMPTS, greedy())]

    async def cycle():
        await server.sleep()
        with pytest.raises(HybridRLError, match="asleep"):
            await server.generate(PROMPTS[0], greedy())
        await server.wake(["weights"])
        await server.flush_cache()
        await server.wake(["kv_cache"])
    asyncio.run(cycle())
    assert [o[0].output_ids for o in gen_all(server, PROMPTS, greedy())] == before


def test_abort_one_and_all(server):
    async def main():
        long = greedy(max_new=470)
        tasks = [asyncio.ensure_future(server.generate(PROMPTS[1], long, request_id=f"long-{i}")) for i in range(8)]
        await asyncio.sleep(0.3)
        await server.abort("long-0")
        await server.abort()
        return await asyncio.wait_for(asyncio.gather(*tasks), 60)
    outs = [o[0] for o in asyncio.run(main())]
    assert outs[0].finish_reason == "abort" and len(outs[0].output_ids) < 470
    for o in outs:
        assert o.finish_reason in ("abort", "length") and len(o.logprobs) == len(o.output_ids)
    assert gen_all(server, PROMPTS[:1], greedy(max_new=3))[0][0].finish_reason == "length"   # still serving


def test_refused_push_changes_nothing(server, tiny_qwen2_dir, tmp_path):
    from hybridrl import sync
    before = [o[0].output_ids for o in gen_all(server, PROMPTS, greedy())]
    version = asyncio.run(server.model_info())["weight_version"]
    torch.manual_seed(2)
    changed = [(k, torch.randn_like(v)) for k, v in original_weights(tiny_qwen2_dir).items() if "layers.1" in k]
    nan = torch.full_like(changed[0][1], float("nan"))
    tensor_push = lambda bucket: {"serialized_named_tensors": [sync.encode_cpu_bucket(bucket)],  # noqa: E731
                                  "load_format": sync.CPU_LOAD_FORMAT, "weight_version": "99"}
    to_tensor, to_disk = "/update_weights_from_tensor", "/update_weights_from_disk"
    refused = [
        (tensor_push(changed + [("model.layers.0.self_attn.qq_proj.weight", torch.zeros(2))]), to_tensor,
         "qq_proj.weight' is unknown"),
        (tensor_push(changed[1:] + [(changed[0][0], nan)]), to_tensor, f"{changed[0][0]}' holds NaN"),
        (tensor_push([]), to_tensor, "empty weight update"),
        ({"serialized_named_tensors": [], "load_format": sync.CPU_LOAD_FORMAT}, to_tensor, "empty"),
        ({"serialized_named_tensors": ["not base64!"], "load_format": sync.CPU_LOAD_FORMAT}, to_tensor,
         "not base64 safetensors"),
        (tensor_push(changed[:1]) | {"weight_version": 1.5}, to_tensor, "weight_version must be"),
        ({"model_path": str(tmp_path)}, to_disk, "no \\*.safetensors files"),
        ({"model_path": 7}, to_disk, "not a folder"),
    ]
    for body, path, words in refused:
        status, reply = post(server.url + path, body)
        assert status == 400 and reply["success"] is False, (path, words, reply)
        assert re.search(words, reply["message"]), (words, reply["message"])
    assert asyncio.run(server.model_info())["weight_version"] == version
    assert [o[0].output_ids for o in gen_all(server, PROMPTS, greedy())] == before


def test_bad_requests_get_400_while_a_healthy_one_completes(server):
    bad = [
        ({"input_ids": [1.5, 2.0], "sampling_params": {"max_new_tokens": 4}}, r"input_ids\[0\] = 1.5 is not an int"),
        ({"input_ids": [True, 2]}, r"input_ids\[0\] = True"),
        ({"input_ids": [5, 100000]}, r"token ids must be in \[0, 512\)"),
        ({"input_ids": [5], "sampling_params": {"temperature": float("nan")}}, "temperature must be a finite number"),
        ({"input_ids": [5], "sampling_params": {"max_new_tokens": 2.5}}, "max_new_tokens must be an integer"),
        ({"input_ids": [5], "sampling_params": {"n": 0}}, "n must be >= 1"),
        ({"input_ids": [5], "sampling_params": {"bogus": 1}}, r"unknown keys \['bogus'\]"),
        ({"input_ids": [5], "rid": 3}, "rid must be a string"),
        ({"input_ids": [5], "return_logprob": "yes"}, "return_logprob must be true or false"),
        ({"input_ids": [[5], [6, "x"]]}, r"input_ids\[1\]\[1\]"),
        ({"input_ids": [[5], [6]], "sampling_params": [{}, {"top_p": 2}]}, r"sampling_params\[1\]: top_p"),
        (b"{not json", "not JSON"),
        (b"[1, 2, 3]", "must be a JSON object"),
    ]

    async def main():       # raw HTTP throughout: the sglang client would retry a 500 and hide it
        healthy = asyncio.create_task(asyncio.to_thread(post, server.url + "/generate", {
            "input_ids": PROMPTS[1], "sampling_params": {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True}}))
        await asyncio.sleep(0.1)
        replies = [await asyncio.to_thread(post, server.url + "/generate", body) for body, _ in bad]
        replies.append(await asyncio.to_thread(post, server.url + "/abort_request", {"rid": ["x"]}))
        replies.append(await asyncio.to_thread(post, server.url + "/release_memory_occupation", {"tags": "weights"}))
        return await healthy, replies
    (status, healthy), replies = asyncio.run(main())
    assert status == 200 and healthy["meta_info"]["finish_reason"]["type"] == "length"
    assert len(healthy["output_ids"]) == 400
    for (body, words), (status, reply) in zip(bad + [(None, "rid"), (None, "tags must be a list")], replies):
        assert status == 400 and re.search(words, message(reply)), (body, status, reply)
    assert gen_all(server, PROMPTS[:1], greedy(max_new=3))[0][0].finish_reason == "length"   # still serving
