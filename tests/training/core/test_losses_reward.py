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
"""

from __future__ import annotations

import math

import pytest
import torch

from training.core.losses import bradley_terry_loss, preference_log_probs

T = torch.tensor


def close(value: torch.Tensor, expected: float) -> None:
    assert float(value) == pytest.approx(expected, abs=1e-6)


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


def test_weights_scale_each_pair_and_the_batch_is_averaged() -> None:
    # pairs: (d = 1, w = 2) and (d = 1, w = 0): mean(2 * 0.3132617, 0) = 0.3132617
    close(bradley_terry_loss(T([1.0, 1.0]), T([0.0, 0.0]), weight=T([2.0, 0.0])), 0.3132617)


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
