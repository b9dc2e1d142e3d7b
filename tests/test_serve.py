"""`hybridrl serve` as a real subprocess, driven by the sglang client (CPU, tiny Qwen2).

One server process for the module (started through the sglang launcher), checked against the
in-process NativeEngine on the same weights: greedy tokens and log-probs, batches and n,
weight pushes from tensor and from disk (outputs change, version reported), a rejected weight
name, sleep / wake, abort; plus the raw JSON shapes of SGLang 0.5.17's routes.
"""
import asyncio
import json
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
