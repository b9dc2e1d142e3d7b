"""Hand-computed checks of hybridrl.algorithms: every estimator, loss, aggregation mode, KL estimator.

Each expected number is worked out in the comment above it, not by calling the code under test.
Run: pytest tests/test_algorithms.py   (a few seconds on CPU)
"""
import math

import pytest
import torch

from hybridrl import algorithms as A

LN2 = math.log(2.0)


def t(x):
    return torch.as_tensor(x, dtype=torch.float32)


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32), t(expected), atol=atol, rtol=0)


# ------------------------------------------------------------------ masked statistics
def test_masked_mean_ignores_masked_values_even_nan():
    x = t([[1.0, 2.0, float("nan")], [3.0, float("inf"), 5.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    close(A.masked_mean(x, mask), 2.0)  # (1 + 2 + 3) / 3
    close(A.masked_mean(x, mask, dim=-1), [1.5, 3.0])
    close(A.masked_mean(x, torch.zeros(2, 3)), 0.0)  # empty mask: 0, not NaN


def test_masked_whiten_uses_unbiased_variance_and_zeroes_masked():
    # mean of 1, 2, 3 is 2; unbiased var (1 + 0 + 1) / 2 = 1 -> -1, 0, 1; the 100 is padding
    out = A.masked_whiten(t([[1.0, 2.0, 3.0, 100.0]]), t([[1, 1, 1, 0]]))
    close(out, [[-1.0, 0.0, 1.0, 0.0]])
    close(A.masked_whiten(t([[5.0, 7.0]]), t([[1, 0]])), [[0.0, 0.0]])  # one token: no spread -> 0


def test_masked_whiten_without_spread_is_exactly_zero():
    # nine masked values of 0.3 (the 3.0 is padding): no spread -> exact zeros; the float32 mean
    # is not exactly 0.3, and (0.3 - mean) / sqrt(0 + 1e-8) used to give 3e-4
    x, mask = torch.full((2, 5), 0.3), torch.ones(2, 5)
    x[1, 4], mask[1, 4] = 3.0, 0.0
    assert torch.equal(A.masked_whiten(x, mask), torch.zeros(2, 5))
    assert torch.equal(A.masked_whiten(x, torch.zeros(2, 5)), torch.zeros(2, 5))  # nothing masked in


# ------------------------------------------------------------------ aggregation
LOSS = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
LOSS_MASK = t([[1, 1, 0], [1, 1, 1]])


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", 3.6),  # (1 + 2 + 4 + 5 + 6) / 5 = 18 / 5
        ("seq-mean-token-sum", 9.0),  # (3 + 15) / 2
        ("seq-mean-token-mean", 3.25),  # (3/2 + 15/3) / 2 = (1.5 + 5) / 2
        ("seq-mean-token-sum-norm", 3.0),  # (3/3 + 15/3) / 2, norm_len = L = 3
    ],
)
def test_agg_loss_modes(mode, expected):
    close(A.agg_loss(LOSS, LOSS_MASK, mode), expected)
    garbage = LOSS.clone()
    garbage[0, 2] = float("nan")  # the masked token must not leak
    close(A.agg_loss(garbage, LOSS_MASK, mode), expected)


def test_agg_loss_sum_norm_with_explicit_length_and_empty_rows():
    close(A.agg_loss(LOSS, LOSS_MASK, "seq-mean-token-sum-norm", norm_len=6), 1.5)  # (3/6 + 15/6) / 2
    # a row with no token is left out of seq-mean-token-mean instead of giving NaN: (3 + 4) / 2
    close(A.agg_loss(t([[1.0, 2.0], [3.0, 4.0]]), t([[0, 0], [1, 1]]), "seq-mean-token-mean"), 3.5)
    # seq-mean-token-sum divides by the rows with a token, as verl: (1 + 1) / 1 row = 2 (not / 2 rows = 1)
    loss, empty_row = t([[1.0, 1.0], [5.0, 5.0]]), t([[1, 1], [0, 0]])
    close(A.agg_loss(loss, empty_row, "seq-mean-token-sum"), 2.0)
    # seq-mean-token-sum-norm keeps Dr. GRPO's constant divisor B * norm_len: (1 + 1) / (2 rows * 2) = 0.5
    close(A.agg_loss(loss, empty_row, "seq-mean-token-sum-norm"), 0.5)
    with pytest.raises(ValueError, match="token-mean"):
        A.agg_loss(LOSS, LOSS_MASK, "mean")


# ------------------------------------------------------------------ advantage estimators
# group 7: scores 0, 1, 2 | group 3: scores 4, 6 | group 9: one sample with score 5
SCORES = t([0.0, 4.0, 1.0, 2.0, 6.0, 5.0])
GROUPS = torch.tensor([7, 3, 7, 7, 3, 9])
MASK2 = t([[1, 1], [1, 0], [1, 1], [0, 0], [1, 1], [1, 1]])


def test_grpo_with_std():
    # group 7: mean 1, unbiased std sqrt((1 + 0 + 1) / 2) = 1 -> -1, 0, 1
    # group 3: mean 5, unbiased std sqrt((1 + 1) / 1) = sqrt(2) -> -1/sqrt2, +1/sqrt2
    # group 9: a single sample has no baseline -> 0
    r = 1 / math.sqrt(2)
    adv = A.grpo_advantages(SCORES, GROUPS, MASK2)
    close(adv, [[-1, -1], [-r, 0], [0, 0], [0, 0], [r, r], [0, 0]], atol=1e-5)


def test_equal_scores_give_exactly_zero_advantage():
    # sixteen scores of 0.1: the float32 group mean is not exactly 0.1, and (0.1 - mean) / (std + 1e-6)
    # used to give -0.0147; all equal means no signal -> exactly 0 for every group estimator
    same, one_group, mask = torch.full((16,), 0.1), torch.zeros(16, dtype=torch.long), torch.ones(16, 3)
    for adv in (A.grpo_advantages(same, one_group, mask), A.grpo_advantages(same, one_group, mask, norm_by_std=False),
                A.rloo_advantages(same, one_group, mask), A.reinforce_pp_baseline_advantages(same, one_group, mask)):
        assert torch.equal(adv, torch.zeros(16, 3))


def test_constant_group_is_zero_beside_a_group_with_signal():
    # group 0: 0.1, 0.1, 0.1 (no signal) | group 1: 0, 1 -> mean 0.5, unbiased std sqrt(0.5) = 0.707107
    scores, groups, mask = t([0.1, 0.0, 0.1, 1.0, 0.1]), torch.tensor([0, 1, 0, 1, 0]), torch.ones(5, 1)
    zero = (scores == 0.1)[:, None]  # rows of group 0
    grpo = A.grpo_advantages(scores, groups, mask)  # group 1: -+0.5 / 0.707107 = -+0.707107
    close(grpo, [[0.0], [-0.707107], [0.0], [0.707107], [0.0]])
    rloo = A.rloo_advantages(scores, groups, mask)  # group 1: 0 - 1 and 1 - 0
    close(rloo, [[0.0], [-1.0], [0.0], [1.0], [0.0]])
    # reinforce++ baseline: values 0, -0.5, 0, 0.5, 0: mean 0, unbiased var 0.5 / 4 -> -+0.5 / 0.353553
    rpp = A.reinforce_pp_baseline_advantages(scores, groups, mask)
    close(rpp, [[0.0], [-1.414214], [0.0], [1.414214], [0.0]])
    for adv in (grpo, rloo, rpp):
        assert torch.equal(adv[zero], torch.zeros(3))


def test_grpo_without_std_and_equal_rewards():
    adv = A.grpo_advantages(SCORES, GROUPS, MASK2, norm_by_std=False)  # Dr. GRPO: score - mean
    close(adv, [[-1, -1], [-1, 0], [0, 0], [0, 0], [1, 1], [0, 0]])
    same = A.grpo_advantages(t([1.0, 1.0, 1.0]), torch.tensor([0, 0, 0]), torch.ones(3, 2))
    close(same, torch.zeros(3, 2))  # all-equal group: std 0, advantage exactly 0, not NaN


def test_rloo():
    # group 7: 0 - (1+2)/2 = -1.5, 1 - (0+2)/2 = 0, 2 - (0+1)/2 = 1.5 | group 3: 4 - 6, 6 - 4 | group 9: 0
    adv = A.rloo_advantages(SCORES, GROUPS, MASK2)
    close(adv, [[-1.5, -1.5], [-2, 0], [0, 0], [0, 0], [2, 2], [0, 0]])


def test_reinforce_pp_discounts_resets_after_eos_and_whitens():
    rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])  # the 5 sits after EOS (mask 0)
    mask = t([[1, 1, 1], [1, 1, 0]])
    # gamma 0.5 returns: row 0: 1, 0.5, 0.25 | row 1: t2 = 5 is reset, t1 = 2, t0 = 1
    returns = A.discounted_returns(rewards, mask, 0.5)
    close(returns * mask, [[0.25, 0.5, 1.0], [1.0, 2.0, 0.0]])
    # masked values 0.25 0.5 1 1 2: mean 0.95, unbiased var 1.8 / 4 = 0.45, std 0.670820
    adv = A.reinforce_pp_advantages(rewards, mask, gamma=0.5)
    close(adv, [[-1.043498, -0.670820, 0.074536], [0.074536, 1.565248, 0.0]])
    adv2, ret2 = A.compute_advantages("reinforce_plus_plus", scores=None, group_ids=None, mask=mask,
                                      token_rewards=rewards, gamma=0.5)
    close(adv2, adv)
    close(ret2 * mask, returns * mask)


