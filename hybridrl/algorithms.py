"""The RL math of hybridrl: pure functions of tensors and floats, no config objects.

Shapes: B = samples in the batch, L = response length (padded), V = vocabulary.
Masks are float or bool [B, L] with 1 on the response tokens that count (tool /
user tokens of a multi-turn sample and padding are 0).

    advantages   grpo, rloo, reinforce_plus_plus(+_baseline), remax, gae  -> compute_advantages
    KL           kl_penalty (k1/abs/k2/k3), apply_kl_penalty, Fixed/AdaptiveKLController
    losses       policy_loss (PPO clip + dual clip, GSPO), value_loss, agg_loss
    log-probs    logp_entropy: log p(label) and entropy from hidden states through the lm_head,
                 chunked over tokens (the one log-softmax of the trainer)
    off-policy   tis_weights, rollout_mismatch_metrics

Semantics follow verl's `trainer/ppo/core_algos.py`. Every place where we chose otherwise, or
where a choice had to be made, and why:
1. A group of one sample (grpo, rloo, reinforce_plus_plus_baseline) gets advantage 0:
   it has no baseline. verl uses baseline 0 (and std 1), so the raw score becomes
   the advantage, which silently changes the algorithm when n = 1.
2. A group of equal scores gets advantage exactly 0 (grpo with or without std, rloo,
   reinforce_plus_plus_baseline), whatever the score: it has no signal. Equality is exact
   (group max == group min): verl's float32 mean leaves rounding noise that / (std + eps)
   blows up (sixteen scores of 0.1 give -0.0147). In reinforce_plus_plus_baseline the 0
   also survives the batch whitening (verl shifts it by the batch mean).
3. `masked_whiten` (REINFORCE++, GAE) returns exact zeros when the masked values have no
   spread, one token included (verl divides by zero there), and 0 on masked positions
   (verl leaves garbage there).
4. With token-level rewards (compute_advantages(token_rewards=...)), the outcome of grpo /
   rloo / reinforce_plus_plus_baseline is their row sum *under the mask*: a reward on a
   tool token or on padding is not part of the reply's outcome. verl sums the whole row.
   A row with no trainable token keeps its score (verl would count it as 0).
5. agg_loss: `seq-mean-token-sum` and `seq-mean-token-mean` average over rows with at least
   one token, as verl does: an empty (aborted) row carries no loss and must not dilute the
   others. `seq-mean-token-sum-norm` is the mean over *all* rows of (token sum / norm_len),
   Dr. GRPO's formula, whose point is a constant divisor B * norm_len (independent of lengths
   and of empty rows). verl divides the batch *sum* by L, so its loss scale grows with the
   batch (and with its micro-batching); ours is comparable across modes. `micro_weight`
   follows each mode's divisor, so gradient accumulation gives the mini-batch loss.
6. The "kl" metric of `apply_kl_penalty` (it drives the adaptive KL controller) is the mean
   of the per-row token-mean KL over rows with at least one token; verl averages over all
   rows. An empty row has no KL: counting it as 0 would make the controller under-estimate
   the KL and loosen the penalty.
7. Empty masks never give NaN: `masked_mean` of an empty mask is 0.
8. Masked positions may hold inf/NaN (e.g. padding logits): they are selected
   away with `torch.where`, not multiplied by 0.

Run the tests: `pytest tests/test_algorithms.py`.
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint  # a submodule that `import torch` does not load

# the names of the choices live with the settings (hybridrl.config imports no torch); the math is here
from hybridrl.config import ADV_ESTIMATORS, AGG_MODES, KL_KINDS, POLICY_LOSSES  # noqa: E402,F401


# ---------------------------------------------------------------- masked statistics
def _zero_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x * mask, with masked positions exactly 0 even where x is inf / NaN."""
    mask = mask.to(x.dtype) if mask.dtype == torch.bool else mask
    return torch.where(mask != 0, x * mask, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over mask (all elements, or along `dim`); 0 where the mask is empty."""
    total = _zero_masked(x, mask).sum() if dim is None else _zero_masked(x, mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.to(total.dtype).clamp(min=1e-8)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked elements; masked positions -> 0.

    Variance is unbiased (Bessel), as in verl. Masked values without spread (all equal,
    one token, or none) carry no signal: exact zeros, not rounding noise / sqrt(eps).
    """
    values = x[mask != 0]  # [N]
    if values.numel() == 0 or values.max() == values.min():
        return torch.zeros_like(x)
    centered = _zero_masked(x - masked_mean(x, mask), mask)
    var = (centered**2).sum() / (values.numel() - 1)
    return centered * torch.rsqrt(var + eps)


# ---------------------------------------------------------------- loss aggregation
def agg_loss(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str, norm_len: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss [B, L] to a scalar.

    token-mean               sum over all tokens / number of tokens
    seq-mean-token-sum       mean over non-empty rows of (token sum), as verl
    seq-mean-token-mean      mean over non-empty rows of (token mean), as verl
    seq-mean-token-sum-norm  mean over *all* rows of (token sum / norm_len), norm_len defaults to L:
                             Dr. GRPO's constant divisor B * norm_len (verl: batch sum / L, see
                             item 5 of the module docstring)
    """
    if mode == "token-mean":
        return masked_mean(loss_mat, mask)
    row_sum = _zero_masked(loss_mat, mask).sum(-1)  # [B]
    count = mask.sum(-1).to(row_sum.dtype)  # [B] tokens per row
    nonempty = (count > 0).sum().clamp(min=1)  # rows with at least one token (>= 1: no 0 / 0)
    if mode == "seq-mean-token-sum":
        return row_sum.sum() / nonempty
    if mode == "seq-mean-token-mean":
        return (row_sum / count.clamp(min=1)).sum() / nonempty
    if mode == "seq-mean-token-sum-norm":
        return row_sum.mean() / (norm_len or loss_mat.shape[-1])
    raise ValueError(f"unknown loss_agg_mode {mode!r}; choose one of {', '.join(AGG_MODES)}")


def agg_divisor(mask: torch.Tensor, mode: str) -> float:
    """What agg_loss divides by: tokens (token-mean), non-empty rows (seq-mean-*), rows (-sum-norm).

    Micro-batches and data-parallel ranks weigh their losses by their share of it (see micro_weight)."""
    if mode == "token-mean":
        return float(mask.sum())
    if mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        return float((mask != 0).any(-1).sum())
    return float(mask.shape[0])


def micro_weight(micro_mask: torch.Tensor, mini_mask: torch.Tensor, mode: str) -> float:
    """Share of a mini-batch's aggregated loss that one micro-batch carries (for gradient accumulation).

    agg_loss(micro) * micro_weight(...) summed over micro-batches equals agg_loss(mini), for every mode:
    each mode weighs by its divisor: token-mean by tokens, seq-mean-token-sum and seq-mean-token-mean
    by non-empty rows, seq-mean-token-sum-norm by rows. A micro-batch of empty rows weighs 0.
    """
    return agg_divisor(micro_mask, mode) / max(agg_divisor(mini_mask, mode), 1.0)


# ---------------------------------------------------------------- rewards per token
def scores_to_token_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place each sample's scalar score [B] on its last masked token -> [B, L]."""
    B, L = mask.shape
    present = mask != 0  # [B, L]
    last = L - 1 - present.flip(-1).to(torch.long).argmax(-1)  # [B] index of the last 1
    has_any = present.any(-1)  # [B]; a row with no token gets no reward
    out = torch.zeros(B, L, dtype=scores.dtype, device=scores.device)
    out[torch.arange(B, device=mask.device)[has_any], last[has_any]] = scores[has_any]
    return out


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1}, restarting after masked-out stretches -> [B, L]."""
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])  # [B]
    m = mask.to(token_rewards.dtype)
    for t in reversed(range(token_rewards.shape[1])):
        running = token_rewards[:, t] + gamma * running
        returns[:, t] = running
        running = running * m[:, t]  # verl: reset at masked positions (after EOS)
    return returns


# ---------------------------------------------------------------- advantage estimators
def _group_stats(scores: torch.Tensor, group_ids: torch.Tensor):
    """Per sample [B]: its group's size, mean, unbiased std of `scores` [B], and whether it has signal.

    signal = the group's scores are not all equal (so also more than one sample), compared
    exactly (max > min): a float mean / std of equal values leaves rounding noise, not zero.
    """
    _, inv = torch.unique(group_ids, return_inverse=True)  # [B] -> dense group index
    G = int(inv.max()) + 1 if inv.numel() else 0
    zeros = torch.zeros(G, dtype=scores.dtype, device=scores.device)
    count = zeros.index_add(0, inv, torch.ones_like(scores))  # [G]
    mean = zeros.index_add(0, inv, scores) / count  # [G]
    sq = zeros.index_add(0, inv, (scores - mean[inv]) ** 2)  # [G]
    std = (sq / (count - 1).clamp(min=1)).sqrt()  # [G]; torch.std (unbiased) like verl
    high = zeros.scatter_reduce(0, inv, scores, "amax", include_self=False)  # [G]
    low = zeros.scatter_reduce(0, inv, scores, "amin", include_self=False)  # [G]
    return count[inv], mean[inv], std[inv], (high > low)[inv]


@torch.no_grad()
def grpo_advantages(scores, group_ids, mask, norm_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (score - group mean) / (group std + eps) [B] -> broadcast on tokens [B, L].

    norm_by_std=False is Dr. GRPO (no std). A group of one sample, or of equal scores, gets exactly 0.
    """
    _, mean, std, signal = _group_stats(scores.float(), group_ids)
    adv = scores.float() - mean
    if norm_by_std:
        adv = adv / (std + eps)
    adv = torch.where(signal, adv, torch.zeros_like(adv))  # [B]
    return adv[:, None] * mask.to(adv.dtype)


