"""The rater's pages: the home list, the comparison card, submit and skip.

Each view parses input, calls one service (plus the lease of the next card), and renders
``annotation/rate.html`` whole or one of its partials for HTMX. The rater answers in terms of
the layout they saw (left / right); the mapping to canonical A / B happens here, on the
server, from the layout the slot recorded when it was leased. The page never says which side
is A, and never names a model or source.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import wraps
from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import AbstractBaseUser
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render, resolve_url
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import HttpResponseClientRedirect
from django_htmx.middleware import HtmxDetails

from annotation import permissions, selectors, selectors_rankings
from annotation.exceptions import CampaignNotActive, InvalidJudgment, LeaseLost, ScreeningFailed
from annotation.models import Campaign, Choice, RankingSlot, Role, Slot, SlotStatus
from annotation.services.judgments import (
    judgment_submit,
    side_to_canonical,
    slot_lease_next,
    slot_release,
)

TEMPLATE = "annotation/rate.html"
REMAINING_CAP = 500
MAX_SKIPPED = 200
ROLE_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}
_IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_-]{8,64}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

View = Callable[..., HttpResponse]


class HtmxHttpRequest(HttpRequest):
    htmx: HtmxDetails


# -- access ---------------------------------------------------------------------------------------


def login_required_back_to(url_name: str) -> Callable[[View], View]:
    """``login_required`` that also works for HTMX requests.

    A plain redirect would be followed by the browser's XHR and the login page swapped into
    the card; ``HX-Redirect`` makes htmx load the login page as a whole page instead. After
    logging in the rater comes back to the campaign's page ``url_name`` (not to a POST-only
    URL).
    """

    def decorator(view: View) -> View:
        @wraps(view)
        def wrapper(request: HtmxHttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.user.is_authenticated:
                return view(request, *args, **kwargs)
            next_url = reverse(url_name, kwargs={"slug": kwargs["slug"]})
            if request.htmx:
                query = urlencode({"next": next_url})
                return HttpResponseClientRedirect(f"{resolve_url(settings.LOGIN_URL)}?{query}")
            return redirect_to_login(next_url)

        return wrapper

    return decorator


rater_login_required = login_required_back_to("annotation:rate")


def _rater_campaign(request: HttpRequest, slug: str) -> Campaign:
    return permissions.campaign_for(user=request.user, slug=slug, roles=(Role.RATER,))


def _rater(request: HttpRequest) -> AbstractBaseUser:
    """The signed-in user; every view below is behind ``rater_login_required``."""
    user = request.user
    if not isinstance(user, AbstractBaseUser):
        raise PermissionDenied("Log in first.")
    return user


# -- home -----------------------------------------------------------------------------------------


@require_GET
@login_required
def home(request: HttpRequest) -> HttpResponse:
    found = selectors.campaigns_with_roles(user=request.user)
    ranked = selectors_rankings.campaigns_with_ranking_tasks(
        campaign_ids=[c.pk for c, roles in found if Role.RATER in roles]
    )
    rows = [
        {
            "campaign": campaign,
            "roles": [label for value, label in Role.choices if value in roles],
            "can_rate": Role.RATER in roles,
            "can_rank": Role.RATER in roles and campaign.pk in ranked,
            "is_admin": Role.ADMIN in roles,
        }
        for campaign, roles in found
    ]
    runs_campaigns = any(row["is_admin"] for row in rows) or permissions.can_create_campaigns(
        request.user
    )
    return render(request, "annotation/home.html", {"rows": rows, "runs_campaigns": runs_campaigns})


# -- the card -------------------------------------------------------------------------------------


def _skipped_key(campaign: Campaign) -> str:
    return f"rate-skipped-{campaign.pk}"


def _skipped(request: HttpRequest, campaign: Campaign) -> list[int]:
    value = request.session.get(_skipped_key(campaign), [])
    return [int(v) for v in value if isinstance(v, int)] if isinstance(value, list) else []


def lease_token(slot: Slot | RankingSlot) -> str:
    """Names one lease of a slot. A slot that expired and was leased again (perhaps to this
    rater, in another tab, with the sides swapped or the outputs in another order) gets a new
    token, so an answer given on the old card is refused instead of being mapped with the new
    layout."""
    if slot.leased_at is None:
        return ""
    return str((slot.leased_at - _EPOCH) // timedelta(microseconds=1))


def _base_context(request: HttpRequest, campaign: Campaign) -> dict[str, Any]:
    return {"campaign": campaign, "skipped_count": len(_skipped(request, campaign))}


def _card_context(request: HttpRequest, campaign: Campaign, slot: Slot) -> dict[str, Any]:
    card = selectors.slot_card(slot=slot)
    choices = [("left", "1", "Response 1 is better"), ("right", "2", "Response 2 is better")]
    if campaign.allow_tie:
        choices.append(("tie", "3", "Tie"))
    if campaign.allow_both_bad:
        choices.append(("both_bad", "4", "Both are bad"))
    scale = campaign.strength_scale
    return {
        "state": "card",
        "card": card,
        "sides": [card.left, card.right],
        "turns": [
            {
                "role": m.get("role") if m.get("role") in ROLE_LABELS else "other",
                "label": ROLE_LABELS.get(str(m.get("role")), "Message"),
                "content": m.get("content", ""),
            }
            for m in card.messages
        ],
        "choices": choices,
        "strengths": [
            (n, "slightly" if n == 1 else "much" if n == scale else "") for n in range(1, scale + 1)
        ],
        "aspects": list(enumerate(campaign.aspects)),
        "lease_token": lease_token(slot),
        # One key per rendered card: a double click or a retried request stores one row.
        "idempotency_key": secrets.token_urlsafe(16),
    }


def _progress_context(request: HttpRequest, campaign: Campaign, holding: bool) -> dict[str, Any]:
    rater = _rater(request)
    remaining, more = selectors.rater_remaining_count(
        rater=rater, campaign=campaign, cap=REMAINING_CAP
    )
    return {
        "done": selectors.rater_done_count(rater=rater, campaign=campaign),
        "remaining": remaining + (1 if holding else 0),
        "remaining_capped": more,
    }


def _next_card(request: HttpRequest, campaign: Campaign) -> tuple[dict[str, Any], int]:
    """Lease the rater's next slot and build the context of the card region, with a status."""
    context = _base_context(request, campaign)
    try:
        slot = slot_lease_next(
            rater=_rater(request),
            campaign=campaign,
            exclude_comparison_ids=_skipped(request, campaign),
        )
    except CampaignNotActive as exc:
        context.update(state="paused", message=exc.message)
        return context, 409
    except ScreeningFailed as exc:
        # 409 like a paused campaign: the card region swaps in the message in place.
        context.update(state="screening_failed", message=exc.message)
        return context, 409
    if slot is None:
        context["state"] = "empty"
    else:
        context.update(_card_context(request, campaign, slot))
    context.update(_progress_context(request, campaign, holding=slot is not None))
    return context, 200


