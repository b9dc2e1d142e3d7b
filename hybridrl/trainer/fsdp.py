"""FSDP2 building blocks for the trainer: process group, sharding, full weights, sharded checkpoints, merge.

One code path for every world size: a single process is a world of 1 (an in-process HashStore), several
processes come from torchrun's env vars. Plain functions, called by the trainer:

    rank, world = init_process_group_if_needed(device)
    model = shard_model(model, device)                        # fully_shard per decoder layer, then the root
    for name, tensor in full_named_tensors(model): ...        # collective: every rank iterates together
    save_sharded(path, model, optimizer); load_sharded(path, model, optimizer)   # DCP, reshards on load
    merge_to_hf(path, out_dir, model_dir)                     # one process, no process group

Gradients: FSDP2 averages them over ranks (reduce-scatter divided by world size), so a loss that is a mean
over each rank's equal share of the rows gives the full-batch gradient.

Test (CPU, gloo; one 2-process test + world-of-1 tests, ~30 s on 2 cores):
    pytest -q tests/test_fsdp.py
"""
from __future__ import annotations

import os
import shutil
import warnings
from datetime import timedelta
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from hybridrl import HybridRLError

INIT_TIMEOUT = timedelta(minutes=10)
MODEL_KEY, OPTIM_KEY = "model", "optim"  # top-level keys of a DCP checkpoint written by save_sharded
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")


# ---------------------------------------------------------------- process group

def init_process_group_if_needed(device: torch.device, timeout: timedelta = INIT_TIMEOUT) -> tuple[int, int]:
    """Join torchrun's world (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT) or make a world of 1; (rank, world).

    Backend nccl on cuda, gloo on cpu. An existing process group is left as it is. On cuda under torchrun the
    current device becomes cuda:LOCAL_RANK.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    else:  # a world of 1 needs no port and no file: the store lives in this process
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


# ---------------------------------------------------------------- sharding

def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF causal LM (Llama / Qwen2 / Qwen3: model.model.layers), or a clear error."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise HybridRLError(f"shard_model: {type(model).__name__} has no model.model.layers (nn.ModuleList); "
                            "only HF decoder-only causal LMs (Llama, Qwen2, Qwen3, ...) can be sharded")
    return layers


def tied_embeddings(model: nn.Module) -> bool:
    """True when lm_head and embed_tokens are one parameter."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def shard_model(model: nn.Module, device: torch.device, param_dtype: torch.dtype | None = None,
                reduce_dtype: torch.dtype = torch.float32, offload: bool = False,
                root: nn.Module | None = None) -> nn.Module:
    """fully_shard each decoder layer, then the root (embeddings, final norm, lm_head); returns the root.

    root: a module holding `model` whose forward is the whole computation (the trainer's LogProbHead), so
    the root's parameters are gathered around that forward; default the model itself.

    param_dtype None means bf16 compute on GPU and the stored dtype on CPU; gradients reduce in reduce_dtype.
    offload keeps sharded parameters, gradients and optimizer state on CPU (CPUOffloadPolicy).
    A tied lm_head stays one parameter with embed_tokens: both sit in the root group.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    layers = decoder_layers(model)  # fail before touching the model
    if param_dtype is None and device.type == "cuda":
        param_dtype = torch.bfloat16
    tied = tied_embeddings(model)
    root = model if root is None else root
    offload = offload and device.type == "cuda"          # on CPU the shards are on the host already
    root.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
                  offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(root, **kwargs)
    if tied and not tied_embeddings(model):
        raise HybridRLError("shard_model: lm_head and embed_tokens were tied before fully_shard and are not after")
    return root


# ---------------------------------------------------------------- full weights, one at a time

def hf_name(name: str) -> str:
    """A state-dict name without activation-checkpoint / torch.compile / FSDP1 wrapper prefixes."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def full_named_tensors(model: nn.Module, skip: Iterable[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, full tensor) for each state-dict entry, gathering ONE DTensor at a time.

    COLLECTIVE: every rank must iterate the whole generator in step (each DTensor's full_tensor() is an
    all-gather), even ranks that throw the tensors away. Names equal the unsharded HF model's state_dict();
    a parameter shared under two names (tied lm_head) is yielded once, under its first name (embed_tokens).
    Tensors are detached, on the parameter's device, in the parameter's stored dtype (fp32 master weights).
    """
    from torch.distributed.tensor import DTensor

    skip, seen = set(skip), set()
    for name, tensor in model.state_dict(keep_vars=True).items():  # sharded views: nothing gathered yet
        name = hf_name(name)
        if name in skip or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if isinstance(tensor, DTensor):
            if tensor.device.type != tensor.device_mesh.device_type:  # CPU-offloaded shard, cuda mesh
                tensor = tensor.to(tensor.device_mesh.device_type)
            tensor = tensor.full_tensor()
        yield name, tensor.detach()


# ---------------------------------------------------------------- sharded checkpoints (DCP)

def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """{"model": shards, "optim": shards} of this rank, for dcp.save / dcp.load (keys free of FSDP prefixes)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=False)
    state = {MODEL_KEY: get_model_state_dict(model, options=options)}
    if optimizer is not None:
        state[OPTIM_KEY] = get_optimizer_state_dict(model, optimizer, options=options)
    return state


def set_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict) -> None:
    """Put a sharded_state() dict that dcp.load filled back into the model and optimizer."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=False)
    set_model_state_dict(model, state[MODEL_KEY], options=options)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state[OPTIM_KEY], options=options)



def save_sharded(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the model and optimizer to the folder `path` (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(sharded_state(model, optimizer), checkpoint_id=str(path))


def load_sharded(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a save_sharded folder into a sharded model + optimizer at any world size (DCP reshards; collective)."""
    import torch.distributed.checkpoint as dcp

    state = sharded_state(model, optimizer)  # the target layout; dcp.load fills it in place
    dcp.load(state, checkpoint_id=str(path))
    set_sharded_state(model, optimizer, state)


# ---------------------------------------------------------------- merge to a Hugging Face folder

def merge_to_hf(sharded_ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike,
                model_config_src: str | os.PathLike, dtype: torch.dtype | None = None,
                prefix: str = MODEL_KEY + ".") -> str:
    """Write a Hugging Face folder (model.safetensors + config, tokenizer, generation config) from save_sharded.

    One process, no process group. Reads only the model entries (not the optimizer), all at once, in the
    stored dtype unless `dtype`; a tied lm_head.weight is left out as save_pretrained does. Every non-weight
    file of model_config_src (the original HF folder) is copied. prefix: the checkpoint keys of the model's
    weights (save_sharded: "model."; a training checkpoint: "actor.model.lm.").
    """
    import json

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    reader = dcp.FileSystemReader(str(sharded_ckpt_dir))
    model_state = {key[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype)
                   for key, meta in reader.read_metadata().state_dict_metadata.items()
                   if key.startswith(prefix) and isinstance(meta, dcp.metadata.TensorStorageMetadata)}
    with warnings.catch_warnings():  # dcp warns that no_dist means one process: that is the intent here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({prefix + k: t for k, t in model_state.items()}, storage_reader=reader, no_dist=True)  # fills in place
    with open(os.path.join(model_config_src, "config.json")) as f:
        if json.load(f).get("tie_word_embeddings", False):
            model_state.pop("lm_head.weight", None)
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(model_config_src):
        src = os.path.join(model_config_src, name)
        if os.path.isfile(src) and not name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(src, os.path.join(out_dir, name))
    tensors = {name: (t.to(dtype) if dtype else t).contiguous() for name, t in model_state.items()}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return str(out_dir)
