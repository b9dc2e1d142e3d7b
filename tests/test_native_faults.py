"""Faults in the native engine stay contained (CPU, tiny Qwen2, in-process).

A refused weight push changes nothing (one bucket, a list of buckets) or, for a stream that fails
part-way, leaves the engine refusing to generate until a push succeeds; a bad request fails alone,
at the door; a step that raises fails only the requests it ran and gives their KV blocks back.
The same checks over HTTP against `hybridrl serve` live in test_serve.py.
"""
import asyncio
import re

import pytest
import torch

from hybridrl import HybridRLError
from hybridrl.rollout.base import SamplingParams
from hybridrl.rollout.native.engine import NativeEngine
from hybridrl.rollout.native.loader import safetensors_weights
from hybridrl.rollout.native.server import parse_generate

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 30, 40]]


def greedy(max_new=12, **kw):
    return SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True, **kw)


def outputs(engine, prompts=PROMPTS, sp=None):
    async def main():
        return await asyncio.gather(*[engine.generate(p, sp or greedy()) for p in prompts])
    return [o[0].output_ids for o in asyncio.run(main())]


def push(engine, buckets, version):
    asyncio.run(engine.update_weights(buckets, version))


@pytest.fixture(scope="module")
def weights(tiny_qwen2_dir):
    """(original (name, tensor) pairs, the layer-1 tensors re-drawn at random)."""
    original = list(safetensors_weights(tiny_qwen2_dir))
    torch.manual_seed(1)
    return original, [(k, torch.randn_like(v)) for k, v in original if "layers.1" in k]


@pytest.fixture
def engine(tiny_qwen2_dir):
    return NativeEngine(tiny_qwen2_dir, device="cpu", kv_cache_tokens=1024, max_num_seqs=8)


def test_refused_bucket_changes_nothing(engine, weights):
    _, changed = weights
    before = outputs(engine)
    nan = changed[0][1].clone()
    nan.view(-1)[0] = float("nan")
    refused = {
        "unknown to the native": changed + [("model.layers.0.self_attn.qq_proj.weight", torch.zeros(2))],
        r"model.norm.weight.*shape \(7,\)": changed + [("model.norm.weight", torch.zeros(7))],
        rf"{changed[0][0]}.*NaN or inf": changed[1:] + [(changed[0][0], nan)],
        r"model.norm.weight.*inf": changed + [("model.norm.weight", torch.full((32,), float("inf")))],
        r"model.norm.weight.*dtype torch.int64": changed + [("model.norm.weight", torch.ones(32, dtype=torch.long))],
        r"model.norm.weight.*beyond torch.float32": changed + [("model.norm.weight", torch.full((32,), 1e300,
                                                                                             dtype=torch.float64))],
        "pairs; got str": changed + ["model.norm.weight"],
    }
    for words, bucket in refused.items():
        with pytest.raises(HybridRLError, match=words):
            push(engine, [bucket], 1)
        assert engine.weight_version == 0
        assert outputs(engine) == before, words          # the valid tensors before the bad one were not applied


def test_empty_push_is_refused(engine):
    for empty in ([], [[]], iter([]), (b for b in [[], []]), [[("model.layers.0.self_attn.rotary_emb.inv_freq",
                                                                torch.zeros(4))]]):
        with pytest.raises(HybridRLError, match="empty weight push"):
            push(engine, empty, 3)
        assert engine.weight_version == 0
    with pytest.raises(HybridRLError, match="version must be an integer"):
        push(engine, [[("model.norm.weight", torch.ones(32))]], "7")


def test_multi_bucket_list_is_all_or_nothing(engine, weights):
    _, changed = weights
    before = outputs(engine)
    with pytest.raises(HybridRLError, match="qq_proj"):
        push(engine, [changed[:3], changed[3:], [("model.layers.0.self_attn.qq_proj.weight", torch.zeros(2))]], 1)
    assert engine.weight_version == 0 and outputs(engine) == before
    push(engine, [changed[:3], changed[3:]], 1)                          # the same push, minus the bad bucket
    assert engine.weight_version == 1 and outputs(engine) != before


def test_streamed_push_failing_midway_refuses_to_generate_until_a_push_succeeds(engine, weights):
    original, changed = weights
    before = outputs(engine)
    stream = (b for b in [changed[:3], [("model.norm.weight", torch.zeros(7))]])   # bucket 0 lands, 1 is refused
    with pytest.raises(HybridRLError, match="model.norm.weight"):
        push(engine, stream, 1)
    assert engine.weight_version == 0
    with pytest.raises(HybridRLError, match="weights are inconsistent after a failed push.*push again"):
        outputs(engine)
    with pytest.raises(HybridRLError, match="unknown"):                  # a refused push does not clear it
        push(engine, [[("nope.weight", torch.zeros(1))]], 2)
    with pytest.raises(HybridRLError, match="inconsistent"):
        outputs(engine)
    push(engine, (b for b in [original]), 2)                             # a good stream restores service
    assert engine.weight_version == 2 and outputs(engine) == before


