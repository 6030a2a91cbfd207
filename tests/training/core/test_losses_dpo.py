"""DPO-family losses against values worked out by hand (torchtune style).

Useful constants: sigma(x) = 1 / (1 + e^-x), so
  -log sigma(1)  = log(1 + e^-1) = 0.3132617      -log sigma(-1) = log(1 + e) = 1.3132617
  -log sigma(3)  = log(1 + e^-3) = 0.0485874      -log sigma(0)  = log 2      = 0.6931472
  sigma(1.5)     = 0.8175745
and -log sigma(-x) = -log sigma(x) + x for every x.
"""

from __future__ import annotations

import math

import pytest
import torch

from training.core.losses import (
    PREFERENCE_LOSSES,
    PairLogps,
    PreferenceHyper,
    dpo_loss,
    ipo_loss,
    kto_kl_estimate,
    kto_loss,
    orpo_loss,
    preference_loss,
    robust_dpo_loss,
    simpo_loss,
)

LOG2 = math.log(2.0)
NLS1 = math.log1p(math.exp(-1.0))  # -log sigma(1)
NLS3 = math.log1p(math.exp(-3.0))  # -log sigma(3)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def three_pairs() -> dict[str, torch.Tensor]:
    """h = (pc - rc) - (pr - rr) = 2, 0, -2; with beta 0.5 the logits are 1, 0, -1."""
    return {
        "policy_chosen_logps": t(-1.0, -2.0, -3.0),
        "policy_rejected_logps": t(-3.0, -2.0, -1.0),
        "ref_chosen_logps": t(-2.0, -2.0, -2.0),
        "ref_rejected_logps": t(-2.0, -2.0, -2.0),
    }


def test_dpo_sigmoid_matches_hand_values() -> None:
    """-log sigma(beta h) at beta h = 1, 0, -1: 0.3132617, log 2, 1.3132617.

    Rewards are beta * log-ratio: chosen 0.5 * (1, 0, -1), rejected 0.5 * (-1, 0, 1).
    """
    losses, chosen, rejected = dpo_loss(**three_pairs(), beta=0.5)
    torch.testing.assert_close(losses, t(NLS1, LOG2, NLS1 + 1.0))
    torch.testing.assert_close(chosen, t(0.5, 0.0, -0.5))
    torch.testing.assert_close(rejected, t(-0.5, 0.0, 0.5))


def test_dpo_margin_is_an_offset_on_the_logit() -> None:
    """ODPO: margin 1 moves beta h = 1 to logit 0 (log 2) and beta h = 0 to -1 (1.3132617)."""
    losses, _, _ = dpo_loss(**three_pairs(), beta=0.5, margin=t(1.0, 1.0, 0.0))
    torch.testing.assert_close(losses, t(LOG2, NLS1 + 1.0, NLS1 + 1.0))


def test_cdpo_matches_hand_values() -> None:
    """eps = 0.25 at beta h = 1: 0.75 * 0.3132617 + 0.25 * 1.3132617 = 0.3132617 + 0.25."""
    losses, _, _ = dpo_loss(**three_pairs(), beta=0.5, label_smoothing=0.25)
    # With l(x) = -log sigma(x): (1 - eps) l(x) + eps (l(x) + x) = l(x) + eps x.
    torch.testing.assert_close(losses, t(NLS1 + 0.25, LOG2, NLS1 + 1.0 - 0.25))


def test_cdpo_gradient_vanishes_where_sigma_beta_h_is_one_minus_eps() -> None:
    """dL/dh = beta (sigma(beta h) - (1 - eps)): zero at h* = logit(1 - eps) / beta.

    With eps = 0.1, beta = 0.5: h* = 2 log 9 = 4.3944492. Plain DPO still pushes there
    (gradient -beta * eps = -0.05 w.r.t. h), and cDPO pushes h back down above h*.
    """
    eps, beta = 0.1, 0.5
    h_star = math.log((1 - eps) / eps) / beta
    for h, expected in [(h_star, 0.0), (h_star + 2.0, None), (0.0, beta * (0.5 - 0.9))]:
        chosen = t(h).requires_grad_(True)
        loss, _, _ = dpo_loss(chosen, t(0.0), t(0.0), t(0.0), beta=beta, label_smoothing=eps)
        loss.sum().backward()
        assert chosen.grad is not None
        if expected is None:
            assert chosen.grad.item() > 0.0  # past the target: pulled back
        else:
            assert chosen.grad.item() == pytest.approx(expected, abs=1e-12)
    chosen = t(h_star).requires_grad_(True)
    plain, _, _ = dpo_loss(chosen, t(0.0), t(0.0), t(0.0), beta=beta)
    plain.sum().backward()
    assert chosen.grad is not None
    assert chosen.grad.item() == pytest.approx(-beta * eps, abs=1e-12)


