"""Load Hugging Face weights into the native model by name: from safetensors files or from a stream.

Each HF tensor name resolves to (engine parameter, row offset, rows): q/k/v land in slices of the
packed `qkv_proj`, gate/up in slices of `gate_up_proj`, everything else one to one. Loading a
checkpoint and `update_weights` from the trainer are the same loop over (name, tensor) pairs,
in two passes per bucket: `check_weights` validates every name, shape and value, then
`copy_weights` writes, so a refused bucket leaves the model untouched.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Iterator

import torch

from hybridrl import HybridRLError
from hybridrl.rollout.native.model import CausalLM, ModelArgs

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_config(model_path: str) -> dict:
    path = Path(model_path) / "config.json"
    if not path.exists():
        raise HybridRLError(f"no config.json in {model_path}: model.path must be a Hugging Face model folder")
    cfg = json.loads(path.read_text())
    gen = Path(model_path) / "generation_config.json"
    if gen.exists():  # generation_config's EOS ids (e.g. <|im_end|>) count as stop tokens too
        eos = json.loads(gen.read_text()).get("eos_token_id")
        cfg["eos_token_id"] = _merge_ids(cfg.get("eos_token_id"), eos)
    return cfg


def _merge_ids(a, b) -> list[int]:
    as_list = lambda x: [] if x is None else [x] if isinstance(x, int) else list(x)  # noqa: E731
    return list(dict.fromkeys(as_list(a) + as_list(b)))


def safetensors_weights(model_path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every *.safetensors file of a HF folder."""
    from safetensors import safe_open

    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise HybridRLError(f"no *.safetensors weights in {model_path}; fix: save the model with "
                            "save_pretrained(safe_serialization=True)")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


def resolve(name: str, a: ModelArgs) -> tuple[str, int, int | None] | None:
    """HF name -> (engine parameter name, first row, rows or None for the whole tensor); None = ignore."""
    if name.endswith(IGNORED_SUFFIXES):
        return None
    if name == "lm_head.weight" and a.tie_word_embeddings:
        return "model.embed_tokens.weight", 0, None
    q, kv, inter = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.intermediate_size
    packed = {"q_proj": ("qkv_proj", 0, q), "k_proj": ("qkv_proj", q, kv), "v_proj": ("qkv_proj", q + kv, kv),
              "gate_proj": ("gate_up_proj", 0, inter), "up_proj": ("gate_up_proj", inter, inter)}
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in packed:
        target, start, rows = packed[parts[-2]]
        return ".".join(parts[:-2] + [target, parts[-1]]), start, rows
    return name, 0, None


Plan = list[tuple[str, int, int | None, torch.Tensor]]     # (engine parameter, first row, rows, tensor)


def check_weights(model: CausalLM, named: Iterable[tuple[str, torch.Tensor]]) -> Plan:
    """Validate a bucket of (hf_name, tensor) before anything is copied -> where each tensor goes.

    Refuses (HybridRLError naming the tensor) unknown names, wrong shapes, non-float tensors and
    values that are NaN / inf or overflow the engine's dtype; names the model ignores are skipped."""
    params = dict(model.named_parameters())
    plan = []
    for item in named:
        name, tensor = _pair(item)
        where = resolve(name, model.args)
        if where is None:
            continue
        target, start, rows = where
        if target not in params:
            raise HybridRLError(f"weight {name!r} is unknown to the native {model.args.arch} model "
                                f"(expected Hugging Face names such as 'model.layers.0.self_attn.q_proj.weight')")
        p = params[target]
        dst = p.data if rows is None else p.data.narrow(0, start, rows)
        if tuple(tensor.shape) != tuple(dst.shape):
            raise HybridRLError(f"weight {name!r} has shape {tuple(tensor.shape)} but the engine expects "
                                f"{tuple(dst.shape)}: is this checkpoint the same model as the engine's?")
        _check_values(name, tensor, dst.dtype)
        plan.append((target, start, rows, tensor))
    return plan


def _pair(item) -> tuple[str, torch.Tensor]:
    pair = isinstance(item, (tuple, list)) and len(item) == 2
    if pair and isinstance(item[0], str) and isinstance(item[1], torch.Tensor):
        return item[0], item[1]
    got = f"({', '.join(type(x).__name__ for x in item)})" if isinstance(item, (tuple, list)) else type(item).__name__
    raise HybridRLError(f"a weight bucket holds (hf_name: str, tensor: torch.Tensor) pairs; got {got}")


def _check_values(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """Float tensors only, every value finite and within `dtype`'s range (one reduction per tensor)."""
    if not tensor.is_floating_point():
        raise HybridRLError(f"weight {name!r} has dtype {tensor.dtype}; the engine's weights are {dtype}: "
                            "send floating-point tensors")
    if tensor.numel() == 0:
        return
    lo, hi = torch.stack(tensor.detach().aminmax()).double().tolist()     # one sync; NaN propagates into both
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise HybridRLError(f"weight {name!r} holds NaN or inf values (min {lo}, max {hi}); "
                            "refusing the push: check the trainer's loss and gradients")
    limit = torch.finfo(dtype).max
    if max(-lo, hi) > limit:
        raise HybridRLError(f"weight {name!r} holds values up to {max(-lo, hi):.3g}, beyond {dtype}'s "
                            f"range ({limit:.3g}); refusing the push")


@torch.no_grad()
def copy_weights(model: CausalLM, plan: Plan) -> set[str]:
    """Copy a checked bucket into the parameters (wherever they live now); -> parameters touched."""
    params = dict(model.named_parameters())
    for target, start, rows, tensor in plan:
        dst = params[target].data if rows is None else params[target].data.narrow(0, start, rows)
        dst.copy_(tensor.to(dst.device), non_blocking=True)
    return {target for target, *_ in plan}


def load_weights(model: CausalLM, named: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Check a whole bucket, then copy it: a refused bucket changes nothing. -> parameters touched."""
    return copy_weights(model, check_weights(model, named))


def build_model(model_path: str, device: torch.device, dtype: torch.dtype) -> CausalLM:
    """Config -> empty model on `device` -> weights from safetensors; every parameter must be loaded."""
    args = ModelArgs.from_hf(read_config(model_path))
    with torch.device("meta"):
        model = CausalLM(args)
    model = model.to_empty(device=device).to(dtype)
    if args.tie_word_embeddings:  # to_empty breaks the tie; restore it
        model.lm_head.weight = model.model.embed_tokens.weight
    touched = set()
    for pair in safetensors_weights(model_path):        # one tensor at a time: host memory stays small
        touched |= load_weights(model, [pair])
    missing = sorted(set(dict(model.named_parameters())) - touched)
    if missing:
        raise HybridRLError(f"{model_path} lacks weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return model.eval().requires_grad_(False)