@torch.no_grad()
def rloo_advantages(scores, group_ids, mask) -> torch.Tensor:
    """RLOO: score minus the mean of the *other* samples of its group -> [B, L].

    s_i - (sum - s_i)/(n - 1) = n/(n-1) * (s_i - mean). A group of one, or of equal scores, gets exactly 0.
    """
    n, mean, _, signal = _group_stats(scores.float(), group_ids)
    adv = (scores.float() - mean) * n / (n - 1).clamp(min=1)
    adv = torch.where(signal, adv, torch.zeros_like(adv))  # [B]
    return adv[:, None] * mask.to(adv.dtype)


@torch.no_grad()
def reinforce_pp_advantages(token_rewards, mask, gamma: float) -> torch.Tensor:
    """REINFORCE++: discounted returns per token, whitened over the whole batch -> [B, L]."""
    return masked_whiten(discounted_returns(token_rewards.float(), mask, gamma), mask)


@torch.no_grad()
def reinforce_pp_baseline_advantages(scores, group_ids, mask) -> torch.Tensor:
    """REINFORCE++ with baseline: (score - group mean) on every token, then whitened -> [B, L].

    A group of one, or of equal scores, gets exactly 0, before and after whitening (verl subtracts
    0 for a group of one, and the whitening shifts every row by the batch mean).
    """
    _, mean, _, signal = _group_stats(scores.float(), group_ids)
    adv = torch.where(signal, scores.float() - mean, torch.zeros_like(mean))  # [B]
    whitened = masked_whiten(adv[:, None] * mask.to(adv.dtype), mask)  # [B, L]
    return torch.where(signal[:, None], whitened, torch.zeros_like(whitened))