def test_robust_dpo_matches_hand_values() -> None:
    """[(1 - eps) l(x) - eps (l(x) + x)] / (1 - 2 eps) = l(x) - eps x / (1 - 2 eps).

    eps = 0.25: l(x) - 0.5 x at x = 1, 0, -1 -> 0.3132617 - 0.5, log 2, 1.3132617 + 0.5.
    """
    losses, _, _ = robust_dpo_loss(**three_pairs(), beta=0.5, epsilon=0.25)
    torch.testing.assert_close(losses, t(NLS1 - 0.5, LOG2, NLS1 + 1.5))


def test_robust_dpo_is_unbiased_under_label_flips() -> None:
    """E_flip[rDPO] = (1-eps) Lr(h) + eps Lr(-h) = l(beta h) exactly, the clean DPO loss.

    Checked exactly, and by Monte Carlo: 20,000 pairs, labels flipped with probability 0.2.
    The same flips bias plain DPO upwards by eps * E[beta h] (here 0.2 * 1 = 0.2).
    """
    eps, beta = 0.2, 1.0
    gen = torch.Generator().manual_seed(0)
    n = 20_000
    h = 1.0 + torch.randn(n, generator=gen, dtype=torch.float64)  # clean margins, mean 1
    zeros = torch.zeros(n, dtype=torch.float64)
    clean, _, _ = dpo_loss(h, zeros, zeros, zeros, beta=beta)
    as_labeled, _, _ = robust_dpo_loss(h, zeros, zeros, zeros, beta=beta, epsilon=eps)
    swapped, _, _ = robust_dpo_loss(zeros, h, zeros, zeros, beta=beta, epsilon=eps)
    torch.testing.assert_close((1 - eps) * as_labeled + eps * swapped, clean)

    flip = torch.rand(n, generator=gen, dtype=torch.float64) < eps
    chosen, rejected = torch.where(flip, zeros, h), torch.where(flip, h, zeros)
    robust_noisy, _, _ = robust_dpo_loss(chosen, rejected, zeros, zeros, beta=beta, epsilon=eps)
    plain_noisy, _, _ = dpo_loss(chosen, rejected, zeros, zeros, beta=beta)
    assert robust_noisy.mean().item() == pytest.approx(clean.mean().item(), abs=0.03)
    assert plain_noisy.mean().item() - clean.mean().item() == pytest.approx(0.2, abs=0.03)


def test_robust_dpo_rejects_eps_of_one_half() -> None:
    with pytest.raises(ValueError, match="epsilon"):
        robust_dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), epsilon=0.5)


def test_ipo_matches_hand_values() -> None:
    """tau = 0.5 so the target 1/(2 tau) = 1.

    Summed: h = 2, 0, -2 -> (h - 1)^2 = 1, 1, 9.
    Per token, lengths chosen 2, rejected 4: log-ratios 1/2 and -1/4, 0 and 0, -1/2 and 1/4,
    h = 0.75, 0, -0.75 -> 0.0625, 1, 3.0625; rewards tau * log-ratio = 0.25, -0.125 (pair 1).
    """
    pairs = three_pairs()
    losses, _, _ = ipo_loss(**pairs, tau=0.5)
    torch.testing.assert_close(losses, t(1.0, 1.0, 9.0))
    losses, chosen, rejected = ipo_loss(
        **pairs, tau=0.5, chosen_lengths=t(2.0, 2.0, 2.0), rejected_lengths=t(4.0, 4.0, 4.0)
    )
    torch.testing.assert_close(losses, t(0.0625, 1.0, 3.0625))
    torch.testing.assert_close(chosen, t(0.25, 0.0, -0.25))
    torch.testing.assert_close(rejected, t(-0.125, 0.0, 0.125))


