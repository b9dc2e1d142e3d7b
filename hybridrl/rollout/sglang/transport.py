"""Weight transports to an SGLang server: a stream of (hf_name, tensor) buckets with a version → HTTP pushes.

    transport = make_transport(cfg.rollout.weight_sync, engine)     # once, when the engine is built
    await transport.push(buckets, version)                          # the engine then flushes and checks the version

- TensorTransport (`tensor`): POST /update_weights_from_tensor per bucket. Real SGLang: CUDA IPC
  handles from SGLang's `MultiprocessingSerializer` (after `monkey_patch_torch_reductions`), one
  payload per TP rank, the whole bucket as one flat tensor (`load_format="flattened_bucket"`) where
  the server has it. `hybridrl serve`: the bucket as base64 safetensors bytes (`safetensors_b64`).
- DiskTransport (`disk`): save an HF safetensors folder, then POST /update_weights_from_disk.
- NcclTransport (`nccl`, disaggregated): on the first push, POST /init_weights_update_group while
  this process joins the same NCCL group as rank 0 (the server's TP ranks are 1..tp); then per
  bucket POST /update_weights_from_distributed while the trainer broadcasts the tensors
  (checked on 2 GPUs by bench/sglang_nccl.py: docs/benchmarks/sglang_nccl.md).

Every body says `flush_cache: false`: the engine flushes once after the last bucket, retrying while
requests still run. (SGLang asserts on a failed flush inside a weight update: its scheduler would
die if a request were still running when the last bucket asked for the flush.)
"""
from __future__ import annotations

import asyncio
import functools
import os
import socket
import tempfile
import urllib.parse
from typing import Iterable, Protocol, Sequence

from hybridrl import HybridRLError, sync
from hybridrl.rollout.sglang import compat
from hybridrl.rollout.sglang import launch


class Transport(Protocol):
    """What the engine needs from a transport; `engine` gives it `post_weights` and the server's facts."""

    name: str

    @staticmethod
    def check(cfg) -> None:
        """Refuse, before any server starts, when this transport cannot work for the Config `cfg` here."""

    def prepare(self) -> None:
        """Slow one-time setup (imports) done when the engine is built, not inside the first push."""

    async def push(self, buckets: Iterable[Sequence[tuple[str, object]]], version: int) -> None:
        """Load every bucket on the server, tagged `version` (no flush, no version check: the engine does those)."""


class TensorTransport:
    name = "tensor"

    def __init__(self, engine):
        self.engine = engine

    @staticmethod
    def check(cfg) -> None:
        pass

    def prepare(self) -> None:
        if not self.engine.native:
            sglang_serializer()          # imports sglang (~10 s) here rather than in the first push

    async def push(self, buckets, version: int) -> None:
        e = self.engine
        for bucket in buckets:
            body, keep = await asyncio.to_thread(      # serializing (and importing sglang) off the loop
                tensor_body, bucket, version, native=e.native, api_version=e.api_version, tp_size=e.tp_size)
            await e.post_weights("/update_weights_from_tensor", body, sync.bucket_label(bucket))
            del keep                                    # CUDA IPC sources may go only after the server replied


class DiskTransport:
    name = "disk"

    def __init__(self, engine):
        self.engine = engine

    @staticmethod
    def check(cfg) -> None:
        pass

    def prepare(self) -> None:
        pass

    async def push(self, buckets, version: int) -> None:
        out_dir = disk_dir(self.engine.run_dir)
        body, names = disk_body(buckets, version, out_dir, self.engine.model_path)
        await self.engine.post_weights("/update_weights_from_disk", body, f"{len(names)} tensors saved in {out_dir}")


