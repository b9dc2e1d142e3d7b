"""A real SGLang server (GPU) driven by hybridrl's launcher and client: the checks CPU tests cannot make.

Run on a GPU machine with sglang installed: `pytest tests/gpu/test_sglang_gpu.py` (marked `sglang`:
skipped elsewhere). Qwen2.5-0.5B shape with dummy weights, as in bench/sglang_weight_sync.py.
"""
import asyncio
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

pytestmark = pytest.mark.sglang


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from sglang_weight_sync import QWEN05, make_config   # the bench's model and launch flags
    from hybridrl.rollout.sglang.engine import SGLangEngine
    out = tmp_path_factory.mktemp("sgl")
    (out / "config.json").write_text(json.dumps(QWEN05))
    cfg = make_config(type("A", (), {"smoke": False})(), str(out))
    engine = SGLangEngine.from_config(cfg, run_dir=str(out))
    yield engine
    asyncio.run(engine.close())


def named_weights():
    from sglang_weight_sync import QWEN05, qwen_named_tensors
    return qwen_named_tensors(QWEN05, "cuda")


def test_generate_sleep_push_and_version(server):
    from hybridrl import HybridRLError
    from hybridrl.rollout.base import SamplingParams
    from hybridrl.sync import bucketize
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=16, temperature=1.0, n=4, ignore_eos=True)
    assert server.api_version >= (0, 5, 16) and not server.native

    async def main():
        outs = await server.generate(list(range(100, 132)), sampled)
        assert len(outs) == 4 and all(len(o.logprobs) == 16 and o.finish_reason == "length" for o in outs)
        assert all(lp <= 0 for o in outs for lp in o.logprobs)
        await server.sleep(["kv_cache", "weights"])
        named = named_weights()
        await server.update_weights(bucketize(named, 256), 3)   # wakes weights, pushes, flushes, wakes kv_cache
        a = (await server.generate(list(range(100, 132)), greedy))[0]
        assert a.weight_version == 3 and (await server.model_info())["weight_version"] == "3"
        named[0] = (named[0][0], named[0][1] * 3)                 # new embeddings → new greedy tokens
        await server.update_weights(bucketize(named, 2048), 4)
        b = (await server.generate(list(range(100, 132)), greedy))[0]
        assert b.weight_version == 4 and b.output_ids != a.output_ids
        bad = [("model.layers.0.mlp.up_proj.weight", torch.zeros(4, device="cuda"))]   # a wrong shape
        server.update_timeout = 60                                # the loader's assert may take the server down
        with pytest.raises(HybridRLError, match=r"(?s)model.layers.0.mlp.up_proj.weight"):
            await server.update_weights([bad], 5)                 # SGLang's loader asserts: the error names the bucket
    asyncio.run(main())
