"""A campaign's training page (current policy, rounds, the loop schedule), starting a round,
and a round's page with its live stage timeline."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from annotation.models import Campaign, Role
from training import access, plots, selectors, tasks
from training.forms import RoundConfigForm, ScheduleForm
from training.models import Round
from training.services import rounds as round_services
from training.services.runs import RunError

# The figures a round's evaluation writes, labelled, in the order they are read.
ROUND_METRICS = (
    ("reward_accuracy", "Reward model accuracy (held-out judgments)"),
    ("win_rate", "Win rate against the previous policy"),
    ("kl", "KL to the base model (nats; a sampled estimate, can dip below 0)"),
    ("mean_reward", "Mean reward of the new policy"),
    ("baseline_mean_reward", "Mean reward of the previous policy"),
)


def round_metric_rows(metrics: Any) -> list[tuple[str, str]]:
    """The known figures first, labelled, then whatever else the evaluation wrote."""
    if not isinstance(metrics, dict):
        return []
    known = dict(ROUND_METRICS)
    rows = [
        (label, plots.format_value(metrics[name]))
        for name, label in ROUND_METRICS
        if name in metrics
    ]
    rows += [
        (name, plots.format_value(value))
        for name, value in sorted(metrics.items())
        if name not in known
    ]
    return rows


def _campaign_context(
    campaign: Campaign,
    roles: set[str],
    *,
    round_form: RoundConfigForm | None = None,
    schedule_form: ScheduleForm | None = None,
) -> dict[str, Any]:
    schedule = selectors.schedule_get(campaign=campaign)
    cutoff = selectors.last_cutoff(campaign=campaign)
    total, new = selectors.judgments_since(campaign=campaign, cutoff=cutoff)
    saved = schedule.config if schedule is not None else None
    if schedule_form is None:
        schedule_form = ScheduleForm(
            initial={
                "enabled": schedule.enabled if schedule else False,
                "min_new_judgments": schedule.min_new_judgments if schedule else 200,
            }
        )
    return {
        "campaign": campaign,
        "can_operate": access.can_operate(roles),
        "is_admin": Role.ADMIN in roles,
        "current_policy": round_services.current_policy(campaign),
        "rounds": selectors.rounds_list(campaign_ids=[campaign.pk], campaign_id=campaign.pk),
        "active_runs": selectors.active_runs(campaign=campaign),
        "schedule": schedule,
        "schedule_form": schedule_form,
        "schedule_config_form": RoundConfigForm(prefix="schedule", initial_config=saved),
        "round_form": round_form or RoundConfigForm(),
        "judgments_total": total,
        "judgments_new": new,
        "last_cutoff": cutoff,
    }


@require_GET
@login_required
def campaign_training(request: HttpRequest, slug: str) -> HttpResponse:
    campaign, roles = access.campaign_for(user=request.user, slug=slug)
    return render(request, "training/campaign.html", _campaign_context(campaign, roles))


@require_http_methods(["GET", "POST"])
@login_required
def round_new(request: HttpRequest, slug: str) -> HttpResponse:
    """Start a round by hand. A refused configuration comes back with the reasons on the
    fields; a round already running is reported as skipped (409), not queued behind it."""
    campaign, _ = access.campaign_for(user=request.user, slug=slug, roles=access.OPERATORS)
    form = RoundConfigForm(request.POST or None)
    status = 200
    skipped = ""
    if request.method == "POST":
        if form.is_valid():
            try:
                round_obj = round_services.round_create(
                    campaign=campaign,
                    config=form.config(),
                    created_by=request.user,
                    enqueue=tasks.enqueue_round,
                )
            except round_services.RoundSkipped as exc:
                skipped = str(exc)
                status = 409
            except RunError as exc:
                form.add_service_error(str(exc))
                status = 400
            else:
                messages.success(request, f"Round {round_obj.number} queued.")
                return redirect("training:round", round_id=round_obj.pk)
        else:
            status = 400
    return render(
        request,
        "training/round_new.html",
        {"campaign": campaign, "round_form": form, "skipped": skipped, "can_operate": True},
        status=status,
    )


@require_POST
@login_required
def schedule_update(request: HttpRequest, slug: str) -> HttpResponse:
    campaign, roles = access.campaign_for(user=request.user, slug=slug, roles=access.OPERATORS)
    form = ScheduleForm(request.POST)
    config_form = RoundConfigForm(request.POST, prefix="schedule")
    if form.is_valid() and config_form.is_valid():
        try:
            round_services.schedule_set(
                campaign=campaign,
                enabled=form.cleaned_data["enabled"],
                min_new_judgments=form.cleaned_data["min_new_judgments"],
                config=config_form.config(),
            )
        except RunError as exc:
            config_form.add_service_error(str(exc))
        else:
            state = "on" if form.cleaned_data["enabled"] else "off"
            messages.success(request, f"Loop schedule saved ({state}).")
            return redirect("training:campaign", slug=campaign.slug)
    context = _campaign_context(campaign, roles, schedule_form=form)
    context["schedule_config_form"] = config_form
    context["schedule_open"] = True
    return render(request, "training/campaign.html", context, status=400)


def round_live_context(round_obj: Round) -> dict[str, Any]:
    runs = selectors.round_runs(round_obj=round_obj)
    series = selectors.metric_series(run_ids=[run.pk for run in runs], max_points=plots.MAX_POINTS)
    return {
        "round": round_obj,
        "live": not round_obj.is_terminal,
        "timeline": selectors.round_timeline(round_obj=round_obj, runs=runs),
        "runs": runs,
        "run_plots": [
            {"run": run, "plots": plots.line_plots(series[run.pk])}
            for run in runs
            if series[run.pk]
        ],
        "metric_rows": round_metric_rows(round_obj.metrics),
    }


@require_GET
@login_required
def round_detail(request: HttpRequest, round_id: int) -> HttpResponse:
    round_obj, roles = access.round_for(user=request.user, round_id=round_id)
    context = round_live_context(round_obj)
    context.update(
        {
            "campaign": round_obj.campaign,
            "can_operate": access.can_operate(roles),
            "is_admin": Role.ADMIN in roles,
            "config_rows": sorted(round_obj.config.items())
            if isinstance(round_obj.config, dict)
            else [],
        }
    )
    return render(request, "training/round_detail.html", context)


@require_GET
@login_required
def round_live(request: HttpRequest, round_id: int) -> HttpResponse:
    round_obj, roles = access.round_for(user=request.user, round_id=round_id)
    context = round_live_context(round_obj)
    context["can_operate"] = access.can_operate(roles)
    return render(request, "training/round_detail.html#round-live", context)


@require_POST
@login_required
def round_cancel(request: HttpRequest, round_id: int) -> HttpResponse:
    round_obj, _ = access.round_for(user=request.user, round_id=round_id, roles=access.OPERATORS)
    if round_obj.is_terminal:
        messages.info(request, f"Round {round_obj.number} had already ended.")
    else:
        round_obj = round_services.round_cancel(round_obj=round_obj)
        messages.success(request, f"Round {round_obj.number}: cancel requested.")
    return redirect("training:round", round_id=round_obj.pk)
