"""Reads of the training domain for the ML staff pages and the API.

Every read is scoped by the caller's campaigns (``campaign_ids``: the campaigns where they are
an admin or ML staff, see ``training.access``) and costs a fixed number of queries whatever
the number of runs, rounds, metric rows or lineage depth; the tests count them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from django.db.models import Case, Count, IntegerField, Max, Q, QuerySet, Value, When
from django.db.models.functions import Mod

from annotation.models import Campaign, Comparison, Completion, Judgment, Prompt, Split
from training.models import (
    LoopSchedule,
    ModelKind,
    ModelVersion,
    Round,
    RoundStage,
    RunMetric,
    RunStatus,
    TrainingRun,
)

Series = list[tuple[int, float]]
MetricSeries = dict[str, Series]

RUN_LIST_LIMIT = 200
VERSION_LIST_LIMIT = 200
COMPARE_PROMPTS = 40
# A lineage longer than this is a cycle written by hand in the database, not a real history.
MAX_LINEAGE = 500

# The stages a round walks through, for the timeline, with the run kinds that do each.
STAGE_KINDS: dict[str, tuple[str, ...]] = {
    RoundStage.REWARD: ("reward",),
    RoundStage.POLICY: ("dpo", "ppo"),
    RoundStage.GENERATE: ("generate",),
    RoundStage.CRITIQUE: ("critique",),
    RoundStage.EVALUATE: ("eval",),
}


# -- runs ---------------------------------------------------------------------------------------


def runs_list(
    *,
    campaign_ids: Collection[int],
    campaign_id: int | None = None,
    kind: str | None = None,
    status: str | None = None,
    round_id: int | None = None,
    limit: int = RUN_LIST_LIMIT,
) -> list[TrainingRun]:
    """The newest runs of the caller's campaigns, narrowed by the filters given."""
    runs = TrainingRun.objects.filter(campaign_id__in=list(campaign_ids))
    if campaign_id is not None:
        runs = runs.filter(campaign_id=campaign_id)
    if kind:
        runs = runs.filter(kind=kind)
    if status:
        runs = runs.filter(status=status)
    if round_id is not None:
        runs = runs.filter(round_id=round_id)
    return list(
        runs.select_related("campaign", "round").defer("log_tail", "config").order_by("-id")[:limit]
    )


def run_get(*, run_id: int) -> TrainingRun | None:
    """The run with what its page shows beside it (campaign, round, the version it started
    from, who started it) in one query."""
    return (
        TrainingRun.objects.select_related("campaign", "round", "input_version", "created_by")
        .filter(pk=run_id)
        .first()
    )


def run_versions(*, run: TrainingRun) -> list[ModelVersion]:
    """The model versions the run registered."""
    return list(ModelVersion.objects.filter(run=run).order_by("id"))


def metric_series(
    *, run_ids: Iterable[int], since: int | None = None, max_points: int | None = None
) -> dict[int, MetricSeries]:
    """``{run_id: {name: [(step, value), ...]}}``, steps ascending.

    ``since``: only steps after it (incremental polling). ``max_points``: a long series is
    thinned in the database to about that many points (every k-th step, k a multiple of the
    series' own logging interval, plus its last step), so a live page that polls every two
    seconds reads a bounded number of rows however long the run. Two queries.
    """
    ids = list(run_ids)
    out: dict[int, MetricSeries] = {run_id: {} for run_id in ids}
    if not ids:
        return out
    rows = RunMetric.objects.filter(run_id__in=ids)
    if since is not None:
        rows = rows.filter(step__gt=since)
    keep = Q()
    if max_points is not None:
        strides: list[tuple[int, str, int, int]] = []
        stats = rows.values("run_id", "name").annotate(n=Count("id"), last=Max("step"))
        for row in stats.order_by():
            if row["n"] > max_points:
                # The mean distance between logged steps, so that a series logged every 10
                # steps is thinned to multiples of 10k rather than hit and miss.
                interval = max(1, round(row["last"] / row["n"]))
                stride = interval * math.ceil(row["n"] / max_points)
                strides.append((row["run_id"], row["name"], stride, row["last"]))
        if strides:
            stride_of = Case(
                *(When(run_id=r, name=n, then=Value(s)) for r, n, s, _ in strides),
                default=Value(1),
                output_field=IntegerField(),
            )
            rows = rows.annotate(phase=Mod("step", stride_of))
            keep = Q(phase=0)
            for r, n, _, last in strides:
                keep |= Q(run_id=r, name=n, step=last)
    for run_id, name, step, value in (
        rows.filter(keep)
        .order_by("run_id", "name", "step")
        .values_list("run_id", "name", "step", "value")
    ):
        out[run_id].setdefault(name, []).append((step, value))
    return out


