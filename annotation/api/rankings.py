"""K-wise ranking over the API: lease a task, submit a ranking, build tasks.

``POST /api/campaigns/<slug>/rank/next/`` leases the caller's next ranking task (raters);
``POST .../rankings/`` submits a ranking; ``POST .../ranking-tasks/build/`` makes tasks from
each prompt's candidates (admins). Raters speak in the terms they see: outputs are numbered
by position 1..K in the order shown, and a ranking lists positions, best first; the server
maps positions to completions with the order the slot recorded, and never tells a rater which
completion, model or source an output is. Serializers have names of their own so they do not
clash in the OpenAPI components with ``annotation.api``'s nested ones.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from annotation import selectors_rankings
from annotation.api.base import (
    IDEMPOTENCY_KEY_HEADER,
    BaseApi,
    CampaignRole,
    _caller,
    idempotency_key,
)
from annotation.api.rater import _datetime
from annotation.exceptions import LeaseLost
from annotation.models import Ranking, Role
from annotation.services import rankings as ranking_services


class RankingOutputItemSerializer(serializers.Serializer):
    position = serializers.IntegerField(help_text="1..K, the order shown; rank by it.")
    text = serializers.CharField()


class RankingCardSerializer(serializers.Serializer):
    slot = serializers.IntegerField()
    lease_expires_at = serializers.DateTimeField()
    guidelines_version = serializers.IntegerField()
    messages = serializers.ListField(child=serializers.DictField())
    outputs = RankingOutputItemSerializer(many=True)


class RankingLeaseApi(BaseApi):
    """Lease the next ranking task for the calling rater (or renew the one they hold).

    200 with the task; 204 when nothing is left for them; 409 when the campaign is not active.
    """

    permission_classes = (IsAuthenticated, CampaignRole)
    campaign_roles = (Role.RATER,)

    @extend_schema(
        request=None,
        responses={
            200: RankingCardSerializer,
            204: OpenApiResponse(description="No ranking task left for you in this campaign."),
            409: OpenApiResponse(description="The campaign is not active (paused, draft...)."),
        },
    )
    def post(self, request: Request, slug: str) -> Response:
        slot = ranking_services.ranking_lease_next(rater=_caller(request), campaign=self.campaign)
        if slot is None:
            return Response(status=status.HTTP_204_NO_CONTENT)
        card = selectors_rankings.ranking_card(slot=slot)
        data = {
            "slot": slot.pk,
            "lease_expires_at": card.lease_expires_at,
            "guidelines_version": self.campaign.guidelines_version,
            "messages": card.messages,
            "outputs": [{"position": o.position, "text": o.text} for o in card.outputs],
        }
        return Response(RankingCardSerializer(data).data)


class RankingSubmitInputSerializer(serializers.Serializer):
    slot = serializers.IntegerField(min_value=1)
    order = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=ranking_services.MAX_K),
        min_length=ranking_services.MIN_K,
        max_length=ranking_services.MAX_K,
        help_text="Every position 1..K once, best first (ties are not supported).",
    )
    decision_ms = serializers.IntegerField(min_value=0, required=False, allow_null=True)
    idempotency_key = serializers.CharField(max_length=64, required=False)


class RankingSubmitOutputSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    slot = serializers.IntegerField()
    order = serializers.ListField(
        child=serializers.IntegerField(), help_text="Positions as shown, best first."
    )
    decision_ms = serializers.IntegerField(allow_null=True)
    guidelines_version = serializers.IntegerField()
    created_at = serializers.DateTimeField()


def ranking_as_seen(ranking: Ranking) -> dict[str, Any]:
    """A stored ranking in the rater's terms: positions as shown, best first."""
    position = {cid: n for n, cid in enumerate(ranking.shown_order, start=1)}
    return {
        "id": ranking.pk,
        "slot": ranking.slot_id,
        "order": [position[cid] for cid in ranking.order],
        "decision_ms": ranking.decision_ms,
        "guidelines_version": ranking.guidelines_version,
        "created_at": _datetime(ranking.created_at),
    }


class RankingSubmitApi(BaseApi):
    """Submit the rater's ranking of their leased task, as positions (1..K as shown), best
    first. Idempotent like the judgment submit: an ``Idempotency-Key`` header (or field), or a
    second submit of the same slot, returns the stored ranking with 200 instead of 201."""

    permission_classes = (IsAuthenticated, CampaignRole)
    campaign_roles = (Role.RATER,)

    @extend_schema(
        request=RankingSubmitInputSerializer,
        parameters=[IDEMPOTENCY_KEY_HEADER],
        responses={
            201: RankingSubmitOutputSerializer,
            200: OpenApiResponse(RankingSubmitOutputSerializer, description="Already stored."),
            400: OpenApiResponse(description="Not a ranking of every output; ``field`` names it."),
            409: OpenApiResponse(description="The lease was lost: load the next task."),
        },
    )
    def post(self, request: Request, slug: str) -> Response:
        serializer = RankingSubmitInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        key = idempotency_key(request, data)
        rater = _caller(request)
        slot = selectors_rankings.ranking_slot_for_rater(
            rater=rater, campaign=self.campaign, slot_id=data["slot"]
        )
        if slot is None:
            raise LeaseLost("This task is no longer assigned to you. Load the next one.")
        order = ranking_services.positions_to_order(data["order"], shown_order=slot.shown_order)
        result = ranking_services.ranking_submit(
            rater=rater,
            campaign=self.campaign,
            slot_id=slot.pk,
            order=order,
            decision_ms=data.get("decision_ms"),
            idempotency_key=key,
            # Checked under the slot's lock: positions mapped with an order since redrawn
            # are refused, never stored scrambled.
            expected_shown_order=slot.shown_order,
        )
        return Response(
            ranking_as_seen(result.ranking),
            status=status.HTTP_201_CREATED if result.created else status.HTTP_200_OK,
        )


class RankingTasksBuildInputSerializer(serializers.Serializer):
    k = serializers.IntegerField(min_value=ranking_services.MIN_K, max_value=ranking_services.MAX_K)
    seed = serializers.IntegerField(required=False, allow_null=True)


class RankingTasksBuildOutputSerializer(serializers.Serializer):
    created = serializers.IntegerField()


class RankingTasksBuildApi(BaseApi):
    """Make one ranking task of ``k`` random candidates for each prompt with at least ``k``;
    prompts that already have a task of that size are skipped (building twice is harmless)."""

    permission_classes = (IsAuthenticated, CampaignRole)
    campaign_roles = (Role.ADMIN,)

    @extend_schema(
        request=RankingTasksBuildInputSerializer,
        responses={201: RankingTasksBuildOutputSerializer},
    )
    def post(self, request: Request, slug: str) -> Response:
        serializer = RankingTasksBuildInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        created = ranking_services.ranking_tasks_build(
            campaign=self.campaign,
            k=serializer.validated_data["k"],
            seed=serializer.validated_data.get("seed"),
        )
        return Response(
            RankingTasksBuildOutputSerializer({"created": created}).data,
            status=status.HTTP_201_CREATED,
        )
