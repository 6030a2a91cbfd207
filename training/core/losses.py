"""Loss functions as pure tensor functions.

Every function documents its tensor shapes with ``# (B,)``-style comments and cites the paper
it comes from. Nothing here touches a model, an optimiser or a data loader, so each loss is
tested against values worked out by hand (tests/training/core/test_losses*.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ==== Reward model losses (owner: reward) ======================================================
#
# Bradley-Terry (1952) as used for reward models by Christiano et al. 2017 (arXiv 1706.03741,
# section 2.2.3) and InstructGPT (Ouyang et al. 2022, eq. 1): with d = r(x, y_c) - r(x, y_r),
#   P(y_c better) = sigmoid(d - m)                      m: a margin (Llama 2, Touvron et al. 2023)
#   P_lapse       = (1 - eps) * sigmoid(d - m) + eps / 2   eps: rater "lapse" rate (Christiano 2017)
#   loss          = -[y log P + (1 - y) log(1 - P)]        y: P(chosen better); 0.5 for a tie
# Rewards may carry a trailing ensemble dimension K: (B, K); per-pair tensors (B,) broadcast
# over it and the loss is the weighted mean over pairs and heads, sum(w * loss) / sum(w).


def preference_log_probs(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    lapse: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log P(chosen better), log P(rejected better))`` under BT with margin and lapse."""
    d = chosen_rewards - rejected_rewards  # (B,) or (B, K)
    if margin is not None:
        d = d - (margin if d.ndim == margin.ndim else margin.unsqueeze(-1))
    log_win, log_loss = F.logsigmoid(d), F.logsigmoid(-d)
    if lapse > 0.0:
        # log((1 - eps) * sigmoid(d) + eps / 2) without leaving log space, stable for large |d|.
        log_keep = torch.log1p(torch.tensor(-lapse, dtype=d.dtype, device=d.device))
        log_random = torch.log(torch.tensor(lapse / 2, dtype=d.dtype, device=d.device))
        log_win = torch.logaddexp(log_keep + log_win, log_random)
        log_loss = torch.logaddexp(log_keep + log_loss, log_random)
    return log_win, log_loss


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    label: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    weight_sum: float | torch.Tensor | None = None,
    lapse: float = 0.0,
    center_rewards_coefficient: float = 0.0,
) -> torch.Tensor:
    """Weighted mean Bradley-Terry negative log-likelihood of the rater labels; a scalar.

    ``chosen_rewards``/``rejected_rewards``: (B,) or (B, K) for K ensemble heads.
    ``margin``, ``label`` (probability that chosen is better, default 1), ``weight``: (B,), or
    (B, K) for per-head bootstrap weights; no weight means every weight is 1.

    The loss is ``sum(w * l) / sum(w)`` over every (pair, head) term. Dividing by the weight
    sum rather than the count makes only the weights' ratios matter: Dawid-Skene weights
    (``annotation.quality.judgment_weight``) lie in [0, 1], and ``mean(w * l)`` would also
    shrink the step size by the mean weight, so a weighted run would differ from an unweighted
    one at the same learning rate by more than which pairs it trusts. ``weight_sum`` replaces
    the denominator: a trainer that splits one optimiser step over micro-batches or processes
    passes the whole step's sum, so the step's gradient is the weighted mean over all its
    pairs however they were split. When every weight is 0 the numerator is 0 too and the loss
    is 0 with a zero gradient, never 0/0 = NaN.

    ``center_rewards_coefficient`` adds ``c * mean((r_c + r_r)^2)`` (Eisenstein et al. 2023,
    arXiv 2312.09244; TRL's ``center_rewards_coefficient``), an unweighted mean over the pairs
    given, which pins the otherwise free offset of the rewards near zero.
    """
    log_win, log_loss = preference_log_probs(
        chosen_rewards, rejected_rewards, margin=margin, lapse=lapse
    )  # (B,) or (B, K)

    def per_head(t: torch.Tensor) -> torch.Tensor:
        return t if t.ndim == log_win.ndim else t.unsqueeze(-1)

    if label is None:
        losses = -log_win
    else:
        y = per_head(label.to(log_win.dtype))
        losses = -(y * log_win + (1 - y) * log_loss)
    w = torch.ones_like(losses) if weight is None else per_head(weight.to(losses.dtype))
    w = w.expand_as(losses)
    total = w.sum() if weight_sum is None else torch.as_tensor(weight_sum, dtype=losses.dtype)
    # All weights 0: the numerator is exactly 0, so any positive floor gives 0, not NaN.
    loss = (w * losses).sum() / total.to(losses.device).clamp_min(torch.finfo(losses.dtype).tiny)
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss


# ==== end reward ===============================================================================

# ==== DPO family (owner: dpo) ==================================================================
#
# Notation, shared by every loss below: for a pair (x, y_w, y_l) the policy's summed completion
# log-probs are log pi(y_w|x), log pi(y_l|x) (B,), the reference's the same with pi_ref, and
#   h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]   (B,)
# Each function returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)): per-pair losses
# (the trainer weights and averages them) and the implicit rewards it logs, detached.
# A ``margin`` (B,) from the data is an offset on the logit, ODPO (Amini et al. 2024, arXiv
# 2402.10571): the pair counts as won only once beta * h exceeds it.


def _offset(logits: torch.Tensor, margin: torch.Tensor | None) -> torch.Tensor:
    return logits if margin is None else logits - margin  # (B,)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    margin: torch.Tensor | None = None,
    label: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO, Rafailov et al. 2023 (arXiv 2305.18290) eq. 7: ``-log sigma(beta * h)``.

    ``label_smoothing`` eps > 0 gives conservative DPO (cDPO; Mitchell 2023, "A note on DPO
    with noisy preferences"): the label is trusted with probability 1 - eps, so the loss is
    ``(1 - eps) L(y_w, y_l) + eps L(y_l, y_w)`` and its gradient in h,
    ``beta * (sigma(beta h) - (1 - eps))``, vanishes once sigma(beta h) = 1 - eps instead of
    pushing h to infinity. ``label`` (B,) is the probability that y_w is the better answer
    (1 by default, 0.5 for a tie): the same Bradley-Terry cross-entropy with a soft target,
    which cDPO then smooths further.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    logits = _offset(beta * (chosen_logratios - rejected_logratios), margin)  # (B,)
    p = torch.ones_like(logits) if label is None else label.to(logits.dtype)  # (B,)
    p = p * (1.0 - label_smoothing) + (1.0 - p) * label_smoothing  # (B,)
    losses = -p * F.logsigmoid(logits) - (1.0 - p) * F.logsigmoid(-logits)  # (B,)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def robust_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    epsilon: float = 0.1,
    margin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Robust DPO, Chowdhury et al. 2024 (arXiv 2403.00409) eq. 8.

    ``[(1 - eps) L(y_w, y_l) - eps L(y_l, y_w)] / (1 - 2 eps)`` with L the sigmoid DPO loss.
    Unlike cDPO this is an unbiased estimate of the clean loss when labels were flipped with
    probability eps: E_flip[loss] = L(y_w, y_l) exactly (the eps terms cancel). It can be
    negative for a single pair. Needs 0 <= eps < 1/2.
    """
    if not 0.0 <= epsilon < 0.5:
        raise ValueError(f"robust DPO needs 0 <= epsilon < 0.5, got {epsilon}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    logits = _offset(beta * (chosen_logratios - rejected_logratios), margin)  # (B,)
    clean = -F.logsigmoid(logits)  # (B,) loss if the label is right
    flipped = -F.logsigmoid(-logits)  # (B,) loss if it was flipped
    losses = ((1.0 - epsilon) * clean - epsilon * flipped) / (1.0 - 2.0 * epsilon)  # (B,)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    tau: float = 0.1,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    label: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO, Azar et al. 2023 (arXiv 2310.12036) eq. 17: ``(h - 1/(2 tau))^2``.

    The squared loss regresses h onto a finite target, so unlike DPO it does not reward
    driving the rejected log-prob to minus infinity on deterministic preferences. With
    ``chosen_lengths``/``rejected_lengths`` (B,) each log-ratio is divided by its completion's
    token count first: the convention the IPO authors' results use (and TRL's), which keeps
    tau comparable across completion lengths. Rewards are ``tau`` times those log-ratios.
    A soft ``label`` p (B,) moves the target to (2p - 1) / (2 tau), the minimiser of the
    squared loss averaged over a label drawn with probability p: 0 for a tie.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    if chosen_lengths is not None and rejected_lengths is not None:
        chosen_logratios = chosen_logratios / chosen_lengths.clamp(min=1)
        rejected_logratios = rejected_logratios / rejected_lengths.clamp(min=1)
    h = chosen_logratios - rejected_logratios  # (B,)
    target = 1.0 / (2.0 * tau) if label is None else (2.0 * label - 1.0) / (2.0 * tau)
    losses = (h - target) ** 2  # (B,)
    return losses, tau * chosen_logratios.detach(), tau * rejected_logratios.detach()


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
    margin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO, Meng et al. 2024 (arXiv 2405.14734) eq. 6, reference-free.

    ``-log sigma(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)``: the reward is the
    length-normalised log-prob (the quantity generation ranks by), so no reference model is
    needed and a longer answer gains nothing from length alone; gamma is a target reward
    margin. Rewards are ``beta`` times the mean per-token log-probs.
    """
    chosen_rewards = beta * policy_chosen_logps / chosen_lengths.clamp(min=1)  # (B,)
    rejected_rewards = beta * policy_rejected_logps / rejected_lengths.clamp(min=1)  # (B,)
    logits = _offset(chosen_rewards - rejected_rewards - gamma, margin)  # (B,)
    return -F.logsigmoid(logits), chosen_rewards.detach(), rejected_rewards.detach()


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    lam: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO, Hong et al. 2024 (arXiv 2403.07691) eqs. 4-7, reference-free.

    ``NLL(y_w) - lam * log sigma(log odds(y_w) - log odds(y_l))`` with P(y|x) the per-token
    geometric mean exp(mean log-prob) and odds(y) = P / (1 - P); the NLL term is the mean
    per-token negative log-likelihood of the chosen answer, so SFT and preference learning
    happen in one stage. Rewards are ``lam`` times the mean per-token log-probs.
    """
    chosen_mean = policy_chosen_logps / chosen_lengths.clamp(min=1)  # (B,) log P(y_w|x)
    rejected_mean = policy_rejected_logps / rejected_lengths.clamp(min=1)  # (B,)
    # log(1 - P) as log(-expm1(log P)): accurate for P near 1, where 1 - exp() cancels; the
    # clamp keeps an empty or certain completion (log P = 0) from giving log 0.
    chosen_odds = chosen_mean.clamp(max=-1e-6)  # (B,)
    rejected_odds = rejected_mean.clamp(max=-1e-6)  # (B,)
    log_odds = (chosen_odds - torch.log(-torch.expm1(chosen_odds))) - (
        rejected_odds - torch.log(-torch.expm1(rejected_odds))
    )  # (B,)
    losses = -chosen_mean - lam * F.logsigmoid(log_odds)  # (B,)
    return losses, lam * chosen_mean.detach(), lam * rejected_mean.detach()


def kto_kl_estimate(
    policy_mismatched_logps: torch.Tensor, ref_mismatched_logps: torch.Tensor
) -> torch.Tensor:
    """KTO's reference point z0, Ethayarajh et al. 2024 (arXiv 2402.01306) section 4.1.

    The KL(pi || pi_ref) is estimated on mismatched pairs (x_i, y_j), j != i, from the same
    batch; it is clamped at 0 and detached, so the policy cannot lower its loss by moving the
    reference point. Inputs (M,), output a scalar ().
    """
    return (policy_mismatched_logps - ref_mismatched_logps).mean().clamp(min=0).detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float = 0.1,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO, Ethayarajh et al. 2024 (arXiv 2402.01306) eq. 8, for unpaired labels.

    With r = log pi(y|x) - log pi_ref(y|x) and z0 = ``kl``, the value is
    ``v = lambda_D sigma(beta (r - z0))`` for a desirable answer and
    ``lambda_U sigma(beta (z0 - r))`` for an undesirable one; the loss is ``lambda_y - v``.
    Gains and losses saturate (prospect theory), so one very unlikely rejected answer cannot
    dominate. The paper keeps ``lambda_D n_D / (lambda_U n_U)`` in [1, 4/3].
    ``desirable`` is (B,) bool; returns (losses (B,), rewards beta * r (B,)).
    """
    logratios = policy_logps - ref_logps  # (B,)
    desirable = desirable.to(torch.bool)
    value = torch.where(
        desirable,
        lambda_d * torch.sigmoid(beta * (logratios - kl)),
        lambda_u * torch.sigmoid(beta * (kl - logratios)),
    )  # (B,)
    lambda_y = torch.where(
        desirable, torch.full_like(value, lambda_d), torch.full_like(value, lambda_u)
    )  # (B,)
    return lambda_y - value, beta * logratios.detach()


@dataclass(frozen=True)
class PairLogps:
    """Everything a pairwise loss may read about a batch of B pairs.

    ``ref_*`` are None for reference-free losses; lengths count completion tokens (B,).
    """

    chosen: torch.Tensor  # (B,) summed log pi(y_w|x)
    rejected: torch.Tensor  # (B,)
    chosen_lengths: torch.Tensor  # (B,)
    rejected_lengths: torch.Tensor  # (B,)
    ref_chosen: torch.Tensor | None = None  # (B,)
    ref_rejected: torch.Tensor | None = None  # (B,)
    margin: torch.Tensor | None = None  # (B,) ODPO offset, in logit units
    label: torch.Tensor | None = None  # (B,) P(y_w better); None means 1


@dataclass(frozen=True)
class PreferenceHyper:
    """Hyper-parameters of the family; each loss reads the ones it names."""

    beta: float = 0.1
    label_smoothing: float = 0.0  # cDPO and robust DPO's eps
    ipo_tau: float = 0.1
    ipo_length_normalize: bool = True
    simpo_gamma: float = 1.0
    orpo_lambda: float = 0.1
    kto_lambda_d: float = 1.0
    kto_lambda_u: float = 1.0


LossOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _refs(b: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    if b.ref_chosen is None or b.ref_rejected is None:
        raise ValueError("this preference loss needs reference log-probs")
    return b.ref_chosen, b.ref_rejected


def _sigmoid(b: PairLogps, p: PreferenceHyper) -> LossOutput:
    return dpo_loss(b.chosen, b.rejected, *_refs(b), beta=p.beta, margin=b.margin, label=b.label)


def _cdpo(b: PairLogps, p: PreferenceHyper) -> LossOutput:
    return dpo_loss(
        b.chosen,
        b.rejected,
        *_refs(b),
        beta=p.beta,
        label_smoothing=p.label_smoothing,
        margin=b.margin,
        label=b.label,
    )


def _robust(b: PairLogps, p: PreferenceHyper) -> LossOutput:
    return robust_dpo_loss(
        b.chosen, b.rejected, *_refs(b), beta=p.beta, epsilon=p.label_smoothing, margin=b.margin
    )


def _ipo(b: PairLogps, p: PreferenceHyper) -> LossOutput:
    norm = p.ipo_length_normalize
    return ipo_loss(
        b.chosen,
        b.rejected,
        *_refs(b),
        tau=p.ipo_tau,
        chosen_lengths=b.chosen_lengths if norm else None,
        rejected_lengths=b.rejected_lengths if norm else None,
        label=b.label,
    )


def _simpo(b: PairLogps, p: PreferenceHyper) -> LossOutput:
    return simpo_loss(
        b.chosen,
        b.rejected,
        b.chosen_lengths,
        b.rejected_lengths,
        beta=p.beta,
        gamma=p.simpo_gamma,
        margin=b.margin,
    )


def _orpo(b: PairLogps, p: PreferenceHyper) -> LossOutput:
    return orpo_loss(b.chosen, b.rejected, b.chosen_lengths, b.rejected_lengths, lam=p.orpo_lambda)


def _kto_pair(b: PairLogps, p: PreferenceHyper) -> LossOutput:
    # Paired data seen as one desirable and one undesirable answer per prompt. Without the
    # extra forward passes over mismatched pairs, z0 is the batch's mean log-ratio over both
    # answers (clamped, detached): a cruder estimate than training.core.kto's, which does them.
    ref_chosen, ref_rejected = _refs(b)
    policy = torch.cat([b.chosen, b.rejected])  # (2B,)
    ref = torch.cat([ref_chosen, ref_rejected])  # (2B,)
    kl = kto_kl_estimate(policy, ref)
    desirable = torch.cat([torch.ones_like(b.chosen), torch.zeros_like(b.rejected)]).bool()
    losses, rewards = kto_loss(
        policy,
        ref,
        desirable,
        kl,
        beta=p.beta,
        lambda_d=p.kto_lambda_d,
        lambda_u=p.kto_lambda_u,
    )  # (2B,)
    chosen_losses, rejected_losses = losses.chunk(2)
    chosen_rewards, rejected_rewards = rewards.chunk(2)
    return chosen_losses + rejected_losses, chosen_rewards, rejected_rewards


@dataclass(frozen=True)
class PreferenceLoss:
    """A registry entry: the loss and what it reads from a batch."""

    fn: Callable[[PairLogps, PreferenceHyper], LossOutput]
    paper: str
    needs_reference: bool = True
    uses_margin: bool = False  # reads PairLogps.margin
    soft_labels: bool = False  # reads PairLogps.label; other losses want hard, y_w-first pairs


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "sigmoid": PreferenceLoss(
        _sigmoid, "Rafailov et al. 2023, arXiv 2305.18290", uses_margin=True, soft_labels=True
    ),
    "ipo": PreferenceLoss(_ipo, "Azar et al. 2023, arXiv 2310.12036", soft_labels=True),
    "cdpo": PreferenceLoss(
        _cdpo, "Mitchell 2023, conservative DPO", uses_margin=True, soft_labels=True
    ),
    "robust": PreferenceLoss(_robust, "Chowdhury et al. 2024, arXiv 2403.00409", uses_margin=True),
    "simpo": PreferenceLoss(
        _simpo, "Meng et al. 2024, arXiv 2405.14734", needs_reference=False, uses_margin=True
    ),
    "orpo": PreferenceLoss(_orpo, "Hong et al. 2024, arXiv 2403.07691", needs_reference=False),
    "kto_pair": PreferenceLoss(_kto_pair, "Ethayarajh et al. 2024, arXiv 2402.01306"),
}


def preference_loss(
    name: str, logps: PairLogps, hyper: PreferenceHyper | None = None
) -> LossOutput:
    """Per-pair losses (B,) and chosen/rejected implicit rewards (B,) of the loss ``name``."""
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; one of {sorted(PREFERENCE_LOSSES)}")
    return PREFERENCE_LOSSES[name].fn(logps, hyper or PreferenceHyper())


# ==== end dpo ==================================================================================

# ==== On-policy RL: PPO, GRPO, RLOO (owner: rl) ================================================

# Shapes: B sequences, T completion positions (prompt positions are never in these tensors), G
# completions per prompt. ``mask`` is 1.0 on real completion tokens (up to and including the stop
# token) and 0.0 on padding after it; completions are right-padded, so a row's real tokens are a
# prefix of the row. Log-probs are those of the sampled tokens, already temperature-scaled.


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is 1 (all of them, or along ``dim``)."""
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance over masked positions; biased by default, as openai/lm-human-preferences (TF)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        variance = variance * count / (count - 1).clamp(min=1.0)
    return variance


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Scale masked ``values`` to unit variance; with ``shift_mean`` also to zero mean.

    Huang et al. 2023 ("The N implementation details of RLHF with PPO", detail 18): advantages are
    whitened with the mean shift, rewards without it (shifting rewards would change which
    completions the KL penalty favours). Padding positions come back as 0.
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)  # (B, T)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k1 = log pi - log pi_ref: unbiased for KL(pi || pi_ref), can be negative.

    Schulman 2020, "Approximating KL divergence" (http://joschu.net/blog/kl-approx.html).
    """
    return logprobs - ref_logprobs  # (B, T)


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k2 = (log pi - log pi_ref)^2 / 2: biased, low variance, never negative (Schulman)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2  # (B, T)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 = r - 1 - log r with r = pi_ref / pi: unbiased and never negative (Schulman).

    GRPO (Shao et al. 2024, eq. 4) puts this estimator in the loss.
    """
    log_ratio = ref_logprobs - logprobs  # (B, T)
    return torch.exp(log_ratio) - log_ratio - 1.0


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL by name: ``k1``, ``k2`` or ``k3``."""
    if estimator == "k1":
        return kl_k1(logprobs, ref_logprobs)
    if estimator == "k2":
        return kl_k2(logprobs, ref_logprobs)
    if estimator == "k3":
        return kl_k3(logprobs, ref_logprobs)
    raise ValueError(f"Unknown KL estimator {estimator!r}; expected k1, k2 or k3.")


def truncate_after_stop_token(
    token_ids: torch.Tensor, stop_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EOS trick, first half: keep each completion up to its first stop token, pad after it.

    Huang et al. 2023, detail 14 (from openai/lm-human-preferences). Returns the truncated ids
    ``(B, T)``, the mask of kept tokens ``(B, T)`` (the stop token included) and whether each row
    contains a stop token ``(B,)``.
    """
    is_stop = token_ids == stop_token_id  # (B, T)
    # A position is kept when no stop token occurs strictly before it.
    stops_before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()  # (B, T)
    keep = stops_before == 0
    truncated = torch.where(keep, token_ids, torch.full_like(token_ids, pad_token_id))
    return truncated, keep.to(torch.float32), is_stop.any(dim=1)


def penalize_missing_eos(
    scores: torch.Tensor, ended_with_eos: torch.Tensor, penalty: float, mode: str = "subtract"
) -> torch.Tensor:
    """EOS trick, second half: completions that never stopped get a worse score.

    ``subtract`` takes ``penalty`` off the score (TRL <= 1.12 ``missing_eos_penalty``);
    ``replace`` sets the score to ``-penalty`` (openai/lm-human-preferences used -1). Either way
    the policy cannot earn reward by rambling past the length limit. ``scores``: (B,).
    """
    if mode == "subtract":
        penalised = scores - penalty
    elif mode == "replace":
        penalised = torch.full_like(scores, -penalty)
    else:
        raise ValueError(f"Unknown missing-EOS penalty mode {mode!r}; use subtract or replace.")
    return torch.where(ended_with_eos, scores, penalised)  # (B,)


def kl_shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``r_t = -beta * KL_t``, plus the sequence score on the last real token.

    Ziegler et al. 2019 (eq. 2) and Ouyang et al. 2022 (InstructGPT, eq. 2); Huang et al. 2023,
    detail 17. ``scores`` (B,), log-probs and ``mask`` (B, T). Returns the rewards (B, T) and the
    per-token KL estimate (B, T), both zero on padding.
    """
    kl = kl_estimate(logprobs, ref_logprobs, estimator) * mask  # (B, T)
    rewards = -beta * kl  # (B, T)
    positions = torch.arange(mask.shape[1], device=mask.device)  # (T,)
    last = (positions * (mask > 0)).amax(dim=1)  # (B,) index of the last real token
    rewards = rewards.scatter_add(1, last.unsqueeze(1), scores.to(rewards.dtype).unsqueeze(1))
    return rewards, kl


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16); returns ``(A, A + V)``.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``; the
    episode ends after the last real token, so the value after it is 0 (no bootstrap).
    ``rewards``, ``values``, ``mask``: (B, T). Advantages and returns are zero on padding.
    """
    num_steps = rewards.shape[1]
    rewards = rewards * mask
    values = values * mask
    last_advantage = torch.zeros_like(rewards[:, 0])  # (B,)
    advantages_reversed = []
    for t in reversed(range(num_steps)):
        if t + 1 < num_steps:
            next_mask = mask[:, t + 1]  # (B,)
            next_value = values[:, t + 1] * next_mask
        else:
            next_mask = torch.zeros_like(last_advantage)
            next_value = next_mask
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_advantage = delta + gamma * lam * next_mask * last_advantage
        advantages_reversed.append(last_advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * mask  # (B, T)
    returns = (advantages + values) * mask  # (B, T)
    return advantages, returns


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), averaged over all real tokens.

    ``logprobs`` (B, T) carry the gradient; ``old_logprobs`` and ``advantages`` (B, T) come from
    the rollout. Stats (detached scalars): ``clipfrac`` (share of tokens where the clipped term
    was chosen), ``approx_kl`` (``mean((log ratio)^2) / 2``, as TRL and CleanRL log it) and
    ``ratio_mean``.
    """
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss ``0.5 * max((V - R)^2, (V_clip - R)^2)`` (openai/baselines ppo2).

    ``V_clip`` stays within ``clip_range_value`` of the rollout's value, so one minibatch cannot
    drag the critic far from where the advantages were computed (Huang et al. 2023, detail 19).
    All inputs (B, T). Returns the loss and the share of tokens where the clipped term won.
    """
    delta = torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    values_clipped = old_values + delta  # (B, T)
    losses_unclipped = (values - returns) ** 2  # (B, T)
    losses_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(losses_unclipped, losses_clipped), mask)
    clipfrac = masked_mean((losses_clipped > losses_unclipped).float(), mask).detach()
    return loss, clipfrac


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO advantages ``(r_i - mean_group) / (std_group + eps)`` (Shao et al. 2024, sec. 4.1.2).

    ``rewards`` (N,) hold ``N / group_size`` consecutive groups of completions of one prompt;
    NaN marks an unscorable completion: it is left out of its group's statistics and gets
    advantage 0. ``scale``: ``group`` (paper), ``batch`` (one std over the batch) or ``none``
    (Dr. GRPO, Liu et al. 2025). The std is Bessel-corrected and ``eps`` is added to it, as in
    TRL 1.16, so the two agree. Returns the advantages (N,) and a zero-variance flag (N,): every
    completion of such a group has advantage 0, so the trainer can skip the group.
    """
    grouped = rewards.view(-1, group_size)  # (P, G)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)  # (P, 1)
    centred = grouped - mean  # (P, G)
    count = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)  # (P, 1)
    group_var = torch.nansum(centred**2, dim=1, keepdim=True) / (count - 1).clamp(min=1)
    group_std = torch.where(count > 1, group_var.sqrt(), torch.zeros_like(group_var))  # (P, 1)
    zero_std = torch.isclose(group_std, torch.zeros_like(group_std)).expand_as(grouped)  # (P, G)
    if scale == "group":
        advantages = centred / (group_std + eps)
    elif scale == "batch":
        valid = rewards[~torch.isnan(rewards)]
        batch_std = valid.std() if valid.numel() > 1 else torch.zeros((), dtype=rewards.dtype)
        advantages = centred / (batch_std + eps)
    elif scale == "none":
        advantages = centred
    else:
        raise ValueError(f"Unknown advantage scale {scale!r}; expected group, batch or none.")
    advantages = torch.nan_to_num(advantages, nan=0.0)
    return advantages.reshape(-1), zero_std.reshape(-1)  # (N,), (N,)