def test_reinforce_pp_baseline():
    # centred per group: [-1, 1], [-2, 2], single sample -> 0; on 2 tokens each: 10 values,
    # mean 0, unbiased var (4 * 1 + 4 * 4) / 9 = 20 / 9, std 1.490712 -> 1/std = 0.670820
    scores, groups = t([1.0, 3.0, 5.0, 9.0, 4.0]), torch.tensor([0, 0, 1, 1, 2])
    adv = A.reinforce_pp_baseline_advantages(scores, groups, torch.ones(5, 2))
    a, b = 0.670820, 1.341641
    close(adv, [[-a, -a], [a, a], [-b, -b], [b, b], [0, 0]])


def test_remax():
    mask = t([[1, 1, 0], [1, 1, 1]])
    adv = A.remax_advantages(t([1.0, 0.5]), t([0.5, 1.0]), mask)  # 1 - 0.5, 0.5 - 1
    close(adv, [[0.5, 0.5, 0.0], [-0.5, -0.5, -0.5]])
    adv2, ret = A.compute_advantages("remax", scores=t([1.0, 0.5]), group_ids=None, mask=mask,
                                     baseline_scores=t([0.5, 1.0]))
    close(adv2, adv)
    close(ret, [[1.0, 1.0, 0.0], [0.5, 0.5, 0.5]])  # reward-to-go of a reward on the last token