@torch.no_grad()
def remax_advantages(scores, baseline_scores, mask) -> torch.Tensor:
    """ReMax: score minus the greedy response's score, on every token -> [B, L]."""
    adv = scores.float() - baseline_scores.float()  # [B]
    return adv[:, None] * mask.to(adv.dtype)


@torch.no_grad()
def gae_advantages(token_rewards, values, mask, gamma: float, lam: float):
    """GAE with a critic -> (advantages whitened [B, L], returns = raw advantages + values [B, L]).

    Masked positions inside a response (tool output) are skipped: the next value and the
    running advantage carry over them, as in verl.
    """
    r, v, m = token_rewards.float(), values.float(), mask.float()
    next_value = torch.zeros_like(r[:, 0])  # [B]
    running = torch.zeros_like(r[:, 0])  # [B]
    adv = torch.zeros_like(r)
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        step_adv = delta + gamma * lam * running
        next_value = torch.where(m[:, t] != 0, v[:, t], next_value)
        running = torch.where(m[:, t] != 0, step_adv, running)
        adv[:, t] = running
    returns = adv + v
    return masked_whiten(adv, mask), returns




def compute_advantages(
    estimator: str, *, scores, group_ids, mask, token_rewards=None, values=None, baseline_scores=None,
    gamma: float = 1.0, lam: float = 1.0, norm_adv_by_std_in_grpo: bool = True,
):
    """Dispatch on the estimator name -> (advantages [B, L], returns [B, L]).

    scores [B] is the outcome reward; token_rewards [B, L] (e.g. after a KL penalty)
    wins when given, and outcome estimators (grpo, rloo, reinforce_plus_plus_baseline) then use
    its row sum under the mask: rewards on masked tool tokens or padding do not count (verl sums
    the whole row), and a row without trainable tokens keeps its score (verl would count it as 0).
    Without token_rewards, the score sits on the last response token.
    """
    if estimator not in ADV_ESTIMATORS:
        raise ValueError(f"unknown adv_estimator {estimator!r}; choose one of {', '.join(ADV_ESTIMATORS)}")
    if token_rewards is None:
        outcome = scores.float()  # [B]
        token_rewards = scores_to_token_rewards(outcome, mask)
    else:
        row_sum = _zero_masked(token_rewards.float(), mask).sum(-1)  # [B]
        # a row with no trainable token (an aborted, empty reply) keeps its score in the group statistics
        outcome = row_sum if scores is None else torch.where(mask.bool().any(-1), row_sum, scores.float())
    if estimator == "gae":
        if values is None:
            raise ValueError("adv_estimator 'gae' needs critic values [B, L]")
        return gae_advantages(token_rewards, values, mask, gamma, lam)
    if estimator == "reinforce_plus_plus":
        return reinforce_pp_advantages(token_rewards, mask, gamma), discounted_returns(token_rewards.float(), mask, gamma)
    if estimator == "remax":
        if baseline_scores is None:
            raise ValueError("adv_estimator 'remax' needs baseline_scores [B] (greedy response rewards)")
        # verl: reward-to-go minus the baseline; equals remax_advantages for an outcome reward
        returns = _zero_masked(token_rewards.float(), mask).flip(-1).cumsum(-1).flip(-1)  # [B, L]
        return returns - baseline_scores.float()[:, None] * mask.float(), returns
    if estimator == "grpo":
        adv = grpo_advantages(outcome, group_ids, mask, norm_adv_by_std_in_grpo)
    elif estimator == "rloo":
        adv = rloo_advantages(outcome, group_ids, mask)
    else:
        adv = reinforce_pp_baseline_advantages(outcome, group_ids, mask)
    return adv, adv