def test_update_weights_wakes_what_sleeps(engine, weights):
    original, _ = weights
    before = outputs(engine)

    async def cycle():
        await engine.sleep(["kv_cache", "weights"])
        with pytest.raises(HybridRLError, match=r"asleep \(\['kv_cache', 'weights'\]\): update_weights\(\) or wake"):
            await engine.generate(PROMPTS[0], greedy())
        with pytest.raises(HybridRLError, match="empty"):               # refused: still asleep
            await engine.update_weights([], 1)
        assert engine.runner.kv is None
        await engine.update_weights([original], 1)                     # no wake(): the push wakes both
    asyncio.run(cycle())
    assert engine.runner.kv is not None and outputs(engine) == before and engine.weight_version == 1


def test_bad_requests_fail_alone_at_the_door(engine):
    good_ref = outputs(engine, PROMPTS[:1], greedy(max_new=30))
    bad = {
        "input_ids\\[1\\] = 2.5 is not an integer": ([5, 2.5, 7], greedy()),
        "input_ids\\[0\\] = True": ([True, 6], greedy()),
        "input_ids must be a list": (5, greedy()),
        "empty prompt": ([], greedy()),
        "temperature must be a finite number, got nan": ([5, 6], SamplingParams(4, temperature=float("nan"))),
        "top_p must be a finite number, got inf": ([5, 6], SamplingParams(4, top_p=float("inf"))),
        "max_new_tokens must be an integer, got 4.0": ([5, 6], SamplingParams(4.0)),
        "n must be an integer": ([5, 6], SamplingParams(4, n=1.5)),
        "top_k must be an integer": ([5, 6], SamplingParams(4, top_k=2.0)),
        "top_k must be >= 1, or -1": ([5, 6], SamplingParams(4, top_k=-3)),
        "min_p must be in": ([5, 6], SamplingParams(4, min_p=1.5)),
        "stop_token_ids must be a list": ([5, 6], SamplingParams(4, stop_token_ids=[1.5])),
        "seed must be an integer": ([5, 6], SamplingParams(4, seed=0.5)),
        "ignore_eos must be true or false": ([5, 6], SamplingParams(4, ignore_eos=1)),
    }

    async def main():
        good = asyncio.create_task(engine.generate(PROMPTS[0], greedy(max_new=30)))
        await asyncio.sleep(0.01)
        errors = await asyncio.gather(*(engine.generate(ids, sp) for ids, sp in bad.values()),
                                      engine.generate([5], greedy(), request_id=7), return_exceptions=True)
        return await good, errors
    good, errors = asyncio.run(main())
    assert good[0].output_ids == good_ref[0] and good[0].finish_reason == "length"
    for words, err in zip(list(bad) + ["request_id must be a string"], errors):
        assert isinstance(err, HybridRLError), (words, err)
        assert re.search(words, str(err)), (words, str(err))
    assert engine.block_manager.num_free == engine.block_manager.capacity


def test_a_failing_step_fails_only_its_requests(engine, monkeypatch):
    """A prefill that raises for one request: that request fails, the one decoding beside it finishes."""
    healthy_ref = outputs(engine, PROMPTS[:1], greedy(max_new=80))[0]
    prefill = engine.runner.prefill

    def poisoned(seqs):
        if any(s.token_ids[0] == 333 for s in seqs):
            raise RuntimeError("poisoned prefill")
        return prefill(seqs)
    monkeypatch.setattr(engine.runner, "prefill", poisoned)
    engine.stats.clear()

    async def main():
        healthy = asyncio.create_task(engine.generate(PROMPTS[0], greedy(max_new=80)))
        while engine.stats["decode_steps"] < 3:                          # it is decoding on its own
            await asyncio.sleep(0.001)
        bad = await asyncio.gather(engine.generate([333, 1, 2], greedy(n=3)), return_exceptions=True)
        return await healthy, bad[0]
    (healthy,), bad = asyncio.run(main())
    assert isinstance(bad, HybridRLError) and "poisoned prefill" in str(bad) and "other requests" in str(bad)
    assert healthy.output_ids == healthy_ref and healthy.finish_reason == "length"
    assert engine.block_manager.num_free == engine.block_manager.capacity     # the failed request's blocks came back
    assert not engine._requests and not engine.scheduler.has_work()
    assert outputs(engine, PROMPTS[1:]) == outputs(engine, PROMPTS[1:])       # and it still serves


