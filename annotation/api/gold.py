"""Gold items over the API: generate them, or mark a comparison as gold.

``POST /api/campaigns/<slug>/gold/`` makes gold items by corrupting good answers
(``annotation.services.gold.gold_generate``); ``POST .../comparisons/<id>/gold/`` sets or
clears one comparison's right answer. Campaign admins only. Serializers have names of their
own so they do not clash in the OpenAPI components with ``annotation.api``'s nested ones.
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from annotation.api.base import BaseApi, CampaignRole
from annotation.gold import Corruption
from annotation.models import Choice, Role
from annotation.services import gold as gold_services


class GoldGenerateInputSerializer(serializers.Serializer):
    count = serializers.IntegerField(min_value=1, max_value=gold_services.MAX_GENERATED)
    kinds = serializers.ListField(
        child=serializers.ChoiceField(choices=[c.value for c in Corruption]),
        required=False,
        max_length=len(Corruption),
        help_text="Corruptions to use; all that apply when left out.",
    )
    planted_errors = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=20_000,
        trim_whitespace=False,
        help_text="One per line: 'find => replace', or a false statement to insert.",
    )
    source_name = serializers.CharField(
        required=False, allow_blank=True, max_length=200, help_text="Only answers of this source."
    )
    seed = serializers.IntegerField(required=False, allow_null=True)


class GoldGenerateOutputSerializer(serializers.Serializer):
    created = serializers.IntegerField()
    by_kind = serializers.DictField(child=serializers.IntegerField())
    tried = serializers.IntegerField()


class GoldGenerateApi(BaseApi):
    """Make gold items: a completion against a corrupted copy, the original the right answer."""

    permission_classes = (IsAuthenticated, CampaignRole)
    campaign_roles = (Role.ADMIN,)

    @extend_schema(
        request=GoldGenerateInputSerializer,
        responses={
            201: GoldGenerateOutputSerializer,
            400: OpenApiResponse(description="Bad input; ``field`` names it."),
        },
    )
    def post(self, request: Request, slug: str) -> Response:
        serializer = GoldGenerateInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        report = gold_services.gold_generate(
            campaign=self.campaign,
            count=data["count"],
            kinds=data.get("kinds"),
            planted_errors=data.get("planted_errors", ""),
            source_name=data.get("source_name", ""),
            seed=data.get("seed"),
        )
        body = {"created": report.created, "by_kind": report.by_kind, "tried": report.tried}
        return Response(GoldGenerateOutputSerializer(body).data, status=status.HTTP_201_CREATED)


class ComparisonGoldInputSerializer(serializers.Serializer):
    gold_choice = serializers.ChoiceField(
        choices=["", *Choice.values],
        allow_blank=True,
        help_text="The right answer in canonical terms (a, b, tie, both_bad); empty unmarks.",
    )


class ComparisonGoldOutputSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    gold_choice = serializers.CharField()
    judgments_wanted = serializers.IntegerField()


class ComparisonGoldSetApi(BaseApi):
    """Set (or clear) a comparison's right answer, which makes it a gold item."""

    permission_classes = (IsAuthenticated, CampaignRole)
    campaign_roles = (Role.ADMIN,)

    @extend_schema(
        request=ComparisonGoldInputSerializer,
        responses={200: ComparisonGoldOutputSerializer},
    )
    def post(self, request: Request, slug: str, comparison_id: int) -> Response:
        serializer = ComparisonGoldInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        comparison = gold_services.comparison_set_gold(
            campaign=self.campaign,
            comparison_id=comparison_id,
            gold_choice=serializer.validated_data["gold_choice"],
        )
        return Response(ComparisonGoldOutputSerializer(comparison).data)
