"""The runs list (the training home page) and a run's page with its live part."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from training import access, plots, selectors
from training.forms import RunFilterForm
from training.models import RunStatus, TrainingRun
from training.services import runs as run_services


def seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    if start is None:
        return None
    return max(0.0, ((end or timezone.now()) - start).total_seconds())


def run_live_context(run: TrainingRun) -> dict[str, Any]:
    """What the live part of a run's page shows: status, progress, heartbeat, error, log
    tail and the metric plots. Two queries for the metrics, whatever the run's length."""
    series = selectors.metric_series(run_ids=[run.pk], max_points=plots.MAX_POINTS)[run.pk]
    heartbeat_age = seconds_between(run.heartbeat_at, None)
    results = run.results if isinstance(run.results, dict) else {}
    return {
        "run": run,
        "result_rows": [
            (name, plots.format_value(value)) for name, value in sorted(results.items())
        ],
        "plots": plots.line_plots(series),
        "live": not run.is_terminal,
        "heartbeat_age": heartbeat_age,
        "heartbeat_stale": (
            run.status == RunStatus.RUNNING
            and heartbeat_age is not None
            and heartbeat_age > settings.TRAINING_HEARTBEAT_STALE_SECONDS
        ),
        "duration": seconds_between(run.started_at, run.finished_at),
    }


@require_GET
@login_required
def index(request: HttpRequest) -> HttpResponse:
    """Runs of the caller's campaigns, newest first, filtered by campaign, kind and status;
    beside them each campaign's latest rounds."""
    campaigns = access.training_campaigns(user=request.user)
    by_slug = {campaign.slug: campaign for campaign, _ in campaigns}
    form = RunFilterForm(request.GET or None, campaigns=[(c.slug, c.name) for c, _ in campaigns])
    filters: dict[str, Any] = form.cleaned_data if form.is_valid() else {}
    chosen = by_slug.get(filters.get("campaign") or "")
    ids = [campaign.pk for campaign, _ in campaigns]
    if form.errors:
        # A filter outside the allowlist (another's campaign, a made-up status) shows nothing
        # rather than everything.
        ids = []
    runs = selectors.runs_list(
        campaign_ids=ids,
        campaign_id=chosen.pk if chosen else None,
        kind=filters.get("kind") or None,
        status=filters.get("status") or None,
    )
    rounds = selectors.rounds_list(campaign_ids=ids, campaign_id=chosen.pk if chosen else None)
    rounds_by_campaign: dict[int, list[Any]] = {}
    for round_obj in rounds:
        rounds_by_campaign.setdefault(round_obj.campaign_id, []).append(round_obj)
    return render(
        request,
        "training/index.html",
        {
            "form": form,
            "runs": runs,
            "campaigns": [
                {
                    "campaign": campaign,
                    "roles": roles,
                    "can_operate": access.can_operate(roles),
                    "rounds": rounds_by_campaign.get(campaign.pk, [])[:10],
                }
                for campaign, roles in campaigns
                if chosen is None or campaign == chosen
            ],
        },
        status=400 if form.errors else 200,
    )


@require_GET
@login_required
def run_detail(request: HttpRequest, run_id: int) -> HttpResponse:
    run, roles = access.run_for(user=request.user, run_id=run_id)
    context = run_live_context(run)
    context.update(
        {
            "campaign": run.campaign,
            "versions": selectors.run_versions(run=run),
            "config_rows": sorted(run.config.items()) if isinstance(run.config, dict) else [],
            "can_operate": access.can_operate(roles),
        }
    )
    return render(request, "training/run_detail.html", context)


@require_GET
@login_required
def run_live(request: HttpRequest, run_id: int) -> HttpResponse:
    """The live part of the run page, polled while the run is queued or running."""
    run, roles = access.run_for(user=request.user, run_id=run_id)
    context = run_live_context(run)
    context["can_operate"] = access.can_operate(roles)
    return render(request, "training/run_detail.html#run-live", context)


@require_POST
@login_required
def run_cancel(request: HttpRequest, run_id: int) -> HttpResponse:
    run, _ = access.run_for(user=request.user, run_id=run_id, roles=access.OPERATORS)
    if run.is_terminal:
        messages.info(request, f"Run {run.pk} had already ended ({run.get_status_display()}).")
    else:
        run = run_services.run_cancel(run=run)
        if run.status == RunStatus.CANCELLED:
            messages.success(request, f"Run {run.pk} cancelled.")
        else:
            messages.success(
                request, f"Run {run.pk} will stop at its next step; the worker marks it cancelled."
            )
    return redirect("training:run", run_id=run.pk)