@require_GET
@rater_login_required
def rate(request: HtmxHttpRequest, slug: str) -> HttpResponse:
    campaign = _rater_campaign(request, slug)
    context, status = _next_card(request, campaign)
    if request.htmx:
        return render(request, f"{TEMPLATE}#card-region", context, status=status)
    context["page_config"] = {
        "strengthScale": campaign.strength_scale,
        "choices": [value for value, _key, _label in context.get("choices", [])],
        "aspects": campaign.aspects,
        "campaign": campaign.name,
    }
    return render(request, TEMPLATE, context, status=status)


# -- answering ------------------------------------------------------------------------------------


def _optional_int(raw: str, *, field: str) -> int | None:
    raw = raw.strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise InvalidJudgment(f"{field} must be a whole number", field=field) from None


def _my_slot(request: HttpRequest, campaign: Campaign) -> Slot:
    slot_id = _optional_int(request.POST.get("slot_id", ""), field="slot_id")
    slot = None
    if slot_id is not None:
        slot = selectors.slot_for_rater(rater=_rater(request), campaign=campaign, slot_id=slot_id)
    if slot is None or lease_token(slot) != request.POST.get("lease", ""):
        raise LeaseLost(
            "This comparison is no longer assigned to you: your lease expired and it went to "
            "someone else, so this answer was not saved."
        )
    return slot