def test_gae_gamma_lambda():
    # gamma 0.9, lam 0.5 (gamma * lam = 0.45), rewards [0, 0, 1], values [0.5, 0.2, 0.4]
    # t2: delta = 1 - 0.4 = 0.6                  A2 = 0.6
    # t1: delta = 0.9 * 0.4 - 0.2 = 0.16         A1 = 0.16 + 0.45 * 0.6 = 0.43
    # t0: delta = 0.9 * 0.2 - 0.5 = -0.32        A0 = -0.32 + 0.45 * 0.43 = -0.1265
    # returns = A + V = 0.3735, 0.63, 1.0; A whitened (mean 0.301167, unbiased std 0.380)
    adv, ret = A.gae_advantages(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.2, 0.4]]), torch.ones(1, 3), 0.9, 0.5)
    close(ret, [[0.3735, 0.63, 1.0]])
    close(adv, [[-1.12544, 0.33904, 0.78641]], atol=1e-4)


def test_gae_skips_masked_tool_tokens():
    # the middle token is a tool output (mask 0, value 9 ignored): t2 A = 0.6, the carry passes t1,
    # t0: delta = 0.9 * 0.4 - 0.5 = -0.14, A0 = -0.14 + 0.45 * 0.6 = 0.13; whitening 2 tokens -> -+0.7071
    mask = t([[1, 0, 1]])
    adv, ret = A.gae_advantages(t([[0.0, 0.0, 1.0]]), t([[0.5, 9.0, 0.4]]), mask, 0.9, 0.5)
    close(ret * mask, [[0.63, 0.0, 1.0]])
    close(adv, [[-0.707107, 0.0, 0.707107]], atol=1e-4)


