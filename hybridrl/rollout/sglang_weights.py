"""Weight transports to an SGLang server: one bucket of (hf_name, tensor) → one HTTP push.

- `tensor`: POST /update_weights_from_tensor. Real SGLang: CUDA IPC handles from SGLang's
  `MultiprocessingSerializer` (after `monkey_patch_torch_reductions`), one payload per TP rank,
  the whole bucket as one flat tensor (`load_format="flattened_bucket"`) where the server has it.
  `hybridrl serve`: the bucket as base64 safetensors bytes (`load_format="safetensors_b64"`).
- `disk`: save HF safetensors to a folder, then POST /update_weights_from_disk.
- `nccl`: POST /init_weights_update_group once, then per bucket POST /update_weights_from_distributed
  while the trainer broadcasts the tensors from rank 0 of that group (checked on 2 GPUs by
  bench/sglang_nccl.py: docs/benchmarks/sglang_nccl.md).

Each builder returns the JSON body; the engine sends it with a timeout and names the bucket on error.
"""
from __future__ import annotations

import os
import tempfile

from hybridrl import sync
from hybridrl.rollout import sglang_compat as compat


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


def nccl_init_body(master_address: str, master_port: int, tp_size: int, group_name: str) -> dict:
    """/init_weights_update_group: trainer is rank 0, the server's TP ranks are 1..tp_size."""
    return {"master_address": master_address, "master_port": master_port, "rank_offset": 1,
            "world_size": tp_size + 1, "group_name": group_name, "backend": "nccl"}


def nccl_bucket_body(bucket, version: int, group_name: str) -> dict:
    """/update_weights_from_distributed for one bucket: names, dtypes, shapes; tensors go by broadcast."""
    return {"names": [n for n, _ in bucket], "dtypes": [str(t.dtype).replace("torch.", "") for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket], "group_name": group_name,
            "flush_cache": False, "weight_version": str(version)}


def nccl_broadcast(bucket, group) -> None:
    """Trainer side of one NCCL bucket: broadcast each tensor from rank 0 of `group` (order = names)."""
    import torch
    import torch.distributed as dist
    if not bucket:
        return
    with torch.cuda.device(bucket[0][1].device):    # this runs in a worker thread: its device is not the caller's
        for _, t in bucket:
            dist.broadcast(t.contiguous(), src=0, group=group)