# -- rounds -------------------------------------------------------------------------------------


def rounds_list(
    *, campaign_ids: Collection[int], campaign_id: int | None = None, limit: int = 100
) -> list[Round]:
    rounds = Round.objects.filter(campaign_id__in=list(campaign_ids))
    if campaign_id is not None:
        rounds = rounds.filter(campaign_id=campaign_id)
    return list(
        rounds.select_related("campaign", "policy_version", "reward_version").order_by("-id")[
            :limit
        ]
    )


def round_get(*, round_id: int) -> Round | None:
    return (
        Round.objects.select_related(
            "campaign", "created_by", "policy_before", "reward_version", "policy_version"
        )
        .filter(pk=round_id)
        .first()
    )


@dataclass(frozen=True)
class StageRow:
    """One step of a round's timeline, with the run that did it (the newest, if retried)."""

    stage: str
    label: str
    state: str  # done / current / pending / skipped
    run: TrainingRun | None


def round_runs(*, round_obj: Round) -> list[TrainingRun]:
    return list(
        TrainingRun.objects.filter(round=round_obj)
        .select_related("input_version")
        .defer("log_tail")
        .order_by("id")
    )


def round_timeline(*, round_obj: Round, runs: list[TrainingRun]) -> list[StageRow]:
    """The stages in order: done before the round's current stage, current, pending after it.
    A stage the round went past without a run (critiques off) reads as skipped."""
    stages = list(STAGE_KINDS)
    current = round_obj.stage
    position = len(stages) if current == RoundStage.DONE else stages.index(current)
    newest: dict[str, TrainingRun] = {}
    for run in runs:
        for stage, kinds in STAGE_KINDS.items():
            if run.kind in kinds:
                newest[stage] = run
    rows = []
    for i, stage in enumerate(stages):
        stage_run = newest.get(stage)
        if i < position:
            state = "done" if stage_run is not None else "skipped"
        elif i == position and not round_obj.is_terminal:
            state = "current"
        elif i == position and round_obj.status != RunStatus.SUCCEEDED:
            state = "stopped"
        else:
            state = "pending"
        rows.append(
            StageRow(stage=stage, label=RoundStage(stage).label, state=state, run=stage_run)
        )
    return rows


# -- campaigns ----------------------------------------------------------------------------------


def schedule_get(*, campaign: Campaign) -> LoopSchedule | None:
    return LoopSchedule.objects.filter(campaign=campaign).first()


def judgments_since(*, campaign: Campaign, cutoff: int | None) -> tuple[int, int]:
    """(all judgments of the campaign, those with an id above ``cutoff``) in one query."""
    counts = Judgment.objects.filter(campaign=campaign).aggregate(
        total=Count("id"), new=Count("id", filter=Q(id__gt=cutoff or 0))
    )
    return counts["total"], counts["new"]


def last_cutoff(*, campaign: Campaign) -> int | None:
    """The newest judgment cutoff of a round that did not fail or get cancelled: judgments
    after it are "new" (the schedule counts them, and the page shows the same number)."""
    return (
        Round.objects.filter(campaign=campaign, judgment_cutoff__isnull=False)
        .exclude(status__in=["failed", "cancelled"])
        .aggregate(m=Max("judgment_cutoff"))["m"]
    )


def active_runs(*, campaign: Campaign) -> list[TrainingRun]:
    return list(
        TrainingRun.objects.filter(campaign=campaign, status__in=["queued", "running"])
        .select_related("round")
        .defer("log_tail")
        .order_by("id")
    )


# -- model versions -----------------------------------------------------------------------------


def versions_visible(*, campaign_ids: Collection[int]) -> QuerySet[ModelVersion]:
    """Versions made by runs of the caller's campaigns, and the registered base models (made
    by no run, shared by every campaign that starts from them) for anyone who trains."""
    ids = list(campaign_ids)
    if not ids:
        return ModelVersion.objects.none()
    return ModelVersion.objects.filter(Q(run__campaign_id__in=ids) | Q(run__isnull=True))


def versions_list(
    *,
    campaign_ids: Collection[int],
    kind: str | None = None,
    campaign_id: int | None = None,
    limit: int = VERSION_LIST_LIMIT,
) -> list[ModelVersion]:
    versions = versions_visible(campaign_ids=campaign_ids)
    if kind:
        versions = versions.filter(kind=kind)
    if campaign_id is not None:
        versions = versions.filter(run__campaign_id=campaign_id)
    return list(
        versions.select_related("run", "run__campaign", "run__round", "parent", "source").order_by(
            "-id"
        )[:limit]
    )