def test_scores_to_token_rewards_uses_last_masked_token():
    mask = t([[1, 1, 0], [1, 0, 1], [0, 0, 0]])
    close(A.scores_to_token_rewards(t([1.0, 2.0, 3.0]), mask), [[0, 1, 0], [0, 0, 2], [0, 0, 0]])


def test_compute_advantages_dispatch_and_errors():
    adv, ret = A.compute_advantages("grpo", scores=SCORES, group_ids=GROUPS, mask=MASK2)
    close(adv, A.grpo_advantages(SCORES, GROUPS, MASK2))
    close(ret, adv)
    # with token rewards (e.g. after a KL penalty) the outcome is their row sum, as in verl
    # row sums 1, 3, 2, -, 6, 5; row 3 is fully masked, so it keeps its score 2.0
    # group 7 (rows 0, 2, 3): 1, 2, 2 -> mean 5/3; group 3: 3, 6 -> mean 4.5
    tok = t([[0.5, 0.5], [3.0, 0.0], [2.0, 0.0], [0.0, 0.0], [6.0, 0.0], [5.0, 0.0]])
    adv_tok, _ = A.compute_advantages("grpo", scores=SCORES, group_ids=GROUPS, mask=MASK2,
                                      token_rewards=tok, norm_adv_by_std_in_grpo=False)
    close(adv_tok[:, 0], [-2 / 3, -1.5, 1 / 3, 0.0, 1.5, 0.0])
    with pytest.raises(ValueError, match="grpo.*rloo"):
        A.compute_advantages("ppo", scores=SCORES, group_ids=GROUPS, mask=MASK2)


def test_token_rewards_on_masked_positions_do_not_count():
    # row 0's second token is a tool token (mask 0) holding a reward of 5: the outcome is 1, not 6
    # outcomes 1 and 2 in one group: mean 1.5 -> grpo without std -0.5, +0.5; rloo 1 - 2, 2 - 1
    tok, mask, group = t([[1.0, 5.0], [2.0, 0.0]]), t([[1, 0], [1, 1]]), torch.tensor([0, 0])
    grpo, _ = A.compute_advantages("grpo", scores=None, group_ids=group, mask=mask, token_rewards=tok,
                                   norm_adv_by_std_in_grpo=False)
    close(grpo, [[-0.5, 0.0], [0.5, 0.5]])
    rloo, _ = A.compute_advantages("rloo", scores=None, group_ids=group, mask=mask, token_rewards=tok)
    close(rloo, [[-1.0, 0.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match="values"):
        A.compute_advantages("gae", scores=SCORES, group_ids=GROUPS, mask=MASK2)
    with pytest.raises(ValueError, match="baseline"):
        A.compute_advantages("remax", scores=SCORES, group_ids=GROUPS, mask=MASK2)


# ------------------------------------------------------------------ KL
LOGP, REF = t([[-1.0, -2.0]]), t([[-2.0, -1.0]])  # logp - ref = +1, -1


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("kl", [1.0, -1.0]), ("k1", [1.0, -1.0]),
        ("abs", [1.0, 1.0]),
        ("mse", [0.5, 0.5]), ("k2", [0.5, 0.5]),  # 0.5 * diff^2
        # k3 = exp(ref - logp) - (ref - logp) - 1: exp(-1) + 1 - 1 = 0.367879, exp(1) - 1 - 1 = 0.718282
        ("low_var_kl", [0.367879, 0.718282]), ("k3", [0.367879, 0.718282]),
    ],
)
def test_kl_estimators(kind, expected):
    close(A.kl_penalty(LOGP, REF, kind), [expected])