@pytest.mark.parametrize("body, words", [
    ({}, "needs `input_ids`"),
    ({"input_ids": [1.5, 2]}, r"input_ids\[0\] = 1.5 is not an integer"),
    ({"input_ids": [1, True]}, r"input_ids\[1\] = True"),
    ({"input_ids": []}, "non-empty list"),
    ({"input_ids": "hello"}, "non-empty list of token ids"),
    ({"input_ids": [1, 600]}, r"in \[0, 512\)"),
    ({"input_ids": [[1, 2], [3, "x"]]}, r"input_ids\[1\]\[1\] = 'x'"),
    ({"input_ids": [[1, 2], 3]}, r"input_ids\[1\] must be a list"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 8.5}}, "sampling_params: max_new_tokens must be an int"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 0}}, "sampling_params: max_new_tokens must be > 0"),
    ({"input_ids": [1], "sampling_params": {"temperature": float("nan")}}, "temperature must be a finite number"),
    ({"input_ids": [1], "sampling_params": {"temperature": "hot"}}, "temperature must be a finite number"),
    ({"input_ids": [1], "sampling_params": {"n": 0}}, "n must be >= 1"),
    ({"input_ids": [1], "sampling_params": {"n": True}}, "n must be an integer"),
    ({"input_ids": [1], "sampling_params": {"frequency_penalty": 1.0}}, r"unknown keys \['frequency_penalty'\]"),
    ({"input_ids": [1], "sampling_params": [1]}, "sampling_params must be a JSON object"),
    ({"input_ids": [[1], [2]], "sampling_params": [{}, {"top_p": 0}]}, r"sampling_params\[1\]: top_p"),
    ({"input_ids": [1], "sampling_params": {"stop": 5}}, "stop must be a list of non-empty strings"),
    ({"input_ids": [1], "rid": 5}, "rid must be a string"),
    ({"input_ids": [1], "return_logprob": "yes"}, "return_logprob must be true or false"),
])
def test_generate_body_is_checked_field_by_field(body, words):
    with pytest.raises(HybridRLError, match=words):
        parse_generate(body, vocab=512)


def test_generate_body_defaults_and_batches():
    single, jobs = parse_generate({"input_ids": [1, 2], "rid": "a", "sampling_params": {"stop": "x", "seed": 3}}, 512)
    (ids, sp, rid, lp), = jobs
    assert single and ids == [1, 2] and rid == "a" and lp is False and sp.stop == ["x"] and sp.seed == 3
    assert sp.max_new_tokens == 128
    single, jobs = parse_generate({"input_ids": [[1], [2]], "rid": ["p", None], "return_logprob": [True, False]}, None)
    assert not single and [j[2] for j in jobs][0] == "p" and jobs[1][2].endswith("_1")
    assert [j[3] for j in jobs] == [True, False]


@pytest.mark.gpu
def test_gpu_push_wakes_from_sleep_and_refuses_nan_on_device(tiny_qwen2_dir, weights):
    original, changed = weights
    eng = NativeEngine(tiny_qwen2_dir, device="cuda", kv_cache_tokens=4096)
    before = outputs(eng)

    async def cycle():
        await eng.sleep()
        assert next(eng.runner.model.parameters()).device.type == "cpu" and eng.runner.kv is None
        await eng.update_weights([[(k, v.cuda()) for k, v in original]], 1)   # wakes weights, loads, wakes KV
        nan = torch.full((32,), float("nan"), device="cuda")
        bad = [(k, v.cuda()) for k, v in changed] + [("model.norm.weight", nan)]
        with pytest.raises(HybridRLError, match="model.norm.weight' holds NaN"):
            await eng.update_weights([bad], 2)
    asyncio.run(cycle())
    assert next(eng.runner.model.parameters()).device.type == "cuda" and eng.runner.kv is not None
    assert eng.weight_version == 1 and outputs(eng) == before


def test_sleep_without_backup_frees_weights_and_a_full_push_equals_a_fresh_engine(tiny_qwen2_dir, weights, tmp_path):
    """weights_backup=False (what training uses, as SGLang's release without a CPU copy): sleep frees the weights
    with no copy; a push missing any weight is refused and nothing is served; a full push serves exactly what a
    fresh engine loaded with those weights serves."""
    from safetensors.torch import save_file
    from hybridrl.testing import save_tiny_model
    original, changed = weights
    new = dict(original) | dict(changed)
    fresh_dir = save_tiny_model(tmp_path / "fresh")
    save_file({k: v.contiguous() for k, v in new.items()}, f"{fresh_dir}/model.safetensors")
    expected = outputs(NativeEngine(fresh_dir, device="cpu", kv_cache_tokens=1024, max_num_seqs=8))
    eng = NativeEngine(tiny_qwen2_dir, device="cpu", kv_cache_tokens=1024, max_num_seqs=8, weights_backup=False)
    assert outputs(eng) != expected

    async def cycle():
        await eng.sleep()
        assert all(p.numel() == 0 for p in eng.runner.model.parameters())      # freed, not copied
        with pytest.raises(HybridRLError, match="push every weight after a sleep"):
            await eng.update_weights([list(changed)], 1)                       # only layer 1
        with pytest.raises(HybridRLError, match="asleep|inconsistent"):              # nothing served meanwhile
            await eng.generate(PROMPTS[0], greedy())
        await eng.update_weights([list(new.items())], 2)
    asyncio.run(cycle())
    assert eng.weight_version == 2 and outputs(eng) == expected
