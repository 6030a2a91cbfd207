"""The rater's loop: lease the next comparison, submit a judgment, release a lease.

The hot path: plain data in and out for well-formed bodies (see ``fast_judgment_input``),
held to the serializers, which stay the documented schema, by tests."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from drf_spectacular.utils import (
    OpenApiResponse,
    extend_schema,
)
from rest_framework import serializers, status
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from annotation import selectors
from annotation.api.base import (
    ASPECT_ANSWERS,
    IDEMPOTENCY_KEY_HEADER,
    MAX_LIST_ITEMS,
    SIDE_CHOICES,
    BaseApi,
    CampaignRole,
    _caller,
    idempotency_key,
)
from annotation.exceptions import InvalidJudgment
from annotation.models import Campaign, Judgment, Role
from annotation.services import judgments as judgment_services

# -- the rater's loop (hot path: keep it to a handful of queries) --------------------------------


class CritiqueOutputSerializer(serializers.Serializer):
    # The critic model's name stays on the server, like the completions' sources.
    id = serializers.IntegerField(help_text="For critique_verdicts in the submit.")
    text = serializers.CharField()
    spans = serializers.ListField(child=serializers.DictField())


class SideOutputSerializer(serializers.Serializer):
    text = serializers.CharField()
    critiques = CritiqueOutputSerializer(many=True)


class SlotLeaseApi(BaseApi):
    """Lease the next comparison for the calling rater (or renew the one they hold).

    200 with the card; 204 when nothing is left for them; 409 when the campaign is not active.
    """

    permission_classes = (IsAuthenticated, CampaignRole)
    campaign_roles = (Role.RATER,)

    class MessageSerializer(serializers.Serializer):
        role = serializers.CharField()
        content = serializers.CharField()

    class FormSerializer(serializers.Serializer):
        choices = serializers.ListField(child=serializers.CharField())
        strength_scale = serializers.IntegerField()
        aspects = serializers.ListField(child=serializers.CharField())
        aspect_answers = serializers.ListField(child=serializers.CharField())
        reason_tags = serializers.ListField(child=serializers.CharField())
        flags = serializers.ListField(child=serializers.CharField())
        require_rationale = serializers.BooleanField()

    class OutputSerializer(serializers.Serializer):
        slot = serializers.IntegerField()
        lease_expires_at = serializers.DateTimeField()
        guidelines_version = serializers.IntegerField()
        messages = serializers.ListField(child=serializers.DictField())
        left = SideOutputSerializer()
        right = SideOutputSerializer()
        critique_shown = serializers.BooleanField()
        form = serializers.DictField()

    @extend_schema(
        request=None,
        responses={
            200: OutputSerializer,
            204: OpenApiResponse(description="Nothing left for you in this campaign."),
            409: OpenApiResponse(description="The campaign is not active (paused, draft...)."),
        },
    )
    def post(self, request: Request, slug: str) -> Response:
        campaign = self.campaign
        slot = judgment_services.slot_lease_next(rater=_caller(request), campaign=campaign)
        if slot is None:
            return Response(status=status.HTTP_204_NO_CONTENT)
        card = selectors.slot_card(slot=slot)
        # Plain data, like the submit's answer (see ``judgment_as_seen``).
        data = {
            "slot": slot.pk,
            "lease_expires_at": _datetime(card.lease_expires_at),
            "guidelines_version": campaign.guidelines_version,
            "messages": card.messages,
            "left": _side_as_seen(card.left),
            "right": _side_as_seen(card.right),
            "critique_shown": slot.critique_shown,
            "form": _form_options(campaign),
        }
        return Response(data)


def _side_as_seen(side: selectors.Side) -> dict[str, Any]:
    # The critic model's name stays on the server, like the completions' sources.
    return {
        "text": side.text,
        "critiques": [{"id": c.pk, "text": c.text, "spans": list(c.spans)} for c in side.critiques],
    }


def _form_options(campaign: Campaign) -> dict[str, Any]:
    choices = ["left", "right"]
    if campaign.allow_tie:
        choices.append("tie")
    if campaign.allow_both_bad:
        choices.append("both_bad")
    return {
        "choices": choices,
        "strength_scale": campaign.strength_scale,
        "aspects": list(campaign.aspects),
        "aspect_answers": list(ASPECT_ANSWERS),
        "reason_tags": list(campaign.reason_tags),
        "flags": list(campaign.flag_options),
        "require_rationale": campaign.require_rationale,
    }


class JudgmentSubmitApi(BaseApi):
    """Submit the rater's judgment on their leased slot.

    Idempotent: send an ``Idempotency-Key`` header (or ``idempotency_key`` field); repeating
    the request, or submitting the same slot twice, returns the stored judgment with 200
    instead of 201 and stores nothing new. ``choice`` and aspect answers are in the rater's
    terms (``left`` / ``right`` / ``tie`` / ``both_bad``); canonical ``a`` / ``b`` are refused.
    """

    permission_classes = (IsAuthenticated, CampaignRole)
    campaign_roles = (Role.RATER,)

    class InputSerializer(serializers.Serializer):
        slot = serializers.IntegerField(min_value=1)
        choice = serializers.ChoiceField(choices=SIDE_CHOICES)
        strength = serializers.IntegerField(min_value=1, required=False, allow_null=True)
        aspects = serializers.DictField(
            child=serializers.ChoiceField(choices=ASPECT_ANSWERS), required=False
        )
        reason_tags = serializers.ListField(
            child=serializers.CharField(max_length=60), max_length=MAX_LIST_ITEMS, required=False
        )
        rationale = serializers.CharField(
            allow_blank=True, required=False, max_length=5000, trim_whitespace=False
        )
        flags = serializers.ListField(
            child=serializers.CharField(max_length=60), max_length=MAX_LIST_ITEMS, required=False
        )
        decision_ms = serializers.IntegerField(min_value=0, required=False, allow_null=True)
        idempotency_key = serializers.CharField(max_length=64, required=False)
        critique_verdicts = serializers.DictField(
            child=serializers.BooleanField(),
            required=False,
            help_text="Critique id -> whether it points at a real problem (critiques shown).",
        )

        def validate_aspects(self, value: dict[str, str]) -> dict[str, str]:
            if len(value) > MAX_LIST_ITEMS:
                raise serializers.ValidationError(f"At most {MAX_LIST_ITEMS} aspects.")
            return value

    class OutputSerializer(serializers.Serializer):
        id = serializers.IntegerField()
        slot = serializers.IntegerField(source="slot_id")
        choice = serializers.CharField()
        strength = serializers.IntegerField(allow_null=True)
        aspects = serializers.DictField(child=serializers.CharField())
        reason_tags = serializers.ListField(child=serializers.CharField())
        rationale = serializers.CharField()
        flags = serializers.ListField(child=serializers.CharField())
        decision_ms = serializers.IntegerField(allow_null=True)
        critique_shown = serializers.BooleanField()
        guidelines_version = serializers.IntegerField()
        created_at = serializers.DateTimeField()

    @extend_schema(
        request=InputSerializer,
        parameters=[IDEMPOTENCY_KEY_HEADER],
        responses={
            201: OutputSerializer,
            200: OpenApiResponse(OutputSerializer, description="Already stored: the same one."),
            400: OpenApiResponse(description="Does not fit the form; ``field`` names it."),
            409: OpenApiResponse(description="The lease was lost: load the next comparison."),
        },
    )
    def post(self, request: Request, slug: str) -> Response:
        data = fast_judgment_input(request.data)
        if data is None:
            # Anything off the common shape goes through the serializer, which also words the
            # errors; the fast check accepts only what the serializer accepts unchanged.
            serializer = self.InputSerializer(data=request.data)
            serializer.is_valid(raise_exception=True)
            data = serializer.validated_data
        key = idempotency_key(request, data)
        # The service maps left / right to a / b with the layout of the slot it locks, so no
        # read of the slot is needed here (it was a tenth of a submit's CPU).
        result = judgment_services.judgment_submit(
            rater=_caller(request),
            campaign=self.campaign,
            slot_id=data["slot"],
            choice=data["choice"],
            strength=data.get("strength"),
            aspects=data.get("aspects", {}),
            reason_tags=data.get("reason_tags"),
            rationale=data.get("rationale", ""),
            flags=data.get("flags"),
            decision_ms=data.get("decision_ms"),
            idempotency_key=key,
            critique_verdicts=_verdicts(data.get("critique_verdicts")),
            side_answers=True,
        )
        return Response(
            judgment_as_seen(result.judgment),
            status=status.HTTP_201_CREATED if result.created else status.HTTP_200_OK,
        )


# Output of the two hot endpoints is built as plain data: instantiating their output
# serializers (which deep-copy their fields each time) was a fifth of a submit's CPU. The
# serializers stay as the documented schema; a test checks both give the same JSON.
_DATETIME = serializers.DateTimeField()


def _datetime(value: datetime | None) -> str | None:
    return None if value is None else _DATETIME.to_representation(value)


_UNSAFE_TEXT = re.compile("[\x00\ud800-\udfff]")


def _plain_text(value: Any, *, max_length: int, trimmed: bool) -> bool:
    """A string a ``CharField`` would accept unchanged."""
    return (
        type(value) is str
        and len(value) <= max_length
        and (not trimmed or (value != "" and value == value.strip()))
        and _UNSAFE_TEXT.search(value) is None
    )


def _plain_int(value: Any, *, minimum: int, nullable: bool) -> bool:
    return (value is None and nullable) or (type(value) is int and value >= minimum)


def _plain_tags(value: Any) -> bool:
    return (
        type(value) is list
        and len(value) <= MAX_LIST_ITEMS
        and all(_plain_text(v, max_length=60, trimmed=True) for v in value)
    )


def fast_judgment_input(data: Any) -> dict[str, Any] | None:
    """``JudgmentSubmitApi.InputSerializer``'s validated data for the common, well-formed
    body, checked without building the serializer; ``None`` for anything else (the caller then
    runs the serializer). Never accepts what the serializer would refuse or change."""
    if type(data) is not dict:
        return None
    slot, choice = data.get("slot"), data.get("choice")
    if not (_plain_int(slot, minimum=1, nullable=False) and choice in SIDE_CHOICES):
        return None
    checks = {
        "strength": lambda v: _plain_int(v, minimum=1, nullable=True),
        "aspects": lambda v: (
            type(v) is dict
            and len(v) <= MAX_LIST_ITEMS
            and all(type(k) is str and a in ASPECT_ANSWERS for k, a in v.items())
        ),
        "reason_tags": _plain_tags,
        "rationale": lambda v: _plain_text(v, max_length=5000, trimmed=False),
        "flags": _plain_tags,
        "decision_ms": lambda v: _plain_int(v, minimum=0, nullable=True),
        "idempotency_key": lambda v: _plain_text(v, max_length=64, trimmed=True),
        "critique_verdicts": lambda v: (
            type(v) is dict and all(type(k) is str and type(b) is bool for k, b in v.items())
        ),
    }
    out: dict[str, Any] = {"slot": slot, "choice": choice}
    for name, check in checks.items():
        if name in data:
            value = data[name]
            if not check(value):
                return None
            out[name] = value
    return out


def _verdicts(raw: dict[str, bool] | None) -> dict[int, bool] | None:
    if not raw:
        return None
    if not all(key.isdigit() for key in raw):
        raise InvalidJudgment("critique ids are whole numbers", field="critique_verdicts")
    return {int(key): valid for key, valid in raw.items()}


def judgment_as_seen(judgment: Judgment) -> dict[str, Any]:
    """A stored judgment in the rater's terms, as ``JudgmentSubmitApi`` answers it."""
    left_was_a = judgment.left_was_a
    return {
        "id": judgment.pk,
        "slot": judgment.slot_id,
        "choice": judgment_services.canonical_to_side(judgment.choice, left_was_a=left_was_a),
        "strength": judgment.strength,
        "aspects": {
            k: judgment_services.canonical_to_side(v, left_was_a=left_was_a)
            for k, v in judgment.aspects.items()
        },
        "reason_tags": judgment.reason_tags,
        "rationale": judgment.rationale,
        "flags": judgment.flags,
        "decision_ms": judgment.decision_ms,
        "critique_shown": judgment.critique_shown,
        "guidelines_version": judgment.guidelines_version,
        "created_at": _datetime(judgment.created_at),
    }


class SlotReleaseApi(BaseApi):
    """Give a leased comparison back (skip it): it returns to the pool at once."""

    permission_classes = (IsAuthenticated, CampaignRole)
    campaign_roles = (Role.RATER,)

    @extend_schema(
        request=None,
        responses={
            204: None,
            404: OpenApiResponse(description="You hold no live lease on that slot."),
        },
    )
    def post(self, request: Request, slug: str, slot_id: int) -> Response:
        released = judgment_services.slot_release(
            rater=_caller(request), campaign=self.campaign, slot_id=slot_id
        )
        if not released:
            return Response(
                {"detail": "You hold no live lease on that slot."},
                status=status.HTTP_404_NOT_FOUND,
            )
        return Response(status=status.HTTP_204_NO_CONTENT)