def parse_answer(post: Any, *, campaign: Campaign, left_is_a: bool) -> dict[str, Any]:
    """The service's keyword arguments from the posted form, sides mapped to A/B."""
    side = post.get("choice", "")
    if side not in ("left", "right", "tie", "both_bad"):
        raise InvalidJudgment("choose which response is better (or tie / both bad)", field="choice")
    choice = side_to_canonical(side, left_is_a=left_is_a)
    strength = None
    # "How much better" has no meaning for a tie or both bad: a strength picked before the
    # rater changed their mind to one of those is dropped rather than refused.
    if choice in (Choice.A, Choice.B):
        strength = _optional_int(post.get("strength", ""), field="strength")
    aspects = {}
    for index, name in enumerate(campaign.aspects):
        answer = post.get(f"aspect-{index}", "")
        if not answer:
            continue
        if answer not in ("left", "right", "tie"):
            raise InvalidJudgment(f"aspect '{name}': answer 1, 2 or tie", field="aspects")
        aspects[name] = side_to_canonical(answer, left_is_a=left_is_a)
    verdicts = {}
    for name in post:
        if name.startswith("critique-") and post.get(name) in ("valid", "invalid"):
            critique_id = _optional_int(name.removeprefix("critique-"), field="critique_verdicts")
            if critique_id is not None:
                verdicts[critique_id] = post.get(name) == "valid"
    key = post.get("idempotency_key", "")
    return {
        "critique_verdicts": verdicts or None,
        "choice": choice,
        "strength": strength,
        "aspects": aspects,
        "reason_tags": post.getlist("reason_tags"),
        "flags": post.getlist("flags"),
        "rationale": post.get("rationale", ""),
        "decision_ms": _optional_int(post.get("decision_ms", ""), field="decision_ms"),
        "idempotency_key": key if _IDEMPOTENCY_KEY.fullmatch(key) else None,
    }


def _see_other(campaign: Campaign) -> HttpResponse:
    response = redirect("annotation:rate", slug=campaign.slug)
    response.status_code = 303  # after a POST, the browser must GET the card again
    return response


@require_POST
@rater_login_required
def rate_submit(request: HtmxHttpRequest, slug: str) -> HttpResponse:
    campaign = _rater_campaign(request, slug)
    try:
        slot = _my_slot(request, campaign)
        answer = parse_answer(request.POST, campaign=campaign, left_is_a=slot.left_is_a)
        result = judgment_submit(
            rater=_rater(request),
            campaign=campaign,
            slot_id=slot.pk,
            expected_left_is_a=slot.left_is_a,
            **answer,
        )
    except InvalidJudgment as exc:
        if not request.htmx:
            messages.error(request, f"Not saved: {exc.message}")
            return _see_other(campaign)
        # Only the error line is replaced, so the rater keeps what they already filled in.
        response = render(request, f"{TEMPLATE}#form-error", {"error": exc}, status=422)
        response["HX-Retarget"] = "#card-errors"
        response["HX-Reswap"] = "innerHTML"
        return response
    except LeaseLost as exc:
        if not request.htmx:
            messages.warning(request, exc.message)
            return _see_other(campaign)
        context = _base_context(request, campaign)
        context.update(state="lease_lost", message=exc.message)
        return render(request, f"{TEMPLATE}#card-region", context, status=409)
    if not request.htmx:
        messages.success(request, "Saved.")
        return _see_other(campaign)
    context, _status = _next_card(request, campaign)
    context.update(submitted=True, created=result.created)
    # 200 even when the campaign was paused meanwhile: the answer itself was saved.
    return render(request, f"{TEMPLATE}#card-region", context)


@require_POST
@rater_login_required
def rate_skip(request: HtmxHttpRequest, slug: str) -> HttpResponse:
    """Give the current comparison back to the pool and show the next one. Skipped
    comparisons are not offered again in this session until the rater asks for them."""
    campaign = _rater_campaign(request, slug)
    skipped = _skipped(request, campaign)
    if request.POST.get("reset"):
        skipped = []
    else:
        try:
            slot_id = _optional_int(request.POST.get("slot_id", ""), field="slot_id")
        except InvalidJudgment:
            slot_id = None  # nothing to give back; just show the next card
        slot = None
        if slot_id is not None:
            slot = selectors.slot_for_rater(
                rater=_rater(request), campaign=campaign, slot_id=slot_id
            )
        if slot is not None and slot.status == SlotStatus.LEASED:
            slot_release(rater=_rater(request), campaign=campaign, slot_id=slot.pk)
            skipped = [*skipped, slot.comparison_id][-MAX_SKIPPED:]
    request.session[_skipped_key(campaign)] = skipped
    if not request.htmx:
        return _see_other(campaign)
    context, status = _next_card(request, campaign)
    return render(request, f"{TEMPLATE}#card-region", context, status=status)
