"""The model registry: versions with their lineage, and two policies side by side."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from training import access, plots, selectors
from training.forms import CompareForm
from training.models import ModelKind, ModelVersion


def metric_table(a: dict[str, Any] | Any, b: dict[str, Any] | Any) -> list[tuple[str, Any, Any]]:
    """Rows ``(name, a's value, b's value)`` over the union of both versions' metrics."""
    a = a if isinstance(a, dict) else {}
    b = b if isinstance(b, dict) else {}
    return [(name, _shown(a.get(name)), _shown(b.get(name))) for name in sorted(set(a) | set(b))]


def _shown(value: Any) -> str:
    return "\u2013" if value is None else plots.format_value(value)


@require_GET
@login_required
def versions_list(request: HttpRequest) -> HttpResponse:
    campaigns = access.training_campaigns(user=request.user)
    ids = [campaign.pk for campaign, _ in campaigns]
    kind = request.GET.get("kind", "")
    if kind not in ModelKind.values:
        kind = ""
    return render(
        request,
        "training/versions.html",
        {
            "versions": selectors.versions_list(campaign_ids=ids, kind=kind or None),
            "policies": selectors.policy_versions(campaign_ids=ids),
            "kind": kind,
            "kinds": ModelKind.choices,
        },
    )


@require_GET
@login_required
def version_detail(request: HttpRequest, version_id: int) -> HttpResponse:
    version, _ = access.version_for(user=request.user, version_id=version_id)
    campaigns = access.training_campaigns(user=request.user)
    visible = {campaign.pk for campaign, _ in campaigns}
    ancestors = selectors.version_ancestors(version=version)
    children = selectors.version_children(version=version)
    run = version.run
    return render(
        request,
        "training/version_detail.html",
        {
            "version": version,
            "run": run,
            "campaign": run.campaign if run else None,
            # Versions made in a campaign the caller cannot see are named, not linked.
            "ancestors": [(v, access.version_visible(v, visible)) for v in ancestors],
            "children": [(v, access.version_visible(v, visible)) for v in children],
            "use": (
                selectors.source_use(source_id=version.source_id, campaign_ids=visible)
                if version.source_id
                else None
            ),
            "metric_rows": [
                (name, plots.format_value(value))
                for name, value in sorted(version.metrics.items())
                if isinstance(version.metrics, dict)
            ],
        },
    )


@require_GET
@login_required
def versions_compare(request: HttpRequest) -> HttpResponse:
    """Two policies' completions of the same prompts, side by side, and their metrics."""
    campaigns = access.training_campaigns(user=request.user)
    visible = {campaign.pk for campaign, _ in campaigns}
    form = CompareForm(request.GET or None)
    context: dict[str, Any] = {
        "form": form,
        "policies": selectors.policy_versions(campaign_ids=visible),
    }
    status = 200
    if form.is_bound and form.is_valid():
        a = _visible_version(form.cleaned_data["a"], visible)
        b = _visible_version(form.cleaned_data["b"], visible)
        problems = [
            f"Version {v.name} is a {v.get_kind_display().lower()}, not a policy."
            for v in (a, b)
            if v.kind != ModelKind.POLICY
        ] + [
            f"Version {v.name} has no completions registered."
            for v in (a, b)
            if v.kind == ModelKind.POLICY and v.source_id is None
        ]
        if problems:
            for problem in problems:
                form.add_error(None, problem)
        else:
            context.update(_compared(a, b, visible))
    if form.errors:
        status = 400
    return render(request, "training/compare.html", context, status=status)


def _visible_version(version_id: int, visible: set[int]) -> ModelVersion:
    """The compare page spans campaigns: a version the caller may not see is a 404, whichever
    campaign it belongs to."""
    version = selectors.version_get(version_id=version_id)
    if version is None or not access.version_visible(version, visible):
        raise Http404("No such model version.")
    return version


def _compared(a: ModelVersion, b: ModelVersion, visible: set[int]) -> dict[str, Any]:
    # Both checked by the caller.
    assert a.source_id is not None
    assert b.source_id is not None
    return {
        "a": a,
        "b": b,
        "prompts": selectors.completions_side_by_side(
            source_a=a.source_id, source_b=b.source_id, campaign_ids=visible
        ),
        "metric_rows": metric_table(a.metrics, b.metrics),
    }
