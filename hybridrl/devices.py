"""Device and dtype choice, one copy for the trainer and the engines.

    device = resolve_device("auto")               # cuda when visible, else cpu
    dtype = resolve_dtype("auto", device)         # bf16 on GPU, fp32 on CPU
    with autocast(device, "auto"): ...            # bf16 autocast on GPU (fp32 master weights), nothing on CPU
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from hybridrl import HybridRLError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """"auto" | "cpu" | "cuda" | "cuda:N" → a torch.device; a CUDA name without CUDA is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HybridRLError(f"device={name!r} but no CUDA device is visible: use trainer.device=cpu (or auto)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" is bf16 on GPU and fp32 on CPU; otherwise one of DTYPES."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise HybridRLError(f"unknown dtype {name!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def autocast(device: torch.device, name: str):
    """Mixed precision for a forward pass whose weights are fp32: autocast to `name` unless it resolves to fp32."""
    dtype = resolve_dtype(name, device)
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
