"""The rater's ranking page: K outputs of one prompt, ranked best to worst.

Like the pairwise page (``annotation.views.rater``): each view parses input, calls one
service (plus the lease of the next task) and renders ``annotation/rank.html`` whole or its
``card-region`` partial for HTMX. The rater ranks outputs by the positions they were shown
at (1..K); the mapping to completions happens here, with the order the slot recorded when it
was leased. The page never names a model, a source or a completion id.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from annotation import selectors_rankings
from annotation.exceptions import CampaignNotActive, InvalidJudgment, LeaseLost
from annotation.models import Campaign, RankingSlot
from annotation.services.rankings import positions_to_order, ranking_lease_next, ranking_submit
from annotation.views.rater import (
    ROLE_LABELS,
    HtmxHttpRequest,
    _rater,
    _rater_campaign,
    lease_token,
    login_required_back_to,
)

TEMPLATE = "annotation/rank.html"
_IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_-]{8,64}")


rank_login_required = login_required_back_to("annotation:rank")


def _card_context(request: HttpRequest, campaign: Campaign, slot: RankingSlot) -> dict[str, Any]:
    card = selectors_rankings.ranking_card(slot=slot)
    return {
        "state": "card",
        "card": card,
        "k": len(card.outputs),
        "turns": [
            {
                "role": m.get("role") if m.get("role") in ROLE_LABELS else "other",
                "label": ROLE_LABELS.get(str(m.get("role")), "Message"),
                "content": m.get("content", ""),
            }
            for m in card.messages
        ],
        "lease_token": lease_token(slot),
        # One key per rendered card: a double click or a retried request stores one row.
        "idempotency_key": secrets.token_urlsafe(16),
    }


def _next_card(request: HttpRequest, campaign: Campaign) -> tuple[dict[str, Any], int]:
    """Lease the rater's next ranking task; the context of the card region and a status."""
    rater = _rater(request)
    context: dict[str, Any] = {"campaign": campaign}
    try:
        slot = ranking_lease_next(rater=rater, campaign=campaign)
    except CampaignNotActive as exc:
        context.update(state="paused", message=exc.message)
        return context, 409
    if slot is None:
        context["state"] = "empty"
    else:
        context.update(_card_context(request, campaign, slot))
    context["done"] = selectors_rankings.ranking_done_count(rater=rater, campaign=campaign)
    return context, 200


@require_GET
@rank_login_required
def rank(request: HtmxHttpRequest, slug: str) -> HttpResponse:
    campaign = _rater_campaign(request, slug)
    context, status = _next_card(request, campaign)
    if request.htmx:
        return render(request, f"{TEMPLATE}#card-region", context, status=status)
    return render(request, TEMPLATE, context, status=status)


def _parse_positions(raw: str) -> list[int]:
    try:
        return [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise InvalidJudgment("rank every output (press their numbers)", field="order") from None


def _see_other(campaign: Campaign) -> HttpResponse:
    response = redirect("annotation:rank", slug=campaign.slug)
    response.status_code = 303  # after a POST, the browser must GET the task again
    return response


@require_POST
@rank_login_required
def rank_submit(request: HtmxHttpRequest, slug: str) -> HttpResponse:
    campaign = _rater_campaign(request, slug)
    rater = _rater(request)
    post = request.POST
    try:
        slot_id = int(post.get("slot_id", "") or 0)
        slot = selectors_rankings.ranking_slot_for_rater(
            rater=rater, campaign=campaign, slot_id=slot_id
        )
        if slot is None or lease_token(slot) != post.get("lease", ""):
            raise LeaseLost(
                "This task is no longer assigned to you: your lease expired and it went to "
                "someone else, so this ranking was not saved."
            )
        order = positions_to_order(
            _parse_positions(post.get("order", "")), shown_order=slot.shown_order
        )
        raw_ms = post.get("decision_ms", "").strip()
        key = post.get("idempotency_key", "")
        result = ranking_submit(
            rater=rater,
            campaign=campaign,
            slot_id=slot.pk,
            order=order,
            decision_ms=int(raw_ms) if raw_ms.isdigit() else None,
            idempotency_key=key if _IDEMPOTENCY_KEY.fullmatch(key) else None,
            expected_shown_order=slot.shown_order,
        )
    except ValueError:
        # A slot id that is not a number: no task of this rater's.
        return _lost(request, campaign, "This task is no longer assigned to you.")
    except InvalidJudgment as exc:
        if not request.htmx:
            messages.error(request, f"Not saved: {exc.message}")
            return _see_other(campaign)
        # Only the error line is replaced: the rater keeps the ranking they built.
        response = render(request, f"{TEMPLATE}#form-error", {"error": exc}, status=422)
        response["HX-Retarget"] = "#card-errors"
        response["HX-Reswap"] = "innerHTML"
        return response
    except LeaseLost as exc:
        return _lost(request, campaign, exc.message)
    except CampaignNotActive as exc:  # archived since the task was shown
        if not request.htmx:
            messages.warning(request, exc.message)
            return _see_other(campaign)
        context = {"campaign": campaign, "state": "paused", "message": exc.message}
        return render(request, f"{TEMPLATE}#card-region", context, status=409)
    if not request.htmx:
        messages.success(request, "Saved.")
        return _see_other(campaign)
    context, _status = _next_card(request, campaign)
    context.update(submitted=True, created=result.created)
    # 200 even when the campaign was paused meanwhile: the ranking itself was saved.
    return render(request, f"{TEMPLATE}#card-region", context)


def _lost(request: HtmxHttpRequest, campaign: Campaign, message: str) -> HttpResponse:
    if not request.htmx:
        messages.warning(request, message)
        return _see_other(campaign)
    context = {"campaign": campaign, "state": "lease_lost", "message": message}
    return render(request, f"{TEMPLATE}#card-region", context, status=409)
