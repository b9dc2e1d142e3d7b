"""Sampling on the device: temperature (0 = greedy), top-k, top-p, min-p, per-row seeds.

Each row brings one uniform number u drawn on the host from its sequence's own seeded RNG; the
token is the inverse CDF of the (filtered) distribution at u. So a seeded request samples the same
tokens whatever else shares its batch, and the device draws no random numbers.
Log-probs are of the sampled token under log_softmax(logits / T) (T = 1 for greedy), before
top-k / top-p / min-p filtering, like SGLang's default.
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
    # logits: [B, V] float32; params: [5, B] on the device -> tokens [B] long, logprobs [B] float32
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
