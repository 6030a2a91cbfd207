"""RL losses and advantage estimators against values worked out by hand (torchtune style)."""

from __future__ import annotations

import math

import pytest
import torch

from training.core import losses


def t(*rows: object) -> torch.Tensor:
    """A float tensor: ``t([1, 2])`` is 1-D, ``t([1, 2], [3, 4])`` is 2-D."""
    data = rows[0] if len(rows) == 1 else list(rows)
    return torch.tensor(data, dtype=torch.float32)


def test_gae_three_steps_gamma_one():
    """r = [0, 0, 1], V = [.5, .6, .7], gamma 1, lambda .5.

    delta_2 = 1 - .7 = .3                    A_2 = .3
    delta_1 = 0 + .7 - .6 = .1               A_1 = .1 + .5 * .3 = .25
    delta_0 = 0 + .6 - .5 = .1               A_0 = .1 + .5 * .25 = .225
    returns = A + V = [.725, .85, 1.0]
    """
    adv, ret = losses.gae_advantages(
        t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]]), t([[1.0, 1.0, 1.0]]), gamma=1.0, lam=0.5
    )
    torch.testing.assert_close(adv, t([[0.225, 0.25, 0.3]]))
    torch.testing.assert_close(ret, t([[0.725, 0.85, 1.0]]))


def test_gae_with_discount_and_padding_ignored():
    """gamma .9, lambda .5 (gamma * lambda = .45); a padded 4th position must not leak in.

    A_2 = 1 - .7 = .3
    A_1 = (.9 * .7 - .6) + .45 * .3 = .03 + .135 = .165
    A_0 = (.9 * .6 - .5) + .45 * .165 = .04 + .07425 = .11425
    """
    rewards = t([0.0, 0.0, 1.0, 5.0], [0.0, 0.0, 1.0, 0.0])
    values = t([0.5, 0.6, 0.7, 9.0], [0.5, 0.6, 0.7, 0.0])
    mask = t([1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0])
    adv, ret = losses.gae_advantages(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv[0], t([0.11425, 0.165, 0.3, 0.0]))
    torch.testing.assert_close(adv[0], adv[1])
    torch.testing.assert_close(ret[0], t([0.61425, 0.765, 1.0, 0.0]))


def test_gae_lambda_one_is_return_minus_value():
    """With gamma = lambda = 1, A_t = sum of future rewards - V_t = [1 - .5, 1 - .6, 1 - .7]."""
    adv, _ = losses.gae_advantages(
        t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]]), t([[1.0, 1.0, 1.0]]), gamma=1.0, lam=1.0
    )
    torch.testing.assert_close(adv, t([[0.5, 0.4, 0.3]]))


def test_masked_whiten_shifts_and_scales_only_real_tokens():
    """x = [1, 2, 3 | pad 100]: mean 2, biased var 2/3, so (x - 2) / sqrt(2/3) = [-1.2247, 0, 1.2247]."""
    x = t([1.0, 2.0, 3.0, 100.0])
    mask = t([1.0, 1.0, 1.0, 0.0])
    s = math.sqrt(2.0 / 3.0)
    torch.testing.assert_close(losses.masked_whiten(x, mask), t([-1 / s, 0.0, 1 / s, 0.0]))
    torch.testing.assert_close(
        losses.masked_whiten(x, mask, shift_mean=False), t([2 - 1 / s, 2.0, 2 + 1 / s, 0.0])
    )
    assert losses.masked_var(x, mask).item() == pytest.approx(2 / 3)
    assert losses.masked_var(x, mask, unbiased=True).item() == pytest.approx(1.0)


def test_kl_estimators_by_hand():
    """pi = .5, pi_ref = .25: k1 = log 2; k2 = (log 2)^2 / 2; k3 = .5 - 1 - log .5 = log 2 - .5."""
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    assert losses.kl_k1(logp, ref).item() == pytest.approx(math.log(2))
    assert losses.kl_k2(logp, ref).item() == pytest.approx(math.log(2) ** 2 / 2)
    assert losses.kl_k3(logp, ref).item() == pytest.approx(math.log(2) - 0.5)
    assert losses.kl_estimate(logp, ref, "k3").item() == pytest.approx(math.log(2) - 0.5)
    with pytest.raises(ValueError, match="k4"):
        losses.kl_estimate(logp, ref, "k4")


