"""The paged KV pool: its size, the tensor, and the block manager (free list + reference counts).

Pool tensor: [layers, 2 (k, v), num_blocks, block_size, Hkv, D]. Block 0 is never handed out: it is
the scratch block that padded rows of a CUDA-graph batch write to. Blocks are reference counted, so
the `n` samples of one prompt share the prompt's full blocks after its single prefill.
The block table ([max_num_seqs, max_blocks_per_seq] int32, host side) holds each running
sequence's blocks in its row; decode reads the rows of the running sequences.
"""
from __future__ import annotations

import numpy as np
import torch

from hybridrl import HybridRLError
from hybridrl.rollout.native.model import ModelArgs


def bytes_per_token(a: ModelArgs, dtype: torch.dtype) -> int:
    return 2 * a.num_layers * a.num_kv_heads * a.head_dim * torch.empty((), dtype=dtype).element_size()


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (bytes); 8 GiB when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def pool_tokens(a: ModelArgs, dtype, device: torch.device, *, kv_cache_tokens: int | None,
                gpu_memory_utilization: float, max_num_seqs: int, max_model_len: int) -> int:
    """How many tokens the pool holds.

    GPU: kv_cache_tokens, else gpu_memory_utilization of the free memory (after the weights), at
    most max_num_seqs x max_model_len. CPU: kv_cache_tokens, else max_num_seqs x min(max_model_len,
    2048); either way at most 10% of the available RAM (the pool is zeroed, so it is all resident)."""
    per_token = bytes_per_token(a, dtype)
    if device.type == "cuda":
        if kv_cache_tokens is not None:
            return int(kv_cache_tokens)
        free, _ = torch.cuda.mem_get_info(device)
        return max(0, min(max_num_seqs * max_model_len, int(free * gpu_memory_utilization) // per_token))
    wanted = kv_cache_tokens if kv_cache_tokens is not None else max_num_seqs * min(max_model_len, 2048)
    return max(0, min(int(wanted), int(available_ram() * 0.1) // per_token))


def allocate_pool(a: ModelArgs, num_blocks: int, block_size: int, dtype, device) -> torch.Tensor:
    # -> [L, 2, num_blocks, block_size, Hkv, D], zeroed so the scratch block never holds NaN bits
    return torch.zeros(a.num_layers, 2, num_blocks, block_size, a.num_kv_heads, a.head_dim,
                       dtype=dtype, device=device)


class BlockManager:
    """Free list and reference counts of the pool's blocks (block 0 reserved)."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.free_ids = list(range(num_blocks - 1, 0, -1))      # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def capacity(self) -> int:
        """Blocks a sequence may use: all but the scratch block."""
        return self.num_blocks - 1

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self) -> int:
        if not self.free_ids:
            raise HybridRLError("KV cache pool exhausted (scheduler bug: it should have preempted)")
        b = self.free_ids.pop()
        self.ref[b] = 1
        return b

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            self.ref[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free_ids.append(b)


class BlockTable:
    """Rows of block ids for running sequences; a row is taken when a sequence starts decoding."""

    def __init__(self, rows: int, max_blocks: int):
        self.table = np.zeros((rows, max_blocks), dtype=np.int32)
        self.free_rows = list(range(rows - 1, -1, -1))

    def take(self, blocks: list[int]) -> int:
        row = self.free_rows.pop()
        self.table[row, :len(blocks)] = blocks
        return row

    def set(self, row: int, index: int, block: int) -> None:
        self.table[row, index] = block

    def give_back(self, row: int) -> None:
        self.free_rows.append(row)

    def rows(self, rows: list[int], nblk: int, pad_to: int = 0) -> torch.Tensor:
        """[max(len(rows), pad_to), nblk] int32; padded rows point at the scratch block 0."""
        out = np.zeros((max(len(rows), pad_to), nblk), dtype=np.int32)
        out[:len(rows)] = self.table[rows, :nblk]
        return torch.from_numpy(out)


def check_pool(bm: BlockManager, prompt_len: int, total_len: int, per_token: int) -> None:
    """A request must fit alone: its prompt plus all its new tokens, else HybridRLError."""
    need = bm.blocks_for(total_len)
    if need > bm.capacity:
        raise HybridRLError(
            f"KV cache pool too small: one sequence of {prompt_len} prompt + {total_len - prompt_len} new "
            f"tokens needs {need} blocks of {bm.block_size} tokens, the pool has {bm.capacity} "
            f"({bm.capacity * bm.block_size} tokens, {per_token} bytes each); fix: raise "
            f"rollout.gpu_memory_utilization / kv_cache_tokens or lower the prompt or response length")

