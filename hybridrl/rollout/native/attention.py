"""Attention over the paged KV pool: packed prefill (SDPA, causal) and decode (gather or Triton).

KV pool per layer: k_cache, v_cache [num_blocks, block_size, Hkv, D]; a sequence's tokens live in
the blocks its row of `block_table` lists, token i at slot blocks[i // bs] * bs + i % bs.
Block 0 is a scratch block: padded rows of a CUDA-graph batch write and read there.

- prefill: the step's sequences are packed ([T, H, D]); they are scattered into a right-padded
  [B, H, S, D] batch, where a causal mask alone keeps every real query off the padding.
- decode: one query per sequence ([B, H, D]) against its cached tokens. `decode_attention_torch`
  gathers the blocks and runs two batched matmuls (any device); on CUDA a Triton kernel reads the
  blocks in place with an online softmax (no gather, no [B, L] scores in memory).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttnMeta:
    is_prefill: bool
    slot_mapping: torch.Tensor                 # [T] long: where each token's K/V goes in the pool
    pad_index: torch.Tensor | None = None      # prefill [T]: row * S + position in the padded batch
    prefill_batch: int = 0                     # prefill B
    prefill_len: int = 0                       # prefill S (longest sequence)
    block_table: torch.Tensor | None = None    # decode [B, nblk] int32
    context_lens: torch.Tensor | None = None   # decode [B] int32, the new token included
    use_triton: bool = False


def prefill_attention(q, k, v, meta: AttnMeta, scale: float) -> torch.Tensor:
    # q: [T, H, D]; k, v: [T, Hkv, D] -> [T, H, D]
    b, s = meta.prefill_batch, meta.prefill_len

    def padded(x):  # [T, h, D] -> [B, h, S, D]
        out = x.new_zeros(b * s, *x.shape[1:]).index_copy_(0, meta.pad_index, x)
        return out.view(b, s, *x.shape[1:]).transpose(1, 2)

    o = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), is_causal=True, scale=scale,
                                       enable_gqa=q.shape[1] != k.shape[1])
    return o.transpose(1, 2).reshape(b * s, *q.shape[1:]).index_select(0, meta.pad_index)


def decode_attention(q, k_cache, v_cache, meta: AttnMeta, scale: float) -> torch.Tensor:
    if meta.use_triton:
        return decode_attention_triton(q, k_cache, v_cache, meta.block_table, meta.context_lens, scale)
    return decode_attention_torch(q, k_cache, v_cache, meta.block_table, meta.context_lens, scale)


def decode_attention_torch(q, k_cache, v_cache, block_table, context_lens, scale: float) -> torch.Tensor:
    # q: [B, H, D]; block_table: [B, nblk]; context_lens: [B] -> [B, H, D]
    b, h, d = q.shape
    hkv = k_cache.shape[2]
    block_table = block_table.long()
    k = k_cache[block_table].flatten(1, 2)              # [B, L, Hkv, D], L = nblk * bs
    v = v_cache[block_table].flatten(1, 2)
    qg = q.view(b, hkv, h // hkv, d)                    # [B, Hkv, G, D]
    s = torch.einsum("bkgd,blkd->bkgl", qg, k).float() * scale
    past_end = torch.arange(k.shape[1], device=q.device)[None, :] >= context_lens[:, None]   # [B, L]
    p = s.masked_fill(past_end[:, None, None, :], float("-inf")).softmax(-1).to(v.dtype)
    return torch.einsum("bkgl,blkd->bkgd", p, v).reshape(b, h, d)


def triton_ok(device: torch.device, head_dim: int, block_size: int) -> bool:
    """The Triton kernel needs CUDA, a power-of-two head_dim >= 16 and a power-of-two block size."""
    if device.type != "cuda" or head_dim < 16 or head_dim & (head_dim - 1) or block_size & (block_size - 1):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_KERNEL = None


def _kernel():
    """Build the Triton kernel on first use, so CPU machines never import triton."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def paged_decode(q_ptr, k_ptr, v_ptr, o_ptr, table_ptr, lens_ptr, scale,
                     stride_qb, stride_qh, stride_kn, stride_ks, stride_kh, stride_tb, stride_ob, stride_oh,
                     G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                     BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        # one program per (sequence, kv head): its G query heads against BLOCK_N cached tokens at a time
        b, kvh = tl.program_id(0), tl.program_id(1)
        length = tl.load(lens_ptr + b)
        g, d, n = tl.arange(0, G_PAD), tl.arange(0, D), tl.arange(0, BLOCK_N)
        heads = kvh * G + g
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=(g < G)[:, None], other=0.0)                       # [G_PAD, D]
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        denom = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        for start in range(0, length, BLOCK_N):
            tok = start + n                                                  # [BLOCK_N] token positions
            live = tok < length
            blk = tl.load(table_ptr + b * stride_tb + tok // BS, mask=live, other=0).to(tl.int64)
            off = blk[:, None] * stride_kn + (tok % BS)[:, None] * stride_ks + kvh * stride_kh + d[None, :]
            k = tl.load(k_ptr + off, mask=live[:, None], other=0.0)          # [BLOCK_N, D]
            v = tl.load(v_ptr + off, mask=live[:, None], other=0.0)
            if IEEE:  # float32 caches: exact products, as the torch path computes them
                qk = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                qk = tl.dot(q, tl.trans(k)) * scale                         # [G_PAD, BLOCK_N] fp32
            qk = tl.where(live[None, :], qk, float("-inf"))
            m_new = tl.maximum(m, tl.max(qk, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(qk - m_new[:, None])
            denom = denom * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = acc / denom[:, None]
        tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=(g < G)[:, None])

    _KERNEL = paged_decode
    return _KERNEL


def decode_attention_triton(q, k_cache, v_cache, block_table, context_lens, scale: float) -> torch.Tensor:
    # q: [B, H, D] (contiguous last dim); k_cache: [N, bs, Hkv, D] contiguous -> [B, H, D]
    b, h, d = q.shape
    n, bs, hkv, _ = k_cache.shape
    g = h // hkv
    o = torch.empty_like(q)
    _kernel()[(b, hkv)](q, k_cache, v_cache, o, block_table, context_lens, scale,
                        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                        block_table.stride(0), o.stride(0), o.stride(1),
                        G=g, G_PAD=max(16, 1 << (g - 1).bit_length()), D=d, BS=bs, BLOCK_N=64,
                        IEEE=k_cache.dtype == torch.float32)
    return o
