"""Campaign-admin pages: list, create, edit, members, progress, status, import, build, export.

Every page is for the campaign's admins (``Role.ADMIN``; superusers act as admin
everywhere); export is also open to the campaign's ML staff. A campaign the user has no role
in is a 404, one where they hold another role a 403 (``permissions.campaign_for``). Writes
are POST only and go through one service each; a successful write redirects (post/redirect/
get) with a flash message.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseBadRequest,
    StreamingHttpResponse,
)
from django.http.response import HttpResponseBase
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.middleware import HtmxDetails

from annotation import formats, permissions, reports, selectors, selectors_rankings
from annotation.exceptions import AnnotationError, ImportRejected
from annotation.formats.export import RANKING_FORMATS, WEIGHTED_FORMATS
from annotation.forms import (
    BuildForm,
    CampaignForm,
    ImportForm,
    MemberAddForm,
    MemberRemoveForm,
    RankingBuildForm,
    StatusForm,
)
from annotation.models import Campaign, CampaignStatus, Role
from annotation.services import campaigns as campaign_services
from annotation.services.imports import import_jsonl
from annotation.services.items import comparisons_build
from annotation.services.rankings import ranking_tasks_build

ADMIN = (Role.ADMIN,)
EXPORTERS = (Role.ADMIN, Role.ML_STAFF)

# Which status buttons the detail page offers, by current status: (target, label).
STATUS_ACTIONS = {
    CampaignStatus.DRAFT: [
        (CampaignStatus.ACTIVE, "Activate"),
        (CampaignStatus.ARCHIVED, "Archive"),
    ],
    CampaignStatus.ACTIVE: [(CampaignStatus.PAUSED, "Pause"), (CampaignStatus.ARCHIVED, "Archive")],
    CampaignStatus.PAUSED: [
        (CampaignStatus.ACTIVE, "Resume"),
        (CampaignStatus.ARCHIVED, "Archive"),
    ],
    CampaignStatus.ARCHIVED: [],
}


class HtmxHttpRequest(HttpRequest):
    htmx: HtmxDetails


def _admin_campaign(request: HttpRequest, slug: str) -> Campaign:
    return permissions.campaign_for(user=request.user, slug=slug, roles=ADMIN)


def _error_text(exc: ValidationError) -> str:
    return "; ".join(exc.messages)


@require_GET
@login_required
def campaign_list(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "annotation/campaign_list.html",
        {
            "campaigns": selectors.campaigns_administered(user=request.user),
            "can_create": permissions.can_create_campaigns(request.user),
        },
    )


@require_http_methods(["GET", "POST"])
@login_required
def campaign_create(request: HttpRequest) -> HttpResponse:
    if not permissions.can_create_campaigns(request.user):
        raise PermissionDenied("You may not create campaigns.")
    form = CampaignForm(request.POST or None, creating=True)
    if request.method == "POST" and form.is_valid():
        fields = dict(form.cleaned_data)
        name, slug = fields.pop("name"), fields.pop("slug")
        try:
            campaign = campaign_services.campaign_create(
                creator=request.user,  # type: ignore[arg-type]
                name=name,
                slug=slug,
                **fields,
            )
        except AnnotationError as exc:
            form.add_error(None, exc.message)
        except ValidationError as exc:
            form.add_error(None, _error_text(exc))
        else:
            messages.success(request, f"Campaign “{campaign.name}” created as a draft.")
            return redirect("annotation:campaign_detail", slug=campaign.slug)
    return render(
        request,
        "annotation/campaign_form.html",
        {"form": form, "campaign": None, "tab": "edit"},
        status=400 if form.errors else 200,
    )


@require_GET
@login_required
def campaign_detail(request: HtmxHttpRequest, slug: str) -> HttpResponse:
    campaign = _admin_campaign(request, slug)
    context = {
        "campaign": campaign,
        "progress": selectors.campaign_progress(campaign=campaign),
        "status_actions": STATUS_ACTIONS.get(CampaignStatus(campaign.status), []),
        "export_formats": formats.EXPORT_FORMATS,
        "tab": "progress",
        "splits": formats.SPLITS,
    }
    template = "annotation/campaign_detail.html"
    if request.htmx:
        # The progress panel polls this URL to refresh itself.
        template += "#progress"
    return render(request, template, context)


@require_http_methods(["GET", "POST"])
@login_required
def campaign_edit(request: HttpRequest, slug: str) -> HttpResponse:
    campaign = _admin_campaign(request, slug)
    form = CampaignForm(request.POST or None, initial=CampaignForm.initial_from(campaign))
    if request.method == "POST" and form.is_valid():
        changes = {name: form.cleaned_data[name] for name in form.changed_data}
        if not changes:
            messages.info(request, "Nothing changed.")
            return redirect("annotation:campaign_detail", slug=campaign.slug)
        try:
            updated = campaign_services.campaign_update(campaign=campaign, **changes)
        except AnnotationError as exc:
            form.add_error(None, exc.message)
        except ValidationError as exc:
            form.add_error(None, _error_text(exc))
        else:
            note = ""
            if updated.guidelines_version != campaign.guidelines_version:
                note = f" Guidelines are now version {updated.guidelines_version}."
            messages.success(request, "Campaign saved." + note)
            return redirect("annotation:campaign_detail", slug=campaign.slug)
    return render(
        request,
        "annotation/campaign_form.html",
        {"form": form, "campaign": campaign, "tab": "edit"},
        status=400 if form.errors else 200,
    )


@require_http_methods(["GET", "POST"])
@login_required
def campaign_members(request: HttpRequest, slug: str) -> HttpResponse:
    campaign = _admin_campaign(request, slug)
    add_form = MemberAddForm()
    status = 200
    if request.method == "POST":
        action = request.POST.get("action")
        if action == "add":
            add_form = MemberAddForm(request.POST)
            if add_form.is_valid():
                user = selectors.user_by_username(username=add_form.cleaned_data["username"])
                if user is None:
                    add_form.add_error("username", "No active user has this username.")
                else:
                    role = add_form.cleaned_data["role"]
                    campaign_services.membership_add(campaign=campaign, user=user, role=role)
                    messages.success(
                        request, f"{user.get_username()} is now {Role(role).label.lower()}."
                    )
                    return redirect("annotation:campaign_members", slug=campaign.slug)
            status = 400
        elif action == "remove":
            remove_form = MemberRemoveForm(request.POST)
            if not remove_form.is_valid():
                return HttpResponseBadRequest("Bad removal request.")
            user = selectors.user_by_id(user_id=remove_form.cleaned_data["user_id"])
            role = remove_form.cleaned_data["role"]
            if user is not None:
                try:
                    campaign_services.membership_remove(campaign=campaign, user=user, role=role)
                except AnnotationError as exc:
                    messages.error(request, exc.message)
                else:
                    messages.success(
                        request, f"{user.get_username()} is no longer {Role(role).label.lower()}."
                    )
                    if user.pk == request.user.pk and role == Role.ADMIN:
                        return redirect("annotation:campaign_list")
            return redirect("annotation:campaign_members", slug=campaign.slug)
        else:
            return HttpResponseBadRequest("Unknown action.")
    return render(
        request,
        "annotation/campaign_members.html",
        {
            "campaign": campaign,
            "memberships": selectors.campaign_memberships(campaign=campaign),
            "add_form": add_form,
            "tab": "members",
        },
        status=status,
    )


@require_POST
@login_required
def campaign_status(request: HttpRequest, slug: str) -> HttpResponse:
    campaign = _admin_campaign(request, slug)
    form = StatusForm(request.POST)
    if not form.is_valid():
        return HttpResponseBadRequest("Unknown status.")
    try:
        updated = campaign_services.campaign_set_status(
            campaign=campaign, status=form.cleaned_data["status"]
        )
    except AnnotationError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Campaign is now {updated.get_status_display().lower()}.")
    return redirect("annotation:campaign_detail", slug=campaign.slug)


@require_http_methods(["GET", "POST"])
@login_required
def campaign_import(request: HttpRequest, slug: str) -> HttpResponse:
    campaign = _admin_campaign(request, slug)
    form = ImportForm(request.POST or None, request.FILES or None)
    errors: list[dict[str, object]] = []
    message = ""
    if request.method == "POST":
        too_large = getattr(request, "upload_too_large", False)
        if form.is_valid() and not too_large:
            data = form.cleaned_data
            try:
                report = import_jsonl(
                    campaign=campaign,
                    stream=data["file"],
                    kind=data["kind"],
                    source_name_default=data["source_name"],
                    strategy=data["strategy"],
                    k=data["k"],
                    seed=data["seed"],
                )
            except ImportRejected as exc:
                message, errors = exc.message, exc.errors
            except AnnotationError as exc:
                message = exc.message
            else:
                messages.success(
                    request,
                    f"Imported {report.prompts} prompts, {report.completions} completions, "
                    f"{report.critiques} critiques and {report.comparisons} new comparisons.",
                )
                return redirect("annotation:campaign_detail", slug=campaign.slug)
        elif too_large:
            form.errors.pop("file", None)
            form.add_error("file", f"The file is larger than {settings.IMPORT_MAX_BYTES} bytes.")
    return render(
        request,
        "annotation/campaign_import.html",
        {
            "campaign": campaign,
            "form": form,
            "message": message,
            "errors": errors,
            "max_bytes": settings.IMPORT_MAX_BYTES,
            "max_lines": settings.IMPORT_MAX_LINES,
            "tab": "import",
        },
        status=400 if (message or form.errors) else 200,
    )


@require_http_methods(["GET", "POST"])
@login_required
def campaign_build(request: HttpRequest, slug: str) -> HttpResponse:
    campaign = _admin_campaign(request, slug)
    form = BuildForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            created = comparisons_build(
                campaign=campaign, strategy=data["strategy"], k=data["k"], seed=data["seed"]
            )
        except AnnotationError as exc:
            form.add_error(None, exc.message)
        else:
            messages.success(request, f"Built {created} new comparisons.")
            return redirect("annotation:campaign_detail", slug=campaign.slug)
    return render(
        request,
        "annotation/campaign_build.html",
        {"campaign": campaign, "form": form, "ranking_form": RankingBuildForm(), "tab": "build"},
        status=400 if form.errors else 200,
    )


@require_GET
@login_required
def campaign_export(request: HttpRequest, slug: str) -> HttpResponseBase:
    """Judgments as JSONL, streamed (``?format=trl|text|full|rankings&split=train|eval``);
    ``rankings``: the K-wise rankings expanded into pairs."""
    campaign = permissions.campaign_for(user=request.user, slug=slug, roles=EXPORTERS)
    fmt = request.GET.get("format", "trl")
    split = request.GET.get("split") or None
    if fmt not in formats.EXPORT_FORMATS:
        return HttpResponseBadRequest(f"format must be one of {', '.join(formats.EXPORT_FORMATS)}")
    if split is not None and split not in formats.SPLITS:
        return HttpResponseBadRequest(f"split must be one of {', '.join(formats.SPLITS)}")
    # Dawid-Skene weights, once per export and before the stream starts (one query).
    weights = reports.judgment_weights(campaign=campaign) if fmt in WEIGHTED_FORMATS else None
    if fmt in RANKING_FORMATS:
        judgments: Iterable[Any] = selectors_rankings.rankings_for_export(
            campaign=campaign, split=split
        )
    else:
        judgments = selectors.judgments_for_export(campaign=campaign, split=split)
    response = StreamingHttpResponse(
        formats.export_chunks(judgments, fmt=fmt, weights=weights),
        content_type="application/x-ndjson; charset=utf-8",
    )
    # The slug is a validated SlugField, so it is safe inside the header.
    name = "-".join(part for part in (campaign.slug, fmt, split) if part)
    response["Content-Disposition"] = f'attachment; filename="{name}.jsonl"'
    response["Cache-Control"] = "no-store"
    return response


@require_POST
@login_required
def campaign_rank_build(request: HttpRequest, slug: str) -> HttpResponse:
    """The build page's second form: ranking tasks of k candidates per prompt."""
    campaign = _admin_campaign(request, slug)
    form = RankingBuildForm(request.POST)
    if form.is_valid():
        try:
            created = ranking_tasks_build(
                campaign=campaign, k=form.cleaned_data["k"], seed=form.cleaned_data["seed"]
            )
        except AnnotationError as exc:
            messages.error(request, exc.message)
        else:
            messages.success(request, f"Built {created} new ranking tasks.")
            return redirect("annotation:campaign_detail", slug=campaign.slug)
    else:
        messages.error(
            request, "; ".join(str(e) for errors in form.errors.values() for e in errors)
        )
    return redirect("annotation:campaign_build", slug=campaign.slug)