# ---------------------------------------------------------------- KL
def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate from sampled tokens [B, L] (Schulman's k1/k2/k3).

    kl/k1: logp - ref;  abs: |logp - ref|;  mse/k2: 0.5 (logp - ref)^2;
    low_var_kl/k3: exp(ref - logp) - (ref - logp) - 1, clamped to [-10, 10].
    A trailing '+' (e.g. 'k3+') keeps the value of that estimator with the k2 gradient.
    """
    if kind.endswith("+"):
        value = kl_penalty(logp, ref_logp, kind[:-1]).detach()
        k2 = 0.5 * (logp - ref_logp).square()
        return k2 - k2.detach() + value
    diff = logp - ref_logp
    if kind in ("kl", "k1"):
        return diff
    if kind == "abs":
        return diff.abs()
    if kind in ("mse", "k2"):
        return 0.5 * diff.square()
    if kind in ("low_var_kl", "k3"):
        log_ratio = (-diff).clamp(-20, 20)  # log(ref / pi), clamped so exp cannot overflow
        return (log_ratio.exp() - log_ratio - 1).clamp(-10, 10)
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of {', '.join(KL_KINDS)} (optionally with '+')")


class FixedKLController:
    """A constant KL coefficient: `.value`, and an `update` that does nothing."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019 (arXiv:1909.08593): steer the KL coefficient towards target_kl.

    value *= 1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon
    (verl passes n_steps = batch size).
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int):
        if horizon <= 0:
            raise ValueError(f"AdaptiveKLController horizon must be > 0, got {horizon}")
        self.value, self.target, self.horizon = init_kl_coef, target_kl, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


@torch.no_grad()
def apply_kl_penalty(token_rewards, logp, ref_logp, mask, coef: float, kind: str):
    """token_rewards - coef * KL on response tokens -> ([B, L], {"kl", "kl_coef"}).

    "kl" is the mean over samples with at least one token of the per-sample token-mean KL
    (verl's `actor/reward_kl_penalty`, which also counts empty rows as 0: item 6 of the module
    docstring); feed it to the controller's `update`.
    """
    kl = _zero_masked(kl_penalty(logp.float(), ref_logp.float(), kind), mask)  # [B, L]
    rows = mask.sum(-1) > 0
    current = masked_mean(kl, mask, dim=-1)[rows].mean() if rows.any() else kl.sum() * 0
    return token_rewards - coef * kl, {"kl": float(current), "kl_coef": float(coef)}


