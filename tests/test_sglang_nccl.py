"""CPU checks of the NCCL transport's control flow (the transport itself: bench/sglang_nccl.py on 2 GPUs)."""
import asyncio
import threading
import time

import pytest

from hybridrl import HybridRLError
from hybridrl.rollout import sglang_weights as weights
from hybridrl.rollout.sglang import SGLangEngine, _with_server


def test_with_server_returns_trainer_result_after_server_reply():
    order = []

    async def push():
        await asyncio.sleep(0.05)
        order.append("server")

    def local():
        order.append("trainer")
        return 42
    assert asyncio.run(_with_server(push(), local)) == 42
    assert sorted(order) == ["server", "trainer"]


def test_with_server_fails_at_once_when_the_server_refuses():
    release = threading.Event()

    async def push():
        raise HybridRLError("the server refused weights [init group]")

    t = time.perf_counter()
    with pytest.raises(HybridRLError, match="refused"):
        asyncio.run(_run_and_release(_with_server(push(), lambda: release.wait(10)), release))
    assert time.perf_counter() - t < 5          # did not wait for the blocked trainer-side thread


async def _run_and_release(coro, release):
    try:
        return await coro
    finally:
        release.set()                          # let the worker thread end so asyncio.run can close


def test_with_server_trainer_error_cancels_the_push():
    async def push():
        await asyncio.sleep(10)

    def local():
        raise RuntimeError("NCCL init failed")
    with pytest.raises(RuntimeError, match="NCCL"):
        asyncio.run(asyncio.wait_for(_with_server(push(), local), 5))


def test_nccl_bodies_match_sglang_fields():
    import torch
    init = weights.nccl_init_body("10.0.0.1", 29500, tp_size=2, group_name="g")
    assert init == {"master_address": "10.0.0.1", "master_port": 29500, "rank_offset": 1, "world_size": 3,
                    "group_name": "g", "backend": "nccl"}
    body = weights.nccl_bucket_body([("a", torch.zeros(2, 3, dtype=torch.bfloat16))], 7, "g")
    assert body["names"] == ["a"] and body["dtypes"] == ["bfloat16"] and body["shapes"] == [[2, 3]]
    assert body["weight_version"] == "7" and body["group_name"] == "g"


def test_update_without_init_nccl_names_the_fix():
    eng = SGLangEngine.__new__(SGLangEngine)
    eng._nccl = None
    with pytest.raises(HybridRLError, match="init_nccl"):
        asyncio.run(eng._update_nccl([[("a", None)]], 1))