def test_simpo_matches_hand_values() -> None:
    """log pi(y_w) = -4 over 4 tokens (mean -1), log pi(y_l) = -9 over 3 tokens (mean -3).

    beta 2, gamma 1: logit 2 * -1 - 2 * -3 - 1 = 3 -> 0.0485874; rewards -2 and -6.
    A margin of 3 brings the logit to 0 -> log 2.
    """
    losses, chosen, rejected = simpo_loss(t(-4.0), t(-9.0), t(4.0), t(3.0), beta=2.0, gamma=1.0)
    torch.testing.assert_close(losses, t(NLS3))
    torch.testing.assert_close(chosen, t(-2.0))
    torch.testing.assert_close(rejected, t(-6.0))
    losses, _, _ = simpo_loss(t(-4.0), t(-9.0), t(4.0), t(3.0), gamma=1.0, margin=t(3.0))
    torch.testing.assert_close(losses, t(LOG2))


def test_orpo_matches_hand_values() -> None:
    """Mean log-probs -1 (chosen, -2 over 2 tokens) and -2 (rejected, -6 over 3 tokens).

    log odds(P) = log P - log(1 - P). Since 1 - e^-2 = (1 - e^-1)(1 + e^-1), the difference
    of log odds is -1 + 2 + log(1 + e^-1) = 1.3132617, and -log sigma(1.3132617) = 0.2381830.
    loss = NLL 1 + lambda 0.1 * 0.2381830 = 1.0238183; rewards 0.1 * (-1, -2).
    """
    losses, chosen, rejected = orpo_loss(t(-2.0), t(-6.0), t(2.0), t(3.0), lam=0.1)
    log_odds = 1.0 + NLS1
    assert log_odds == pytest.approx(1.3132617, abs=1e-7)
    torch.testing.assert_close(losses, t(1.0 + 0.1 * math.log1p(math.exp(-log_odds))))
    assert losses.item() == pytest.approx(1.0238183, abs=1e-7)
    torch.testing.assert_close(chosen, t(-0.1))
    torch.testing.assert_close(rejected, t(-0.2))


def test_kto_value_function() -> None:
    """r = 2 (desirable), -1 (undesirable); z0 = 0.5, beta 1, lambda_D 1, lambda_U 2.

    Desirable: v = 1 * sigma(2 - 0.5) = 0.8175745, loss 1 - v = 0.1824255.
    Undesirable: v = 2 * sigma(0.5 - (-1)) = 1.6351490, loss 2 - v = 0.3648510.
    """
    losses, rewards = kto_loss(
        t(-1.0, -4.0),
        t(-3.0, -3.0),
        torch.tensor([True, False]),
        t(0.5)[0],
        beta=1.0,
        lambda_d=1.0,
        lambda_u=2.0,
    )
    torch.testing.assert_close(losses, t(0.1824255238, 0.3648510476))
    torch.testing.assert_close(rewards, t(2.0, -1.0))


def test_kto_loss_saturates_unlike_dpo() -> None:
    """Prospect-theory value: a very unlikely undesirable answer adds at most lambda_U."""
    losses, _ = kto_loss(t(-1000.0), t(0.0), torch.tensor([False]), t(0.0)[0], beta=1.0)
    assert losses.item() == pytest.approx(0.0, abs=1e-12)
    losses, _ = kto_loss(t(1000.0), t(0.0), torch.tensor([False]), t(0.0)[0], beta=1.0)
    assert losses.item() == pytest.approx(1.0, abs=1e-12)


def test_kto_kl_estimate_is_clamped_and_detached() -> None:
    """Mismatched log-ratios (1, -3, 0.5): mean -0.5 -> 0; (1, 2): 1.5."""
    policy = t(1.0, -3.0, 0.5).requires_grad_(True)
    z0 = kto_kl_estimate(policy, t(0.0, 0.0, 0.0))
    assert z0.item() == 0.0
    assert not z0.requires_grad
    assert kto_kl_estimate(t(1.0, 2.0), t(0.0, 0.0)).item() == pytest.approx(1.5)


