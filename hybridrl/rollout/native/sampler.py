"""Sampling on the device: temperature (0 = greedy), top-k, top-p, min-p, per-row seeds.

Each row brings one uniform number u drawn on the host from its sequence's own seeded RNG; the
token is the inverse CDF of the (filtered) distribution at u. So a seeded request samples the same
tokens whatever else shares its batch, and the device draws no random numbers.
Log-probs are of the sampled token under log_softmax(logits / T) (T = 1 for greedy), before
top-k / top-p / min-p filtering, like SGLang's default.
On CUDA, batches without filters (the RL default) take one fused Triton kernel that reads each
row of logits twice (max/sum, then the CDF walk) and writes nothing but the token and its log-prob.
"""
from __future__ import annotations

import torch

# rows of the host-side parameter block: [5, B] float64 -> one upload per step
TEMP, TOP_K, TOP_P, MIN_P, U = range(5)


def params_block(rows: list[tuple[float, int, float, float, float]]) -> torch.Tensor:
    """[(temperature, top_k, top_p, min_p, u), ...] -> [5, B] float64 (host)."""
    return torch.tensor(rows, dtype=torch.float64).T.contiguous()


def batch_flags(knobs: set) -> dict:
    """Host-side facts that let `sample` skip work, from the batch's distinct (T, top_k, top_p, min_p)."""
    return {"filtered": any(k[TOP_K] > 0 or k[TOP_P] < 1.0 or k[MIN_P] > 0.0 for k in knobs),
            "any_greedy": any(k[TEMP] == 0 for k in knobs),
            "unit_temp": all(k[TEMP] in (0.0, 1.0) for k in knobs)}


def sample(logits: torch.Tensor, params: torch.Tensor, filtered: bool = True, any_greedy: bool = True,
           unit_temp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    # logits: [B, V] any float dtype; params: [5, B] on the device -> tokens [B] long, logprobs [B] float32
    if logits.is_cuda and not filtered and fused_ok():
        try:
            return sample_fused(logits, params)
        except Exception as e:  # noqa: BLE001 - a Triton build problem must not stop rollouts
            _disable_fused(e)
    logits = logits.float()
    temp = params[TEMP].float()
    greedy = temp == 0
    scaled = logits if unit_temp else logits / torch.where(greedy, 1.0, temp)[:, None]
    logp = torch.log_softmax(scaled, dim=-1)                                           # [B, V]
    if filtered:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        probs = filter_sorted(sorted_logp.exp(), params)
        tokens = order.gather(1, inverse_cdf(probs, params[U])[:, None]).squeeze(1)
    else:
        tokens = inverse_cdf(logp.exp(), params[U])
    if any_greedy:
        tokens = torch.where(greedy, logits.argmax(dim=-1), tokens)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


def filter_sorted(probs: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    # probs: [B, V] sorted descending -> the same with filtered-out entries zeroed (rank 0 always kept)
    rank = torch.arange(probs.shape[1], device=probs.device)[None, :]
    top_k = params[TOP_K].long()[:, None]
    drop = (top_k > 0) & (rank >= top_k)
    probs = probs.masked_fill(drop, 0.0)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = mass_before > params[TOP_P].float()[:, None]
    drop |= probs < params[MIN_P].float()[:, None] * probs[:, :1]
    return probs.masked_fill(drop & (rank > 0), 0.0)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    # probs: [B, V] unnormalised, >= 0; u: [B] in [0, 1) -> index [B] of the first cdf entry > u * total
    cdf = probs.cumsum(dim=-1)
    target = (u.to(cdf.dtype) * cdf[:, -1])[:, None]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    # rounding can put target at the very top: fall back to the most likely entry
    return torch.where(idx >= probs.shape[1], probs.argmax(dim=-1), idx)


# ---------------------------------------------------------------- fused CUDA path (Triton)

_KERNEL = None
_FUSED = {"ok": None}


def fused_ok() -> bool:
    if _FUSED["ok"] is None:
        try:
            import triton  # noqa: F401
            _FUSED["ok"] = True
        except ImportError:
            _FUSED["ok"] = False
    return _FUSED["ok"]


def _disable_fused(err: Exception) -> None:
    import warnings
    warnings.warn(f"fused Triton sampler failed ({type(err).__name__}: {str(err)[:300]}); using the torch sampler")
    _FUSED["ok"] = False


def _kernel():
    """Build the Triton kernel on first use, so CPU machines never import triton."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def sample_rows(logits_ptr, stride_l, V, params_ptr, stride_p, tok_ptr, lp_ptr, BLOCK: tl.constexpr):
        # one program per row: pass 1 = online max / sum(exp) / argmax, pass 2 = first cdf entry > u * sum
        r = tl.program_id(0).to(tl.int64)
        row = logits_ptr + r * stride_l
        t = tl.load(params_ptr + r).to(tl.float32)                            # params[TEMP, r]
        u = tl.load(params_ptr + 4 * stride_p + r).to(tl.float32)             # params[U, r]
        greedy = t == 0.0
        inv_t = 1.0 / tl.where(greedy, 1.0, t)
        offs = tl.arange(0, BLOCK)
        m = -float("inf")
        total = 0.0
        best = -float("inf")
        best_i = 0
        for start in range(0, V, BLOCK):
            x = tl.load(row + start + offs, mask=start + offs < V, other=-float("inf")).to(tl.float32) * inv_t
            bm = tl.max(x, 0)
            bi = tl.argmax(x, 0)
            best_i = tl.where(bm > best, start + bi, best_i)
            best = tl.maximum(best, bm)
            m_new = tl.maximum(m, bm)
            total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        target = u * total
        acc = 0.0
        found = V
        for start in range(0, V, BLOCK):
            idx = start + offs
            x = tl.load(row + idx, mask=idx < V, other=-float("inf")).to(tl.float32) * inv_t
            e = tl.exp(x - m)
            cdf = tl.cumsum(e, 0) + acc
            found = tl.minimum(found, tl.min(tl.where((cdf > target) & (idx < V), idx, V), 0))
            acc += tl.sum(e, 0)
        tok = tl.where(greedy | (found >= V), best_i, found)
        x_tok = tl.load(row + tok).to(tl.float32) * inv_t
        tl.store(tok_ptr + r, tok.to(tl.int64))
        tl.store(lp_ptr + r, x_tok - m - tl.log(total))

    _KERNEL = sample_rows
    return _KERNEL


def sample_fused(logits: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # logits: [B, V] (row stride may exceed V); params: [5, B] float64 contiguous -> tokens, logprobs
    b, v = logits.shape
    tokens = torch.empty(b, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(b, dtype=torch.float32, device=logits.device)
    _kernel()[(b,)](logits, logits.stride(0), v, params, params.stride(0), tokens, logprobs,
                    BLOCK=4096, num_warps=8)
    return tokens, logprobs