def test_k3_is_never_negative_and_k1_can_be():
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(64, 16, generator=gen)
    ref = torch.randn(64, 16, generator=gen)
    assert (losses.kl_k3(logp, ref) >= 0).all()
    assert (losses.kl_k2(logp, ref) >= 0).all()
    assert (losses.kl_k1(logp, ref) < 0).any()
    assert (losses.kl_k3(logp, logp) == 0).all()


def test_k1_and_k3_agree_in_expectation():
    """Both are unbiased for KL(p || q) when tokens are sampled from p (Schulman's note)."""
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.4, 0.4, 0.2])
    exact = (p * (p / q).log()).sum().item()
    samples = torch.multinomial(
        p, 200_000, replacement=True, generator=torch.Generator().manual_seed(1)
    )
    logp, logq = p.log()[samples], q.log()[samples]
    assert losses.kl_k1(logp, logq).mean().item() == pytest.approx(exact, abs=5e-3)
    assert losses.kl_k3(logp, logq).mean().item() == pytest.approx(exact, abs=5e-3)


def test_kl_shaped_rewards_put_score_on_last_real_token():
    """beta .1, k1 = log 2 on every token: -.0693 per token, plus the score at the end."""
    logp = torch.full((2, 3), math.log(0.5))
    ref = torch.full((2, 3), math.log(0.25))
    mask = t([1.0, 1.0, 1.0], [1.0, 1.0, 0.0])
    rewards, kl = losses.kl_shaped_rewards(t([2.0, -1.0]), logp, ref, mask, beta=0.1)
    k = 0.1 * math.log(2)
    torch.testing.assert_close(rewards, t([-k, -k, 2.0 - k], [-k, -1.0 - k, 0.0]))
    torch.testing.assert_close(kl, t([1.0, 1.0, 1.0], [1.0, 1.0, 0.0]) * math.log(2))
    rewards_k3, kl_k3 = losses.kl_shaped_rewards(t([0.0, 0.0]), logp, ref, mask, 1.0, "k3")
    torch.testing.assert_close(rewards_k3, -kl_k3)
    assert kl_k3[0, 0].item() == pytest.approx(math.log(2) - 0.5)