def make_pairs(with_reference: bool = True) -> PairLogps:
    pairs = three_pairs()
    return PairLogps(
        chosen=pairs["policy_chosen_logps"],
        rejected=pairs["policy_rejected_logps"],
        chosen_lengths=t(2.0, 2.0, 2.0),
        rejected_lengths=t(4.0, 4.0, 4.0),
        ref_chosen=pairs["ref_chosen_logps"] if with_reference else None,
        ref_rejected=pairs["ref_rejected_logps"] if with_reference else None,
    )


def test_registry_dispatches_to_the_pure_functions() -> None:
    hyper = PreferenceHyper(beta=0.5, label_smoothing=0.25, ipo_tau=0.5)
    pairs = make_pairs()
    expected = {
        "sigmoid": t(NLS1, LOG2, NLS1 + 1.0),
        "cdpo": t(NLS1 + 0.25, LOG2, NLS1 + 0.75),
        "robust": t(NLS1 - 0.5, LOG2, NLS1 + 1.5),
        "ipo": t(0.0625, 1.0, 3.0625),
    }
    for name, values in expected.items():
        losses, _, _ = preference_loss(name, pairs, hyper)
        torch.testing.assert_close(losses, values, msg=name)
    with pytest.raises(ValueError, match="unknown preference loss"):
        preference_loss("nope", pairs, hyper)


def test_kto_pair_scores_chosen_as_desirable_and_rejected_as_undesirable() -> None:
    """Log-ratios: chosen (1, 0, -1), rejected (-1, 0, 1); batch mean 0 -> z0 = 0.

    beta 0.5: pair loss = (1 - sigma(0.5 r_w)) + (1 - sigma(-0.5 r_l)) = 2 - 2 sigma(0.5 r_w)
    since r_l = -r_w here: 2 - 2 sigma(0.5) = 0.7550813, 1, 2 - 2 sigma(-0.5) = 1.2449187.
    """
    losses, chosen, _ = preference_loss("kto_pair", make_pairs(), PreferenceHyper(beta=0.5))
    s = 1.0 / (1.0 + math.exp(-0.5))
    torch.testing.assert_close(losses, t(2 - 2 * s, 1.0, 2 - 2 * (1 - s)))
    torch.testing.assert_close(chosen, t(0.5, 0.0, -0.5))


def test_simpo_and_orpo_need_no_reference() -> None:
    """Reference-free losses run without reference log-probs and ignore them when given."""
    hyper = PreferenceHyper(beta=2.0, simpo_gamma=1.0, orpo_lambda=0.1)
    for name in ("simpo", "orpo"):
        assert not PREFERENCE_LOSSES[name].needs_reference
        without, _, _ = preference_loss(name, make_pairs(with_reference=False), hyper)
        with_ref, _, _ = preference_loss(name, make_pairs(with_reference=True), hyper)
        torch.testing.assert_close(without, with_ref)
    for name in ("sigmoid", "ipo", "cdpo", "robust", "kto_pair"):
        assert PREFERENCE_LOSSES[name].needs_reference
        with pytest.raises(ValueError, match="reference"):
            preference_loss(name, make_pairs(with_reference=False), hyper)


def test_soft_labels_for_ties() -> None:
    """A tie (p = 0.5) at logit 1: 0.5 l(1) + 0.5 (l(1) + 1) = 0.3132617 + 0.5.

    cDPO eps = 0.25 on a hard label is the soft label p = 0.75; on a tie it stays 0.5.
    IPO with p = 0.5 regresses h onto (2p - 1) / (2 tau) = 0: summed h = 2 -> loss 4.
    """
    pairs = three_pairs()
    tie = t(0.5, 0.5, 0.5)
    losses, _, _ = dpo_loss(**pairs, beta=0.5, label=tie)
    torch.testing.assert_close(losses, t(NLS1 + 0.5, LOG2, NLS1 + 0.5))
    smoothed, _, _ = dpo_loss(**pairs, beta=0.5, label_smoothing=0.25)
    soft, _, _ = dpo_loss(**pairs, beta=0.5, label=t(0.75, 0.75, 0.75))
    torch.testing.assert_close(smoothed, soft)
    both, _, _ = dpo_loss(**pairs, beta=0.5, label_smoothing=0.25, label=tie)
    torch.testing.assert_close(both, losses)
    losses, _, _ = ipo_loss(**pairs, tau=0.5, label=tie)
    torch.testing.assert_close(losses, t(4.0, 0.0, 4.0))