def test_k3_clamp_and_straight_through():
    # ref - logp = -30 -> clamped to -20 -> exp(-20) + 20 - 1 = 19 -> clamped to 10; +30 -> huge -> 10
    close(A.kl_penalty(t([0.0, -30.0]), t([-30.0, 0.0]), "k3"), [10.0, 10.0])
    logp = LOGP.clone().requires_grad_()
    kl = A.kl_penalty(logp, REF, "k3+")
    close(kl.detach(), [[0.367879, 0.718282]])  # value of k3
    kl.sum().backward()
    close(logp.grad, [[1.0, -1.0]])  # gradient of k2 = logp - ref
    with pytest.raises(ValueError, match="low_var_kl"):
        A.kl_penalty(LOGP, REF, "k4")


def test_kl_controllers():
    fixed = A.FixedKLController(0.05)
    fixed.update(10.0, 100)
    assert fixed.value == 0.05
    ctl = A.AdaptiveKLController(init_kl_coef=0.1, target_kl=0.1, horizon=1000)
    ctl.update(current_kl=0.2, n_steps=100)  # error 0.2/0.1 - 1 = 1 clipped to 0.2 -> x (1 + 0.2 * 0.1)
    assert ctl.value == pytest.approx(0.102)
    ctl.update(current_kl=0.09, n_steps=100)  # error -0.1 -> x (1 - 0.1 * 0.1) = x 0.99
    assert ctl.value == pytest.approx(0.10098)


def test_apply_kl_penalty():
    rewards = t([[0.0, 1.0], [0.0, 2.0]])
    logp = t([[-1.0, -1.0], [-1.0, -1.0]])
    ref = t([[-2.0, -1.0], [-1.5, -100.0]])  # the -100 is on a masked token
    mask = t([[1, 1], [1, 0]])
    out, m = A.apply_kl_penalty(rewards, logp, ref, mask, coef=0.1, kind="kl")
    close(out, [[-0.1, 1.0], [-0.05, 2.0]])  # kl = [[1, 0], [0.5, -]] times 0.1
    assert m["kl"] == pytest.approx(0.5)  # row token-means (1 + 0) / 2 and 0.5 / 1, averaged
    assert m["kl_coef"] == pytest.approx(0.1)


def test_kl_metric_averages_only_rows_with_tokens():
    # row 0: token KLs 1 - 0 = 1 and 0 - 0 = 0 -> mean 0.5; row 1 has no token, so no KL:
    # 0.5 here, where verl's (0.5 + 0) / 2 = 0.25 would make the adaptive controller under-estimate it
    logp, mask = t([[1.0, 0.0], [1.0, 0.0]]), t([[1, 1], [0, 0]])
    _, m = A.apply_kl_penalty(torch.zeros(2, 2), logp, torch.zeros(2, 2), mask, coef=0.1, kind="kl")
    assert m["kl"] == pytest.approx(0.5)