def test_ppo_policy_loss_clips_only_in_the_pessimistic_direction():
    """clip .2, four tokens (the last is padding):

    ratio 1.5, A = 1:  max(-1.5, -1.2) = -1.2   (clipped)
    ratio .5,  A = -1: max(.5, .8)     = .8     (clipped)
    ratio .5,  A = 1:  max(-.5, -.8)   = -.5    (not clipped: pessimistic side)
    ratio 1.1, A = 2:  max(-2.2, -2.2) = -2.2
    loss = (-1.2 + .8 - .5) / 3 = -.3 on the first three; clipfrac 2/3
    """
    old = torch.zeros(1, 4)
    ratios = t([1.5, 0.5, 0.5, 1.1])
    logp = ratios.log().unsqueeze(0)
    adv = t([[1.0, -1.0, 1.0, 2.0]])
    mask = t([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = losses.ppo_policy_loss(logp, old, adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-0.3)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["ratio_mean"].item() == pytest.approx(2.5 / 3)
    expected_kl = 0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 3
    assert stats["approx_kl"].item() == pytest.approx(expected_kl)
    full_mask = torch.ones(1, 4)
    loss_all, _ = losses.ppo_policy_loss(logp, old, adv, full_mask, clip_range=0.2)
    assert loss_all.item() == pytest.approx((-1.2 + 0.8 - 0.5 - 2.2) / 4)


def test_ppo_policy_loss_gradient_is_zero_when_clipped():
    logp = torch.tensor([[math.log(1.5)]], requires_grad=True)
    loss, _ = losses.ppo_policy_loss(logp, torch.zeros(1, 1), t([[1.0]]), t([[1.0]]), 0.2)
    loss.backward()
    assert logp.grad is not None
    assert logp.grad.item() == 0.0


def test_ppo_value_loss_by_hand():
    """clip .2, V_old = 0: token 1 V .5 -> V_clip .2, R 1: max(.25, .64) = .64 (clipped);
    token 2 V .1 (inside the clip), R -1: 1.21. loss = .5 * (.64 + 1.21) / 2 = .4625."""
    loss, clipfrac = losses.ppo_value_loss(
        t([[0.5, 0.1]]), t([[0.0, 0.0]]), t([[1.0, -1.0]]), t([[1.0, 1.0]]), 0.2
    )
    assert loss.item() == pytest.approx(0.4625)
    assert clipfrac.item() == pytest.approx(0.5)


def test_group_advantages_zero_mean_per_group_and_zero_variance_flagged():
    """[1, 2, 3]: mean 2, Bessel std 1 -> [-1, 0, 1] / (1 + 1e-4); [5, 5, 5] has zero variance."""
    adv, zero_std = losses.group_advantages(t([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), group_size=3)
    d = 1.0 + 1e-4
    torch.testing.assert_close(adv, t([-1 / d, 0.0, 1 / d, 0.0, 0.0, 0.0]))
    assert zero_std.tolist() == [False, False, False, True, True, True]
    gen = torch.Generator().manual_seed(0)
    adv_random, _ = losses.group_advantages(torch.randn(4 * 8, generator=gen), group_size=8)
    torch.testing.assert_close(adv_random.view(4, 8).mean(dim=1), torch.zeros(4), atol=1e-6, rtol=0)


def test_group_advantages_skip_unscorable_and_other_scales():
    """[1, NaN, 3]: scorable mean 2, std sqrt(2); the NaN completion gets 0."""
    adv, zero_std = losses.group_advantages(t([1.0, float("nan"), 3.0]), group_size=3)
    d = math.sqrt(2) + 1e-4
    torch.testing.assert_close(adv, t([-1 / d, 0.0, 1 / d]))
    assert not zero_std.any()
    adv_none, _ = losses.group_advantages(t([1.0, 2.0, 3.0, 0.0]), 2, scale="none")
    torch.testing.assert_close(adv_none, t([-0.5, 0.5, 1.5, -1.5]))
    # Batch scale: one std over [1, 2, 3, 0] (Bessel: sqrt(5/3)).
    adv_batch, _ = losses.group_advantages(t([1.0, 2.0, 3.0, 0.0]), 2, scale="batch")
    torch.testing.assert_close(adv_batch, adv_none / (math.sqrt(5 / 3) + 1e-4))


def test_rloo_leave_one_out_baseline():
    """[1, 2, 6]: baselines (2+6)/2, (1+6)/2, (1+2)/2 = 4, 3.5, 1.5 -> [-3, -1.5, 4.5]."""
    adv = losses.rloo_advantages(t([1.0, 2.0, 6.0]), group_size=3)
    torch.testing.assert_close(adv, t([-3.0, -1.5, 4.5]))
    # Leave-one-out advantages are G/(G-1) times the mean-centred rewards, so they sum to zero.
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(12, generator=gen)
    adv_r = losses.rloo_advantages(r, group_size=4).view(3, 4)
    centred = r.view(3, 4) - r.view(3, 4).mean(dim=1, keepdim=True)
    torch.testing.assert_close(adv_r, centred * 4 / 3)


def test_rloo_unscorable_and_lonely_completions_get_zero():
    """[1, NaN, 3, 4]: scorable total 8 over 3 -> baselines 3.5, 2.5, 2 -> [-2.5, 0, .5, 2]."""
    adv = losses.rloo_advantages(t([1.0, float("nan"), 3.0, 4.0]), group_size=4)
    torch.testing.assert_close(adv, t([-2.5, 0.0, 0.5, 2.0]))
    torch.testing.assert_close(losses.rloo_advantages(t([float("nan"), 2.0]), 2), t([0.0, 0.0]))
    normed = losses.rloo_advantages(t([1.0, 2.0, 6.0, 0.0]), 2, normalize=True)
    assert normed.mean().item() == pytest.approx(0.0, abs=1e-6)


def test_grpo_loss_sequence_and_token_averaging():
    """Ratio 1 everywhere, so the per-token loss is -A. mask [[1, 1], [1, 0]], A = [1, -.5]:
    sequence mean: (-1 + .5) / 2 = -.25; token mean: (-1 - 1 + .5) / 3 = -.5.
    With pi_ref / pi = .5, k3 = log 2 - .5 per token, so beta .1 adds .1 * (log 2 - .5)."""
    logp = torch.full((2, 2), math.log(0.5))
    mask = t([1.0, 1.0], [1.0, 0.0])
    adv = t([1.0, -0.5])
    seq, _ = losses.grpo_loss(logp, logp, None, adv, mask)
    tok, _ = losses.grpo_loss(logp, logp, None, adv, mask, token_level=True)
    assert seq.item() == pytest.approx(-0.25)
    assert tok.item() == pytest.approx(-0.5)
    ref = logp + math.log(0.5)
    seq_kl, stats = losses.grpo_loss(logp, logp, ref, adv, mask, beta=0.1)
    assert seq_kl.item() == pytest.approx(-0.25 + 0.1 * (math.log(2) - 0.5))
    assert stats["kl"].item() == pytest.approx(math.log(2) - 0.5)
    with pytest.raises(ValueError, match="ref_logprobs"):
        losses.grpo_loss(logp, logp, None, adv, mask, beta=0.1)


def test_grpo_loss_ignores_rows_with_an_all_zero_mask():
    """A skipped row (mask all zero) counts in neither average: same loss as without it."""
    logp = torch.zeros(3, 2)
    adv = t([1.0, -0.5, 100.0])
    mask = t([1.0, 1.0], [1.0, 0.0], [0.0, 0.0])
    for token_level in (False, True):
        with_row, _ = losses.grpo_loss(logp, logp, None, adv, mask, token_level=token_level)
        without, _ = losses.grpo_loss(
            logp[:2], logp[:2], None, adv[:2], mask[:2], token_level=token_level
        )
        assert with_row.item() == pytest.approx(without.item())


def test_grpo_loss_clips_like_ppo():
    """Ratio 1.5 with A = 1 is clipped to 1.2: loss -1.2, clipfrac 1."""
    logp = torch.tensor([[math.log(1.5)]])
    loss, stats = losses.grpo_loss(logp, torch.zeros(1, 1), None, t([1.0]), t([[1.0]]), 0.2)
    assert loss.item() == pytest.approx(-1.2)
    assert stats["clipfrac"].item() == 1.0


def test_adaptive_kl_controller_arithmetic():
    """beta .1, target 6, horizon 10000, 64 episodes:
    KL 9   -> error clip(.5) = .2  -> .1 * (1 + .2 * 64 / 10000) = .100128
    KL 3   -> error clip(-.5) = -.2 -> .1 * (1 - .00128)        = .099872
    KL 6.6 -> error .1              -> .1 * (1 + .1 * .0064)     = .100064"""
    assert losses.adaptive_kl_coef(0.1, 9.0, 6.0, 10000, 64) == pytest.approx(0.100128)
    assert losses.adaptive_kl_coef(0.1, 3.0, 6.0, 10000, 64) == pytest.approx(0.099872)
    assert losses.adaptive_kl_coef(0.1, 6.6, 6.0, 10000, 64) == pytest.approx(0.100064)
    ctl = losses.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(9.0, 64)
    ctl.update(9.0, 64)
    assert ctl.value == pytest.approx(0.1 * 1.00128**2)
    fixed = losses.FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05


def test_eos_trick_truncates_after_the_stop_token_and_penalises_missing_eos():
    ids = torch.tensor([[5, 7, 2, 9, 2], [5, 6, 7, 8, 9]])
    truncated, mask, has_stop = losses.truncate_after_stop_token(
        ids, stop_token_id=2, pad_token_id=0
    )
    assert truncated.tolist() == [[5, 7, 2, 0, 0], [5, 6, 7, 8, 9]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert has_stop.tolist() == [True, False]
    scores = t([1.0, 1.0])
    torch.testing.assert_close(losses.penalize_missing_eos(scores, has_stop, 1.0), t([1.0, 0.0]))
    torch.testing.assert_close(
        losses.penalize_missing_eos(scores, has_stop, 1.0, mode="replace"), t([1.0, -1.0])
    )
