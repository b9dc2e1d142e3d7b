"""CPU checks of the NCCL transport's control flow (the transport itself: bench/sglang_nccl.py on 2 GPUs).

A fake engine records the HTTP pushes; the trainer side (group join, broadcast) is replaced by
functions that record their arguments, so the lazy join and its failure paths run without GPUs.
"""
import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from hybridrl import HybridRLError
from hybridrl.config import Config
from hybridrl.rollout.sglang import transport as weights
from hybridrl.rollout.sglang.engine import SGLangEngine
from hybridrl.rollout.sglang.transport import NcclTransport

_with_server = weights.with_server


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


class FakeEngine:
    """What NcclTransport uses of SGLangEngine: post_weights and the server's facts."""

    def __init__(self, refuse_init: int = 0, url: str = "http://127.0.0.1:30000", launched: bool = True):
        self.url, self.process, self.tp_size, self.update_timeout = url, object() if launched else None, 2, 5.0
        self.posts, self.refuse_init = [], refuse_init

    async def post_weights(self, path, body, label, retries=1):
        self.posts.append((path, body))
        if path == "/init_weights_update_group" and self.refuse_init:
            self.refuse_init -= 1
            raise HybridRLError(f"the server refused weights [{label}] at {path}: port in use")


def fake_transport(engine):
    t = NcclTransport(engine)
    t.joins, t.sent = [], []
    t.join = lambda *a: t.joins.append(a) or f"group{len(t.joins)}"
    t.broadcast = lambda bucket, group: t.sent.append(([n for n, _ in bucket], group))
    return t


def test_first_push_joins_the_group_once_then_broadcasts_every_bucket():
    import torch
    eng = FakeEngine()
    t = fake_transport(eng)
    bucket = [("a", torch.zeros(2, dtype=torch.bfloat16))]

    async def main():
        for version in (1, 2, 3):
            await t.push(iter([bucket, bucket]), version)
    asyncio.run(main())
    paths = [p for p, _ in eng.posts]
    assert paths == ["/init_weights_update_group"] + ["/update_weights_from_distributed"] * 6
    (addr, port, world, name, timeout), = t.joins             # joined once, as rank 0 of tp + 1
    init = eng.posts[0][1]
    assert (addr, world, name) == ("127.0.0.1", 3, "hybridrl_weights") and init["master_port"] == port
    assert init["master_address"] == addr and init["world_size"] == 3 and init["rank_offset"] == 1
    assert t.sent == [(["a"], "group1")] * 6
    assert [b["weight_version"] for _, b in eng.posts[1:]] == ["1", "1", "2", "2", "3", "3"]
    assert all(b["group_name"] == "hybridrl_weights" and b["flush_cache"] is False for _, b in eng.posts[1:])


def test_a_refused_join_leaves_no_group_and_the_next_push_joins_afresh():
    import torch
    eng = FakeEngine(refuse_init=1)
    t = fake_transport(eng)
    release = threading.Event()
    t.join = lambda *a: release.wait(10) and None             # blocked trainer side, as when no peer joins
    with pytest.raises(HybridRLError, match="port in use"):
        asyncio.run(_run_and_release(t.push([[("a", torch.zeros(1))]], 1), release))
    assert t.joined is None and [p for p, _ in eng.posts] == ["/init_weights_update_group"]   # no bucket sent
    t.join = lambda *a: "group2"
    asyncio.run(t.push([[("a", torch.zeros(1))]], 1))
    names = [b["group_name"] for _, b in eng.posts]
    # a new group (name and port), not the half-made one
    assert names == ["hybridrl_weights", "hybridrl_weights_2", "hybridrl_weights_2"]
    assert t.joined == ("hybridrl_weights_2", "group2")


def test_a_failed_trainer_join_leaves_no_group():
    eng = FakeEngine()
    t = fake_transport(eng)

    def fail(*a):
        raise RuntimeError("NCCL error: unhandled system error")
    t.join = fail
    with pytest.raises(RuntimeError, match="NCCL"):
        asyncio.run(t.push([[("a", None)]], 1))
    assert t.joined is None and [p for p, _ in eng.posts] == ["/init_weights_update_group"]


def test_explicit_init_then_push_joins_once():
    eng = FakeEngine()
    t = fake_transport(eng)

    async def main():
        await t.init("127.0.0.1", 29999)
        await t.init()
        await t.push([], 1)
    asyncio.run(main())
    assert len(t.joins) == 1 and t.joins[0][:2] == ("127.0.0.1", 29999)


def test_master_address_is_loopback_for_our_server_else_the_route_to_it():
    assert weights.master_address_for("http://10.1.2.3:30000", launched=True) == "127.0.0.1"
    assert weights.master_address_for("http://127.0.0.1:30000", launched=False) == "127.0.0.1"
    assert weights.master_address_for("http://localhost:30000", launched=False) == "127.0.0.1"
    with pytest.raises(HybridRLError, match="rollout.server_url"):
        weights.master_address_for("http://no-such-host.invalid:30000", launched=False)


def test_nccl_without_cuda_is_refused_before_any_server_starts(monkeypatch, tmp_path):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = Config()
    cfg.rollout.name, cfg.rollout.weight_sync = "sglang", "nccl"
    launched = []
    monkeypatch.setattr("hybridrl.rollout.sglang.launch.launch", lambda *a, **k: launched.append(a))
    with pytest.raises(HybridRLError, match=r"no CUDA device is visible; use rollout.weight_sync=tensor or disk"):
        SGLangEngine.from_config(cfg, "/m", run_dir=str(tmp_path))
    assert launched == []


def test_nccl_from_a_cpu_trainer_is_refused(monkeypatch, tmp_path):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = Config()
    cfg.rollout.name, cfg.rollout.weight_sync, cfg.trainer.device = "sglang", "nccl", "cpu"
    with pytest.raises(HybridRLError, match="trainer.device=cpu"):
        SGLangEngine.from_config(cfg, "/m", run_dir=str(tmp_path))