# ------------------------------------------------------------------ policy losses
def test_ppo_clip_both_sides_and_dual_clip():
    # log ratios and advantages per token; the 5th token is masked and absurd
    log_ratio = t([[0.5, -0.5, 2.0, 0.0, 9.0]])
    adv = t([[1.0, -2.0, -1.0, 1.0, -50.0]])
    mask = t([[1, 1, 1, 1, 0]])
    old = torch.zeros(1, 5)
    logp = (old + log_ratio).requires_grad_()
    loss, m = A.policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, clip_c=3.0)
    # t0 adv>0, ratio e^.5 = 1.6487 -> clipped at 1 + 0.28: loss -1.28
    # t1 adv=-2, ratio e^-.5 = 0.6065 -> clipped at 1 - 0.2: loss max(2 * 0.6065, 2 * 0.8) = 1.6
    # t2 adv<0, ratio e^2 = 7.389 -> PPO loss 7.389, dual clip min(7.389, 3 * 1) = 3
    # t3 ratio 1: loss -1;  token-mean (-1.28 + 1.6 + 3 - 1) / 4 = 0.58
    close(loss, 0.58)
    assert m["pg_clipfrac"] == pytest.approx(0.5)  # t0 and t1
    assert m["pg_clipfrac_lower"] == pytest.approx(0.25)  # t2
    assert m["ppo_kl"] == pytest.approx(-0.5)  # mean(old - new) = -(0.5 - 0.5 + 2 + 0) / 4
    loss.backward()
    close(logp.grad, [[0.0, 0.0, 0.0, -0.25, 0.0]])  # only t3 is unclipped: d(-A r)/dlogp = -1, / 4
    with pytest.raises(ValueError, match="clip_ratio_c"):
        A.policy_loss(logp, old, adv, mask, clip_c=1.0)


def test_ppo_loss_aggregation_is_passed_through():
    # ratio 1, adv 1 everywhere: per-token loss -1; seq-mean-token-sum over rows of 1 and 2 tokens = -1.5
    mask = t([[1, 0], [1, 1]])
    loss, _ = A.policy_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2, 2), mask, agg_mode="seq-mean-token-sum")
    close(loss, -1.5)
    # seq-mean-token-sum-norm with the configured max length 4: (-1/4 + -2/4) / 2
    loss, _ = A.policy_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2, 2), mask,
                            agg_mode="seq-mean-token-sum-norm", norm_len=4)
    close(loss, -0.375)