def rloo_advantages(
    rewards: torch.Tensor, group_size: int, normalize: bool = False, eps: float = 1e-4
) -> torch.Tensor:
    """REINFORCE leave-one-out: ``A_i = r_i - mean_{j != i} r_j`` (Ahmadian et al. 2024, eq. 5).

    ``rewards`` (N,) in consecutive groups of ``group_size``; NaN (unscorable) completions are
    left out of their siblings' baselines and get advantage 0, as are completions with no
    scorable sibling. ``normalize`` then whitens over the batch (TRL's ``normalize_advantages``).
    """
    grouped = rewards.view(-1, group_size)  # (P, G)
    count = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)  # (P, 1)
    total = torch.nansum(grouped, dim=1, keepdim=True)  # (P, 1)
    baseline = (total - grouped) / (count - 1)  # (P, G); 0/0 = NaN for a lone completion
    advantages = (grouped - baseline).reshape(-1)  # (N,)
    if normalize:
        valid = advantages[~torch.isnan(advantages)]
        if valid.numel() > 1:
            advantages = (advantages - valid.mean()) / (valid.std() + eps)
    return torch.nan_to_num(advantages, nan=0.0)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
    beta: float = 0.0,
    token_level: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO objective (Shao et al. 2024, eq. 3): clipped surrogate plus ``beta`` * k3 KL per token.

    ``advantages`` (B,) are broadcast over each completion's tokens. The paper averages over the
    tokens of each completion and then over completions; ``token_level`` averages over all tokens
    of the batch instead (DAPO, Yu et al. 2025), so long completions are not down-weighted.
    Rows whose mask is all zero (e.g. skipped zero-variance groups) count in neither average.
    ``ref_logprobs`` may be None when ``beta`` is 0. Stats: ``clipfrac``, ``kl`` (k3 mean),
    ``ratio_mean``.
    """
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    adv = advantages.unsqueeze(1)  # (B, 1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * adv
    per_token = -torch.minimum(unclipped, clipped)  # (B, T)
    kl = torch.zeros_like(per_token)
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("grpo_loss needs ref_logprobs when beta is not 0.")
        kl = kl_k3(logprobs, ref_logprobs)
        per_token = per_token + beta * kl
    if token_level:
        loss = masked_mean(per_token, mask)
    else:
        rows = (mask.sum(dim=1) > 0).to(per_token.dtype)  # (B,)
        loss = (masked_mean(per_token, mask, dim=1) * rows).sum() / rows.sum().clamp(min=1.0)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped < unclipped).float(), mask),
            "kl": masked_mean(kl, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def adaptive_kl_coef(
    beta: float, kl: float, target: float, horizon: float, n_steps: int, max_error: float = 0.2
) -> float:
    """One update of the adaptive KL coefficient (Ziegler et al. 2019, sec. 2.2).

    ``beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)``: a proportional
    controller that pushes the measured KL towards ``target``; ``n_steps`` is the number of
    episodes since the last update.
    """
    error = min(max(kl / target - 1.0, -max_error), max_error)
    return beta * (1.0 + error * n_steps / horizon)


class FixedKLController:
    """A KL coefficient that never changes (TRL <= 1.12 ``kl_coef``, DeepSpeed-Chat)."""

    def __init__(self, beta: float) -> None:
        self.value = beta

    def update(self, kl: float, n_steps: int) -> None:
        del kl, n_steps


class AdaptiveKLController:
    """Ziegler et al. 2019 adaptive KL coefficient; see ``adaptive_kl_coef``."""

    def __init__(self, beta: float, target: float, horizon: float) -> None:
        self.value = beta
        self.target = target
        self.horizon = horizon

    def update(self, kl: float, n_steps: int) -> None:
        self.value = adaptive_kl_coef(self.value, kl, self.target, self.horizon, n_steps)


# ==== end rl ===================================================================================
