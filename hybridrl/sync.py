"""Weight-sync helpers shared by rollout backends: buckets of (hf_name, tensor), their labels, CPU wire format.

The trainer yields `(hf_name, full_tensor)` pairs; `bucketize` groups them into lists of about
`bucket_mb` megabytes; an engine's `update_weights(buckets, version)` consumes the lists.

    for bucket in bucketize(model.named_parameters(), bucket_mb=512):
        ...                                   # bucket: [(name, tensor), ...], ~512 MB

CPU wire format (used by `hybridrl serve`, which has no CUDA IPC): one bucket is the bytes of a
safetensors file, base64-encoded, so it fits a JSON string field (`serialized_named_tensors`).
"""
from __future__ import annotations

import base64
import json
import os
from typing import Iterable, Iterator, Sequence

CPU_LOAD_FORMAT = "safetensors_b64"     # our `load_format` value for the CPU wire format


def nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def bucketize(named_tensors: Iterable[tuple[str, "object"]], bucket_mb: int) -> Iterator[list[tuple[str, "object"]]]:
    """Group (name, tensor) pairs, in order, into lists of at most `bucket_mb` MB (a bigger tensor goes alone)."""
    limit = max(1, int(bucket_mb)) * 1024 * 1024
    bucket, size = [], 0
    for name, tensor in named_tensors:
        n = nbytes(tensor)
        if bucket and size + n > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += n
    if bucket:
        yield bucket


def bucket_label(bucket: Sequence[tuple[str, "object"]]) -> str:
    """'first .. last (k tensors, X MB)': names a bucket in error messages."""
    if not bucket:
        return "empty bucket"
    mb = sum(nbytes(t) for _, t in bucket) / 2**20
    names = bucket[0][0] if len(bucket) == 1 else f"{bucket[0][0]} .. {bucket[-1][0]}"
    return f"{names} ({len(bucket)} tensors, {mb:.1f} MB)"


def encode_cpu_bucket(bucket: Sequence[tuple[str, "object"]]) -> str:
    """[(name, tensor)] → base64 of safetensors bytes (tensors copied to CPU, made contiguous)."""
    from safetensors.torch import save
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in bucket}
    order = json.dumps([name for name, _ in bucket])
    return base64.b64encode(save(tensors, metadata={"order": order})).decode("ascii")


def decode_cpu_bucket(payload: str) -> list[tuple[str, "object"]]:
    """Inverse of `encode_cpu_bucket`; keeps the sender's order (kept in the header's metadata)."""
    from safetensors.torch import load
    raw = base64.b64decode(payload)
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    tensors = load(raw)
    order = json.loads(header.get("__metadata__", {}).get("order", "[]")) or sorted(tensors)
    return [(name, tensors[name]) for name in order]


def save_hf_folder(buckets: Iterable[Sequence[tuple[str, "object"]]], out_dir: str) -> list[str]:
    """Write bucket i as `model-0000i.safetensors` in out_dir (what `update_weights_from_disk` reads); returns the names."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    names = []
    for i, bucket in enumerate(buckets):
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in bucket}
        save_file(tensors, os.path.join(out_dir, f"model-{i:05d}.safetensors"), metadata={"format": "pt"})
        names.extend(tensors)
    return names


def load_hf_folder(model_dir: str, bucket_mb: int = 512) -> Iterator[list[tuple[str, "object"]]]:
    """Stream the tensors of every *.safetensors file in model_dir as buckets."""
    from safetensors import safe_open
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))

    def pairs():
        for fname in files:
            with safe_open(os.path.join(model_dir, fname), framework="pt") as fh:
                for key in fh.keys():
                    yield key, fh.get_tensor(key)
    return bucketize(pairs(), bucket_mb)