def version_get(*, version_id: int) -> ModelVersion | None:
    return (
        ModelVersion.objects.select_related("run", "run__campaign", "run__round", "source")
        .filter(pk=version_id)
        .first()
    )


def version_ancestors(*, version: ModelVersion) -> list[ModelVersion]:
    """The parent chain of ``version``, nearest first, in two queries whatever its depth: a
    recursive query collects the ids, a second loads them with their runs."""
    table = ModelVersion._meta.db_table
    from django.db import connection

    pk, parent = ModelVersion._meta.pk.column, ModelVersion._meta.get_field("parent").column
    sql = (
        f"WITH RECURSIVE chain(id, parent_id, depth) AS ("
        f" SELECT {pk}, {parent}, 0 FROM {table} WHERE {pk} = %s"
        f" UNION ALL SELECT m.{pk}, m.{parent}, c.depth + 1 FROM {table} m"
        f" JOIN chain c ON m.{pk} = c.parent_id WHERE c.depth < %s"
        f") SELECT id, depth FROM chain WHERE depth > 0 ORDER BY depth"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [version.pk, MAX_LINEAGE])
        depth_of = {row[0]: row[1] for row in cursor.fetchall()}
    if not depth_of:
        return []
    found = ModelVersion.objects.select_related("run", "run__campaign", "run__round").filter(
        pk__in=list(depth_of)
    )
    return sorted(found, key=lambda v: depth_of[v.pk])


def version_children(*, version: ModelVersion) -> list[ModelVersion]:
    return list(
        ModelVersion.objects.filter(parent=version)
        .select_related("run", "run__campaign", "run__round")
        .order_by("id")
    )


@dataclass(frozen=True)
class SourceUse:
    """What the loop made of a policy's outputs."""

    completions: int
    comparisons: int
    judgments: int


def source_use(*, source_id: int, campaign_ids: Collection[int]) -> SourceUse:
    """How many completions the source wrote, comparisons they are in, and judgments those
    comparisons received, counted in the caller's campaigns (three counts)."""
    ids = list(campaign_ids)
    completions = Completion.objects.filter(
        source_id=source_id, prompt__campaign_id__in=ids
    ).count()
    comparisons = Comparison.objects.filter(
        Q(completion_a__source_id=source_id) | Q(completion_b__source_id=source_id),
        campaign_id__in=ids,
    )
    return SourceUse(
        completions=completions,
        comparisons=comparisons.count(),
        judgments=Judgment.objects.filter(comparison__in=comparisons.values("pk")).count(),
    )


@dataclass(frozen=True)
class ComparedPrompt:
    prompt: Prompt
    a: list[Completion]  # version A's completions of the prompt
    b: list[Completion]


def completions_side_by_side(
    *,
    source_a: int,
    source_b: int,
    campaign_ids: Collection[int],
    limit: int = COMPARE_PROMPTS,
) -> list[ComparedPrompt]:
    """Prompts both sources answered (held-out eval prompts first), with each side's
    completions; two queries."""
    ids = list(campaign_ids)
    prompts = list(
        Prompt.objects.filter(campaign_id__in=ids, completions__source_id=source_a)
        .filter(completions__source_id=source_b)
        .distinct()
        .annotate(
            held_out=Case(
                When(split=Split.EVAL, then=Value(0)), default=Value(1), output_field=IntegerField()
            )
        )
        .order_by("held_out", "id")[:limit]
    )
    by_prompt: dict[int, dict[int, list[Completion]]] = defaultdict(lambda: defaultdict(list))
    for completion in Completion.objects.filter(
        prompt_id__in=[p.pk for p in prompts], source_id__in=[source_a, source_b]
    ).order_by("id"):
        by_prompt[completion.prompt_id][completion.source_id].append(completion)
    return [
        ComparedPrompt(prompt=p, a=by_prompt[p.pk][source_a], b=by_prompt[p.pk][source_b])
        for p in prompts
    ]


def policy_versions(*, campaign_ids: Collection[int]) -> list[ModelVersion]:
    """The policies the compare page can offer (those with a source of completions)."""
    return list(
        versions_visible(campaign_ids=campaign_ids)
        .filter(kind=ModelKind.POLICY, source__isnull=False)
        .select_related("run__campaign")
        .order_by("-id")[:VERSION_LIST_LIMIT]
    )