class NcclTransport:
    """Broadcast from this process's GPU; the group is joined on the first push (or by `await init()`)."""

    name = "nccl"

    def __init__(self, engine, group_name: str = "hybridrl_weights"):
        self.engine, self.group_name = engine, group_name
        self.joined = None              # (group name, trainer-side group): set only once both sides joined
        self.attempts = 0               # a failed join is retried under a new group name and port
        self.join, self.broadcast = join_group, nccl_broadcast      # the trainer side (tests replace them)

    @staticmethod
    def check(cfg) -> None:
        import torch
        if not torch.cuda.is_available():
            raise HybridRLError("rollout.weight_sync=nccl pushes from the trainer's GPU over NCCL: no CUDA device "
                                "is visible; use rollout.weight_sync=tensor or disk")
        if cfg.trainer.device == "cpu":
            raise HybridRLError("rollout.weight_sync=nccl pushes from the trainer's GPU over NCCL: trainer.device="
                                "cpu holds the weights on the CPU; set trainer.device=cuda, or use "
                                "rollout.weight_sync=disk")

    def prepare(self) -> None:
        pass

    async def init(self, master_address: str | None = None, master_port: int | None = None) -> None:
        """Join the server's TP ranks (1..tp) and this trainer (rank 0) in one NCCL group; a no-op once joined.

        Call it from the process whose current CUDA device holds the weights to broadcast. Defaults:
        this host's address as the server sees it (`master_address_for`) and a free port here.
        """
        if self.joined is not None:
            return
        e = self.engine
        address = master_address or master_address_for(e.url, launched=e.process is not None)
        port = master_port or launch.find_free_port(29500, address)
        self.attempts += 1
        name = self.group_name if self.attempts == 1 else f"{self.group_name}_{self.attempts}"
        body = nccl_init_body(address, port, e.tp_size, name)
        join = functools.partial(self.join, address, port, e.tp_size + 1, name, e.update_timeout)
        group = await with_server(e.post_weights("/init_weights_update_group", body, "init group", retries=0), join)
        self.joined = (name, group)

    async def push(self, buckets, version: int) -> None:
        await self.init()
        name, group = self.joined
        for bucket in buckets:
            # no retry: a second POST would make the server wait for broadcasts that never come
            post = self.engine.post_weights("/update_weights_from_distributed", nccl_bucket_body(bucket, version, name),
                                            sync.bucket_label(bucket), retries=0)
            await with_server(post, functools.partial(self.broadcast, bucket, group))


TRANSPORTS = {"tensor": TensorTransport, "disk": DiskTransport, "nccl": NcclTransport}


def transport_class(name: str):
    if name not in TRANSPORTS:
        raise HybridRLError(f"unknown rollout.weight_sync={name!r}: choose one of {' | '.join(TRANSPORTS)}")
    return TRANSPORTS[name]


def make_transport(name: str, engine) -> Transport:
    """The transport named by rollout.weight_sync, bound to `engine` (its client, server facts, run dir)."""
    return transport_class(name)(engine)


def tensor_body(bucket, version: int, *, native: bool, api_version, tp_size: int) -> tuple[dict, object]:
    """Body for /update_weights_from_tensor, plus an object to keep alive until the server replies."""
    base = {"flush_cache": False, "abort_all_requests": False, "weight_version": str(version)}
    if native:
        return {**base, "serialized_named_tensors": [sync.encode_cpu_bucket(bucket)],
                "load_format": sync.CPU_LOAD_FORMAT}, None
    serialize = sglang_serializer()
    if compat.supports_flattened_bucket(api_version):
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket
        flat = FlattenedTensorBucket(named_tensors=list(bucket))
        obj = {"flattened_tensor": flat.get_flattened_tensor(), "metadata": flat.get_metadata()}
        payloads = [serialize(obj) for _ in range(tp_size)]
        return {**base, "serialized_named_tensors": payloads, "load_format": "flattened_bucket"}, obj
    named = list(bucket)
    if tp_size > 1:                 # one handle per TP rank, each rank opens only its own
        lst = compat.local_serialized_tensor_class(api_version)
        named = [(n, lst(values=[serialize(t, text=False) for _ in range(tp_size)])) for n, t in named]
    payloads = [serialize(named) for _ in range(tp_size)]
    return {**base, "serialized_named_tensors": payloads, "load_format": None}, named


def sglang_serializer():
    """SGLang's CUDA-IPC pickler, with torch's reductions patched so handles carry the device uuid."""
    try:
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    except ImportError:             # before the utils/ package split
        from sglang.srt.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.utils import MultiprocessingSerializer
    monkey_patch_torch_reductions()

    def serialize(obj, text: bool = True):
        return MultiprocessingSerializer.serialize(obj, output_str=text)
    return serialize