# ---------------------------------------------------------------- losses
def _vanilla_pg(logp, old_logp, adv, mask, clip_low, clip_high, clip_c):
    """PPO clip with dual clip -> (per-token loss [B, L], clipfrac, clipfrac_lower, ppo_kl)."""
    if clip_c <= 1.0:
        raise ValueError(f"dual-clip constant clip_ratio_c must be > 1, got {clip_c}")
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)  # as verl, for a finite exp
    ratio = log_ratio.exp()
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss_ppo = torch.maximum(loss_unclipped, loss_clipped)
    loss_dual = torch.minimum(loss_ppo, -adv * clip_c)  # caps the loss when adv < 0 and ratio >> 1
    loss = torch.where(adv < 0, loss_dual, loss_ppo)
    clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    clipfrac_lower = masked_mean(((loss_ppo > -adv * clip_c) & (adv < 0)).float(), mask)
    return loss, clipfrac, clipfrac_lower, masked_mean(-log_ratio, mask)


def _gspo_pg(logp, old_logp, adv, mask, clip_low, clip_high):
    """GSPO (arXiv:2507.18071): one ratio per sequence, the geometric mean of token ratios.

    Token ratio = sg[s_i] * pi / sg[pi], so the value is s_i and the gradient flows
    through every token's log-prob, as in verl's compute_policy_loss_gspo.
    """
    log_ratio = logp - old_logp
    seq_log_ratio = masked_mean(log_ratio, mask, dim=-1)  # [B]
    tok_log_ratio = logp - logp.detach() + seq_log_ratio.detach()[:, None]
    ratio = tok_log_ratio.clamp(max=10.0).exp()  # [B, L]
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    return loss, clipfrac, torch.zeros(()), masked_mean(-log_ratio, mask)


def policy_loss(
    logp, old_logp, adv, mask, clip_low: float = 0.2, clip_high: float = 0.2, clip_c: float = 3.0,
    agg_mode: str = "token-mean", kind: str = "vanilla", tis_weights=None, norm_len: int | None = None,
):
    """Clipped policy-gradient loss -> (scalar loss, {pg_clipfrac, pg_clipfrac_lower, ppo_kl}).

    logp [B, L] carries the gradient; old_logp, adv [B, L] are constants.
    vanilla: PPO clip with ratio in [1 - clip_low, 1 + clip_high], plus dual clip
             (loss <= -adv * clip_c) for negative advantages.
    gspo:    sequence-level ratio; always aggregated seq-mean-token-mean, as the
             paper and verl do (agg_mode is ignored for it).
    tis_weights [B, L] (see `tis_weights`) multiplies the per-token loss, detached.
    norm_len: divisor of seq-mean-token-sum-norm; pass the configured max response length
    when micro-batches are trimmed to their own L, so the loss scale stays constant.
    """
    if kind == "vanilla":
        loss_mat, clipfrac, clipfrac_lower, ppo_kl = _vanilla_pg(logp, old_logp, adv, mask, clip_low, clip_high, clip_c)
    elif kind == "gspo":
        loss_mat, clipfrac, clipfrac_lower, ppo_kl = _gspo_pg(logp, old_logp, adv, mask, clip_low, clip_high)
        agg_mode = "seq-mean-token-mean"
    else:
        raise ValueError(f"unknown policy_loss {kind!r}; choose one of {', '.join(POLICY_LOSSES)}")
    if tis_weights is not None:
        loss_mat = loss_mat * tis_weights.detach()
    metrics = {k: float(v.detach()) for k, v in
               (("pg_clipfrac", clipfrac), ("pg_clipfrac_lower", clipfrac_lower), ("ppo_kl", ppo_kl))}
    return agg_loss(loss_mat, mask, agg_mode, norm_len), metrics


def value_loss(values, old_values, returns, mask, cliprange: float, agg_mode: str = "token-mean",
               norm_len: int | None = None):
    """Clipped value loss -> (0.5 * agg(max((v - R)^2, (clip(v, old ± c) - R)^2)), {vf_clipfrac})."""
    clipped = torch.maximum(torch.minimum(values, old_values + cliprange), old_values - cliprange)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped - returns) ** 2
    loss = 0.5 * agg_loss(torch.maximum(loss_unclipped, loss_clipped), mask, agg_mode, norm_len)
    return loss, {"vf_clipfrac": float(masked_mean((loss_clipped > loss_unclipped).float(), mask).detach())}


