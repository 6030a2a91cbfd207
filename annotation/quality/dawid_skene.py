"""Dawid & Skene (1979): each rater's confusion matrix and each item's true class by EM,
and the training weight that follows from them."""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from annotation.quality.agreement import Rating


@dataclass(frozen=True)
class DawidSkeneResult:
    """Matrices and vectors are in ``classes`` order. confusion[rater][k][l] = P(rater says
    classes[l] | true class is classes[k]); each row sums to 1."""

    classes: tuple[Hashable, ...]
    priors: dict[Hashable, float]
    confusion: dict[Hashable, tuple[tuple[float, ...], ...]]
    posteriors: dict[Hashable, tuple[float, ...]]  # item -> P(true class | all its labels)
    reliability: dict[Hashable, float]  # P(rater's label == true class) = sum_k pi_k c_kk
    iterations: int
    converged: bool  # False: stopped at max_iter with a posterior still moving by tol
    log_likelihood: float  # log P(all labels) under the last M-step's parameters


def dawid_skene(
    ratings: Iterable[Rating],
    *,
    classes: Sequence[Hashable],
    max_iter: int = 200,
    tol: float = 1e-6,
    smoothing: float = 1.0,
) -> DawidSkeneResult:
    """Dawid & Skene (1979): EM for each rater's confusion matrix and each item's true class.

    Starts from majority-vote soft labels (each item's share of each label), then alternates
    the M-step (priors and confusion matrices from the soft labels) and the E-step (item
    posteriors), until no posterior moves by ``tol`` or ``max_iter`` rounds. ``smoothing``
    is an add-``smoothing`` (Laplace) pseudo-count in every confusion cell and prior: a rater
    seen n times on a class gets that row pulled towards uniform with weight K*s/(n + K*s),
    so three labels never make a 0/1 confusion row (and a log of zero never happens).
    Vectorised with bincount over the (N, K) rating-by-class table: 200k ratings x 200
    rounds take seconds. A label outside ``classes`` raises ValueError, as do no ratings.
    """
    index = {label: k for k, label in enumerate(classes)}
    if len(index) != len(classes) or len(index) < 2 or smoothing <= 0:
        raise ValueError("need two or more distinct classes and smoothing > 0")
    items: dict[Hashable, int] = {}
    raters: dict[Hashable, int] = {}
    rows = []
    for item_id, rater_id, value in ratings:
        if value is None:
            continue
        if value not in index:
            raise ValueError(f"label {value!r} is not one of the classes")
        rows.append(
            (
                items.setdefault(item_id, len(items)),
                raters.setdefault(rater_id, len(raters)),
                index[value],
            )
        )
    if not rows:
        raise ValueError("no ratings")
    item, rater, label = np.array(rows, dtype=np.int64).T
    n_items, n_raters, k = len(items), len(raters), len(index)
    classes_k = np.arange(k)
    # Flat indices into (raters, K, K) confusion and (items, K) posteriors, one per (rating,
    # true class): the whole EM is gathers and bincounts over these two (N, K) tables.
    conf_at = (rater * k * k + label)[:, None] + classes_k * k
    post_at = item[:, None] * k + classes_k
    post = np.bincount(item * k + label, minlength=n_items * k).reshape(n_items, k).astype(float)
    post /= post.sum(axis=1, keepdims=True)
    converged, log_likelihood, iterations = False, -math.inf, 0
    while iterations < max_iter and not converged:
        iterations += 1
        counts = np.bincount(
            conf_at.ravel(), weights=post[item].ravel(), minlength=n_raters * k * k
        ).reshape(n_raters, k, k)
        confusion = (counts + smoothing) / (counts.sum(axis=2, keepdims=True) + k * smoothing)
        priors = (post.sum(axis=0) + smoothing) / (n_items + k * smoothing)
        log_post = np.log(priors) + np.bincount(
            post_at.ravel(),
            weights=np.log(confusion).ravel()[conf_at].ravel(),
            minlength=n_items * k,
        ).reshape(n_items, k)
        top = log_post.max(axis=1, keepdims=True)
        norm = top + np.log(np.exp(log_post - top).sum(axis=1, keepdims=True))
        new_post = np.exp(log_post - norm)
        change = float(np.abs(new_post - post).max())
        post, log_likelihood, converged = new_post, float(norm.sum()), change < tol
    rater_ids = list(raters)
    return DawidSkeneResult(
        classes=tuple(classes),
        priors=dict(zip(classes, priors.tolist(), strict=True)),
        confusion={r: tuple(map(tuple, confusion[j].tolist())) for j, r in enumerate(rater_ids)},
        posteriors=dict(zip(items, map(tuple, post.tolist()), strict=True)),
        reliability=dict(
            zip(rater_ids, (confusion.diagonal(axis1=1, axis2=2) @ priors).tolist(), strict=True)
        ),
        iterations=iterations,
        converged=converged,
        log_likelihood=log_likelihood,
    )


def judgment_weight(result: DawidSkeneResult, rater_id: Hashable) -> float:
    """The weight reward-model training should give this rater's judgments, in [0, 1]: the
    rater's kappa against the latent true class, (p_agree - p_chance) / (1 - p_chance),
    clipped at 0.

    p_agree is the reliability; p_chance = sum_l pi_l q_l is what a rater would agree with
    the truth by luck, given the rater's own label frequencies q = pi @ confusion. Against
    those, not against the priors, a rater whose labels ignore the truth (identical confusion
    rows, so p_agree = p_chance) gets 0 whatever they click: the uniform random clicker and
    the always-"a" clicker alike (against the priors the latter would look better than chance
    whenever "a" is the common class). The expected log-likelihood ratio would also do, but
    is unbounded and harder to read on an admin page. A perfect rater gets 1 (less the
    smoothing's pull on a rater with few labels); worse than chance gets 0, not a negative
    weight. Unknown rater: KeyError."""
    priors = np.array([result.priors[c] for c in result.classes])
    confusion = np.array(result.confusion[rater_id])
    agree = float(priors @ confusion.diagonal())
    chance = float(priors @ (priors @ confusion))
    if chance > 1 - 1e-12:  # one class holds all the mass: nothing to be right about
        return 0.0
    return min(1.0, max(0.0, (agree - chance) / (1 - chance)))