def test_gspo_sequence_ratio():
    # seq 0: token log ratios 0.1 0.3 0.2 -> mean 0.2, s = e^0.2 = 1.2214, adv +1 -> clipped at 1.2, loss -1.2
    # seq 1: log ratios -0.1 -0.1 (third masked) -> s = e^-0.1 = 0.904837, adv -1 -> in range, loss 0.904837
    # always seq-mean-token-mean: (-1.2 + 0.904837) / 2 = -0.147581 (token-mean would give -0.358)
    log_ratio = t([[0.1, 0.3, 0.2], [-0.1, -0.1, 5.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv = t([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    old = t([[-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0]])
    logp = (old + log_ratio).requires_grad_()
    loss, m = A.policy_loss(logp, old, adv, mask, kind="gspo", agg_mode="token-mean")
    close(loss, -0.147581)
    assert m["pg_clipfrac"] == pytest.approx(0.6)  # the 3 tokens of seq 0 out of 5
    assert m["ppo_kl"] == pytest.approx(-0.08)  # -(0.6 - 0.2) / 5
    loss.backward()
    # seq 0 clipped -> 0; seq 1: d(-A * s)/dlogp_t = s = 0.904837, / 2 tokens / 2 seqs = 0.226209
    close(logp.grad, [[0.0, 0.0, 0.0], [0.226209, 0.226209, 0.0]])


def test_tis_weights_cap_and_use_in_loss():
    old = t([[math.log(3.0), math.log(0.5), math.log(1.5), math.log(10.0)]])
    w = A.tis_weights(old, torch.zeros(1, 4), t([[1, 1, 1, 0]]), threshold=2.0)
    close(w, [[2.0, 0.5, 1.5, 0.0]])  # min(ratio, 2), masked -> 0
    assert not w.requires_grad
    # ratio 1, adv 1: per-token loss -1, weighted by 2 and 0.5 -> token-mean (-2 - 0.5) / 2
    loss, _ = A.policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2),
                            tis_weights=t([[2.0, 0.5]]))
    close(loss, -1.25)


def test_value_loss_clipping():
    values = t([[1.0, 2.0, 100.0]])
    old = t([[0.5, 2.1, 0.0]])
    returns = t([[2.0, 1.0, 0.0]])
    mask = t([[1, 1, 0]])
    # t0: clip(1.0, 0.3, 0.7) = 0.7 -> max((1-2)^2, (0.7-2)^2) = 1.69 (clipped one wins)
    # t1: clip(2.0, 1.9, 2.3) = 2.0 -> 1;  0.5 * (1.69 + 1) / 2 = 0.6725
    loss, m = A.value_loss(values, old, returns, mask, cliprange=0.2)
    close(loss, 0.6725)
    assert m["vf_clipfrac"] == pytest.approx(0.5)


# ------------------------------------------------------------------ log-probs and entropy
def test_logp_entropy_hand_computed_with_temperature():
    # logits / T = [0, 0, 2 ln2] / 2 = [0, 0, ln2]: probs 1/4, 1/4, 1/2
    # log p(2) = -ln2; H = 2 * 1/4 * ln4 + 1/2 * ln2 = 1.5 ln2
    logp, ent = A.logp_entropy(t([[0.0, 0.0, 2 * LN2]]), None, torch.tensor([2]), temperature=2.0)
    close(logp, [-LN2])
    close(ent, [1.5 * LN2])
    # an impossible token (-inf logit) has p = 0 and adds nothing: H of (1/2, 1/2) = ln2, not NaN
    _, ent = A.logp_entropy(t([[0.0, 0.0, float("-inf")]]), None, torch.tensor([0]))
    close(ent, [LN2])
    logp, ent = A.logp_entropy(t([[0.0, 0.0, 2 * LN2]]), None, torch.tensor([2]), with_entropy=False)
    close(logp, [math.log(4 / 6)])  # T = 1: exp(logits) = 1, 1, 4 -> p(2) = 4 / 6
    assert torch.equal(ent, torch.zeros(1))


def _plain_logp_entropy(hidden, head, labels, temperature):
    """The un-chunked reference: full [b, l, V] logits, log_softmax, -(p * logp).sum."""
    ls = torch.log_softmax(head(hidden).float() / temperature, -1)  # [b, l, V]
    return ls.gather(-1, labels[..., None]).squeeze(-1), -(ls.exp() * ls).sum(-1)


def test_logp_entropy_chunked_matches_plain_values_and_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 11)
    hidden = torch.randn(2, 5, 4, requires_grad=True)  # 10 tokens in chunks of 3: 4 chunks
    labels = torch.randint(0, 11, (2, 5))
    w_logp, w_ent = torch.randn(2, 5), torch.randn(2, 5)  # weigh the outputs so every gradient differs
    logp, ent = A.logp_entropy(hidden, head, labels, temperature=0.7, chunk_size=3)
    ref_logp, ref_ent = _plain_logp_entropy(hidden, head, labels, 0.7)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == (2, 5)
    close(logp, ref_logp.detach())
    close(ent, ref_ent.detach())
    params = (hidden, head.weight, head.bias)
    got = torch.autograd.grad((logp * w_logp).sum() + (ent * w_ent).sum(), params)
    want = torch.autograd.grad((ref_logp * w_logp).sum() + (ref_ent * w_ent).sum(), params)
    for g, w in zip(got, want):
        close(g, w)


def test_logp_entropy_checkpoints_each_chunk_under_autograd():
    head = torch.nn.Linear(4, 6)
    calls = []
    head.register_forward_hook(lambda *_: calls.append(1))
    hidden, labels = torch.randn(7, 4), torch.zeros(7, dtype=torch.long)  # chunks of 3: 3, 3, 1
    logp, _ = A.logp_entropy(hidden, head, labels, chunk_size=3)  # only the head's weights need grad
    assert len(calls) == 3
    logp.sum().backward()
    assert len(calls) == 6  # backward ran the head again on each of the 3 chunks
    with torch.no_grad():
        A.logp_entropy(hidden, head, labels, chunk_size=3)
    assert len(calls) == 9  # no graph, no recomputation


def test_logp_entropy_bf16_head_gives_float32_close_to_float32():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 16)
    hidden, labels = torch.randn(3, 4, 8), torch.randint(0, 16, (3, 4))
    ref_logp, ref_ent = _plain_logp_entropy(hidden, head, labels, 1.0)
    half = torch.nn.Linear(8, 16).to(torch.bfloat16)
    half.load_state_dict(head.state_dict())
    logp, ent = A.logp_entropy(hidden.bfloat16(), half, labels, chunk_size=5)
    assert logp.dtype == ent.dtype == torch.float32
    close(logp, ref_logp.detach(), atol=0.05)  # bf16 keeps ~3 digits of the logits
    close(ent, ref_ent.detach(), atol=0.05)


# ------------------------------------------------------------------ rollout vs train
def test_rollout_mismatch_metrics():
    train = t([[math.log(0.5), math.log(0.25), 0.0]])
    rollout = t([[math.log(0.25), math.log(0.25), -50.0]])  # the last token is masked
    m = A.rollout_mismatch_metrics(train, rollout, t([[1, 1, 0]]))
    assert m["rollout_probs_diff_mean"] == pytest.approx(0.125)  # |0.5 - 0.25|, 0
    assert m["rollout_probs_diff_max"] == pytest.approx(0.25)
    assert m["rollout_probs_diff_std"] == pytest.approx(0.125)
    assert m["rollout_logp_abs_diff_mean"] == pytest.approx(LN2 / 2)
    assert m["rollout_kl_k1"] == pytest.approx(-LN2 / 2)  # mean(rollout - train)
    assert m["rollout_kl_k3"] == pytest.approx((2 - LN2 - 1) / 2)  # r = 2: r - ln r - 1, and 0
    assert m["rollout_ppl_ratio"] == pytest.approx(math.exp(-LN2 / 2))
    empty = A.rollout_mismatch_metrics(train, rollout, torch.zeros(1, 3))
    assert empty["rollout_probs_diff_max"] == 0.0 and empty["rollout_ppl_ratio"] == 1.0


def test_micro_weights_sum_micro_losses_to_the_mini_batch_loss():
    # rows A (3 tokens, sum 6), B (1 token, 10), C and D (no token: the 7s never count)
    loss = t([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0], [7.0, 7.0, 7.0], [7.0, 7.0, 7.0]])
    mask = t([[1, 1, 1], [1, 0, 0], [0, 0, 0], [0, 0, 0]])
    # mini-batch by hand: token-mean 16 / 4 tokens = 4; seq-mean-token-sum (6 + 10) / 2 non-empty rows = 8;
    # seq-mean-token-mean (2 + 10) / 2 = 6; seq-mean-token-sum-norm (6 + 10) / 3 / 4 rows = 4/3
    expected = {"token-mean": 4.0, "seq-mean-token-sum": 8.0, "seq-mean-token-mean": 6.0,
                "seq-mean-token-sum-norm": 4 / 3}
    splits = [[slice(0, 1), slice(1, 4)], [slice(0, 2), slice(2, 4)], [slice(0, 1), slice(1, 2), slice(2, 4)]]
    for mode in A.AGG_MODES:
        close(A.agg_loss(loss, mask, mode, norm_len=3), expected[mode])
        for parts in splits:  # the last micro-batch of the 2nd and 3rd splits has only empty rows
            total = sum(A.agg_loss(loss[p], mask[p], mode, norm_len=3) * A.micro_weight(mask[p], mask, mode)
                        for p in parts)
            close(total, expected[mode])
    assert A.micro_weight(mask[:1], mask, "token-mean") == 0.75  # 3 of the 4 tokens
    assert A.micro_weight(mask[:1], mask, "seq-mean-token-sum") == 0.5  # 1 of the 2 non-empty rows
    assert A.micro_weight(mask[2:], mask, "seq-mean-token-sum") == 0.0  # empty rows carry nothing
    assert A.micro_weight(mask[2:], mask, "seq-mean-token-sum-norm") == 0.5  # 2 of the 4 rows