# ---------------------------------------------------------------- log-probs and entropy
def _logp_entropy_rows(z: torch.Tensor, labels: torch.Tensor, with_entropy: bool):
    """z [n, V] float32 logits, labels [n] -> (log softmax(z)[label] [n], entropy [n])."""
    lse = torch.logsumexp(z, -1)  # [n]
    logp = z.gather(-1, labels[:, None]).squeeze(-1) - lse
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    p = (z - lse[:, None]).exp()  # [n, V] softmax
    expected_z = (p * torch.where(p > 0, z, 0.0)).sum(-1)  # where: a -inf logit has p = 0, not NaN
    return logp, lse - expected_z  # H = lse(z) - E_p[z]


def _needs_grad(hidden: torch.Tensor, head) -> bool:
    params = head.parameters() if isinstance(head, torch.nn.Module) else ()
    return torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in params))


def logp_entropy(hidden: torch.Tensor, head, labels: torch.Tensor, temperature: float = 1.0,
                 with_entropy: bool = True, chunk_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(label) and entropy of softmax(head(hidden) / temperature), chunked over tokens.

    hidden [..., H]; head maps [n, H] -> [n, V] logits (an lm_head; None when hidden already are
    the logits); labels [...] long -> (logp, entropy), float32 [...] each; entropy is 0 when
    with_entropy=False. Logits are upcast to float32 per chunk (bf16 log-softmax loses ~2 digits),
    so [tokens, V] logits exist for one chunk at a time; under autograd (hidden, or an nn.Module
    head's parameters, require grad) each chunk is checkpointed and recomputed in backward.
    """
    head = (lambda x: x) if head is None else head
    temperature = max(temperature, 1e-6)

    def chunk(h: torch.Tensor, y: torch.Tensor):  # h [n, H], y [n]
        return _logp_entropy_rows(head(h).float() / temperature, y, with_entropy)

    ckpt = _needs_grad(hidden, head)
    pairs = zip(hidden.reshape(-1, hidden.shape[-1]).split(chunk_size), labels.reshape(-1).split(chunk_size))
    outs = [torch.utils.checkpoint.checkpoint(chunk, h, y, use_reentrant=False) if ckpt else chunk(h, y)
            for h, y in pairs]
    logp, ent = (torch.cat(parts).reshape(labels.shape) for parts in zip(*outs))
    return logp, ent


# ---------------------------------------------------------------- rollout vs training policy
@torch.no_grad()
def tis_weights(old_logp, rollout_logp, mask, threshold: float) -> torch.Tensor:
    """Truncated importance weights min(pi_old / pi_rollout, threshold) [B, L], 0 on masked tokens.

    Corrects for the rollout engine sampling from a slightly different distribution
    than the trainer computes (kernels, precision, or a stale weight version).
    """
    ratio = (old_logp.float() - rollout_logp.float()).clamp(-20, 20).exp()
    return _zero_masked(ratio.clamp(max=threshold), mask)


@torch.no_grad()
def rollout_mismatch_metrics(train_logp, rollout_logp, mask) -> dict[str, float]:
    """How far the engine's log-probs are from the trainer's on the same tokens.

    rollout_probs_diff_{mean,max,std}: |p_train - p_rollout| per token (verl's
                                       training/rollout_probs_diff_*)
    rollout_logp_abs_diff_mean:        |logp_train - logp_rollout|
    rollout_kl_k1, rollout_kl_k3:      KL(rollout || train) estimated on the sampled tokens
    rollout_ppl_ratio:                 mean over samples of train ppl / rollout ppl
    """
    t, r = train_logp.float(), rollout_logp.float()
    sel = mask != 0
    if not sel.any():  # nothing to compare: report "no mismatch"
        t, r, sel = torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool)
        mask = sel
    pdiff = (t.exp() - r.exp()).abs()[sel]  # [N]
    rows = sel.any(-1)
    log_ppl_ratio = masked_mean(r - t, mask, dim=-1)[rows]  # log(ppl_train / ppl_rollout) per sample
    return {
        "rollout_probs_diff_mean": float(pdiff.mean()),
        "rollout_probs_diff_max": float(pdiff.max()),
        "rollout_probs_diff_std": float(pdiff.std(unbiased=False)),
        "rollout_logp_abs_diff_mean": float((t - r).abs()[sel].mean()),
        "rollout_kl_k1": float((r - t)[sel].mean()),
        "rollout_kl_k3": float(kl_penalty(r, t, "k3")[sel].mean()),
        "rollout_ppl_ratio": float(log_ppl_ratio.exp().mean()),
    }

