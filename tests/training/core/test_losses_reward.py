"""Bradley-Terry reward loss against values worked out by hand.

With d = r_chosen - r_rejected and sigma the logistic function:
  d = 1:                   -log sigma(1)            = log(1 + e^-1)          = 0.3132617
  d = 1, margin 0.5:       -log sigma(0.5)          = log(1 + e^-0.5)        = 0.4740770
  d = 1, tie (y = 0.5):    -(log sigma(1) + log sigma(-1)) / 2
                         = (0.3132617 + 1.3132617) / 2                      = 0.8132617
  d = 1, label y = 0:      -log sigma(-1)           = log(1 + e^1)           = 1.3132617
  lapse eps = 0.1, d = 0:  P = 0.9 * 0.5 + 0.05 = 0.5,    -log 0.5          = 0.6931472
  lapse eps = 0.1, d = 100: P = 0.9 * 1 + 0.05 = 0.95,    -log 0.95         = 0.0512933
  lapse eps = 0.1, d = -100: P = 0.05,                    -log 0.05         = 2.9957323
  centring c = 0.01, r_c = 1, r_r = 0: 0.3132617 + 0.01 * (1 + 0)^2         = 0.3232617
  d = 0:                   -log sigma(0)            = log 2                  = 0.6931472
Weights make a weighted mean sum(w * l) / sum(w):
  (d = 1, w = 1), (d = 0, w = 3): (0.3132617 + 3 * 0.6931472) / 4           = 0.5981758
"""

from __future__ import annotations

import math

import pytest
import torch

from training.core.losses import bradley_terry_loss, preference_log_probs

T = torch.tensor


def close(value: torch.Tensor, expected: float) -> None:
    assert float(value.detach()) == pytest.approx(expected, abs=1e-6)


def test_plain_bradley_terry() -> None:
    close(bradley_terry_loss(T([1.0]), T([0.0])), 0.3132617)


def test_margin_shifts_the_logit() -> None:
    close(bradley_terry_loss(T([1.0]), T([0.0]), margin=T([0.5])), 0.4740770)


def test_tie_is_a_half_target_and_label_zero_swaps_sides() -> None:
    close(bradley_terry_loss(T([1.0]), T([0.0]), label=T([0.5])), 0.8132617)
    close(bradley_terry_loss(T([1.0]), T([0.0]), label=T([0.0])), 1.3132617)
    # A tie is minimised when the rewards are equal: the gradient at d = 0 is zero.
    r = T([0.0], requires_grad=True)
    bradley_terry_loss(r, T([0.0]), label=T([0.5])).backward()
    assert r.grad is not None
    close(r.grad[0], 0.0)


def test_weights_make_a_weighted_mean() -> None:
    # pairs: (d = 1, w = 2) and (d = 1, w = 0): (2 * 0.3132617 + 0) / (2 + 0) = 0.3132617
    close(bradley_terry_loss(T([1.0, 1.0]), T([0.0, 0.0]), weight=T([2.0, 0.0])), 0.3132617)
    close(bradley_terry_loss(T([1.0, 0.0]), T([0.0, 0.0]), weight=T([1.0, 3.0])), 0.5981758)
    # only the ratios matter: (2, 6) is (1, 3)
    close(bradley_terry_loss(T([1.0, 0.0]), T([0.0, 0.0]), weight=T([2.0, 6.0])), 0.5981758)


def test_a_zero_weight_pair_counts_for_nothing() -> None:
    # (d = 1, w = 1) and a confidently wrong (d = -5, w = 0): the first pair's loss alone
    chosen = T([1.0, -5.0], requires_grad=True)
    close(bradley_terry_loss(chosen, T([0.0, 0.0]), weight=T([1.0, 0.0])), 0.3132617)
    bradley_terry_loss(chosen, T([0.0, 0.0]), weight=T([1.0, 0.0])).backward()
    assert chosen.grad is not None
    close(chosen.grad[1], 0.0)
    close(chosen.grad[0], -(1 - 1 / (1 + math.exp(-1))))  # d/dd -log sigma(d) = -(1 - sigma(d))


def test_unit_weights_equal_the_unweighted_loss_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(7, generator=g), torch.randn(7, generator=g)
    label, margin = torch.rand(7, generator=g), torch.rand(7, generator=g)
    for lapse in (0.0, 0.1):
        plain = bradley_terry_loss(chosen, rejected, margin=margin, label=label, lapse=lapse)
        ones = bradley_terry_loss(
            chosen, rejected, margin=margin, label=label, lapse=lapse, weight=torch.ones(7)
        )
        assert torch.equal(plain, ones)


def test_all_zero_weights_give_zero_loss_and_gradient_not_nan() -> None:
    chosen = T([1.0, -3.0], requires_grad=True)
    loss = bradley_terry_loss(chosen, T([0.0, 0.0]), weight=T([0.0, 0.0]))
    loss.backward()
    assert float(loss) == 0.0
    assert chosen.grad is not None
    assert torch.equal(chosen.grad, torch.zeros(2))
    # the same with the step's denominator given, as a trainer's micro-batch does
    assert float(bradley_terry_loss(T([1.0]), T([0.0]), weight=T([0.0]), weight_sum=0.0)) == 0.0


def test_micro_batches_dividing_by_the_step_weight_sum_add_up_to_the_whole_batch() -> None:
    chosen, rejected = T([1.0, 0.0, 2.0, -1.0]), T([0.0, 0.0, 0.5, 0.0])
    weight = T([1.0, 3.0, 0.5, 0.0])
    whole = bradley_terry_loss(chosen, rejected, weight=weight)
    first, rest = (
        bradley_terry_loss(chosen[s], rejected[s], weight=weight[s], weight_sum=4.5)
        for s in (slice(0, 1), slice(1, 4))
    )
    close(first + rest, float(whole))


def test_lapse_bounds_the_loss_of_confident_mistakes() -> None:
    close(bradley_terry_loss(T([0.0]), T([0.0]), lapse=0.1), math.log(2))
    close(bradley_terry_loss(T([100.0]), T([0.0]), lapse=0.1), 0.0512933)
    close(bradley_terry_loss(T([-100.0]), T([0.0]), lapse=0.1), 2.9957323)
    r = T([-1000.0], requires_grad=True)
    bradley_terry_loss(r, T([0.0]), lapse=0.1).backward()
    assert r.grad is not None
    assert torch.isfinite(r.grad).all()
    win, lose = preference_log_probs(T([3.0]), T([1.0]), lapse=0.2)
    close(win.exp() + lose.exp(), 1.0)  # the two outcomes stay a distribution


def test_centring_term() -> None:
    loss = bradley_terry_loss(T([1.0]), T([0.0]), center_rewards_coefficient=0.01)
    close(loss, 0.3232617)


def test_ensemble_heads_average_over_pairs_and_heads() -> None:
    # two heads on one pair: d = 1 and d = 0.5 with margin 0.5 -> (0.4740770 + log 2) / 2
    chosen, rejected = T([[1.0, 0.5]]), T([[0.0, 0.0]])
    close(bradley_terry_loss(chosen, rejected, margin=T([0.5])), (0.4740770 + math.log(2)) / 2)
    # per-head bootstrap weights (B, K): head 2 does not see the pair
    close(bradley_terry_loss(chosen, rejected, weight=T([[2.0, 0.0]])), 0.3132617)