def disk_body(buckets, version: int, out_dir: str, config_src: str = "") -> tuple[dict, list[str]]:
    """Save all buckets as an HF folder (config.json copied from config_src when given) → body, names."""
    names = sync.save_hf_folder(buckets, out_dir)
    src = os.path.join(config_src, "config.json") if config_src else ""
    if src and os.path.exists(src):
        with open(src, "rb") as a, open(os.path.join(out_dir, "config.json"), "wb") as b:
            b.write(a.read())
    # load_format must be explicit: left out, SGLang reuses the launch format (`dummy` → random weights again)
    body = {"model_path": out_dir, "load_format": "auto", "weight_version": str(version), "flush_cache": False,
            "abort_all_requests": False}
    return body, names


def disk_dir(run_dir: str) -> str:
    """A fresh folder for one disk push (under the run dir when there is one)."""
    base = os.path.join(run_dir, "weight_sync") if run_dir else None
    if base:
        os.makedirs(base, exist_ok=True)
    return tempfile.mkdtemp(prefix="weights-", dir=base)


def master_address_for(server_url: str, launched: bool) -> str:
    """The address the server's ranks use to reach this process: loopback for a server we launched (this
    host), else this host's address on the route to the server (a UDP connect picks it, sending nothing)."""
    if launched:
        return "127.0.0.1"
    url = urllib.parse.urlsplit(server_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            return s.getsockname()[0]
    except OSError as e:
        raise HybridRLError(f"rollout.weight_sync=nccl: cannot find this host's address on the route to the "
                            f"server {server_url} ({e}); check rollout.server_url") from None


def nccl_init_body(master_address: str, master_port: int, tp_size: int, group_name: str) -> dict:
    """/init_weights_update_group: trainer is rank 0, the server's TP ranks are 1..tp_size."""
    return {"master_address": master_address, "master_port": master_port, "rank_offset": 1,
            "world_size": tp_size + 1, "group_name": group_name, "backend": "nccl"}


def nccl_bucket_body(bucket, version: int, group_name: str) -> dict:
    """/update_weights_from_distributed for one bucket: names, dtypes, shapes; tensors go by broadcast."""
    return {"names": [n for n, _ in bucket], "dtypes": [str(t.dtype).replace("torch.", "") for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket], "group_name": group_name,
            "flush_cache": False, "weight_version": str(version)}


def join_group(address: str, port: int, world_size: int, group_name: str, timeout_s: float):
    """Trainer side of /init_weights_update_group: rank 0 of `group_name` (blocks until every rank joined)."""
    import datetime
    os.environ.setdefault("NCCL_CUMEM_ENABLE", "0")     # as the launched server has it: peers must agree
    from sglang.srt.utils.common import init_custom_process_group
    return init_custom_process_group(backend="nccl", init_method=f"tcp://{address}:{port}", world_size=world_size,
                                     rank=0, group_name=group_name, timeout=datetime.timedelta(seconds=timeout_s))


def nccl_broadcast(bucket, group) -> None:
    """Trainer side of one NCCL bucket: broadcast each tensor from rank 0 of `group` (order = names)."""
    import torch
    import torch.distributed as dist
    if not bucket:
        return
    with torch.cuda.device(bucket[0][1].device):    # this runs in a worker thread: its device is not the caller's
        for _, t in bucket:
            dist.broadcast(t.contiguous(), src=0, group=group)


async def with_server(post, trainer_side):
    """Run the server's HTTP call and the trainer's blocking collective together; a refusal fails at once."""
    server = asyncio.ensure_future(post)
    local = asyncio.ensure_future(asyncio.to_thread(trainer_side))
    done, _ = await asyncio.wait({server, local}, return_when=asyncio.FIRST_EXCEPTION)
    if server in done and server.exception() is not None:
        local.cancel()              # the thread itself ends at its own timeout
        raise server.exception()
    if local in done and local.exception() is not None:
        server.cancel()
        raise local.exception()
    result = await local
    await server
    return result
