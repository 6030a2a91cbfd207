"""Campaign progress and the streamed judgment export."""

from __future__ import annotations

from typing import Any

from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    extend_schema,
)
from rest_framework import serializers
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from annotation import formats, reports, selectors, selectors_rankings
from annotation.api.base import (
    BaseApi,
    CampaignRole,
)
from annotation.formats.export import RANKING_FORMATS, WEIGHTED_FORMATS
from annotation.models import Role, Split

# -- progress and export ------------------------------------------------------------------------


class RaterProgressSerializer(serializers.Serializer):
    rater_id = serializers.IntegerField()
    username = serializers.CharField()
    judgments = serializers.IntegerField()
    median_decision_ms = serializers.FloatField(allow_null=True)
    ties = serializers.IntegerField()
    both_bad = serializers.IntegerField()
    left_chosen = serializers.IntegerField()
    last_at = serializers.DateTimeField(allow_null=True)


class CampaignProgressApi(BaseApi):
    """Progress of a campaign and of each rater (its admins and ML staff)."""

    permission_classes = (IsAuthenticated, CampaignRole)
    campaign_roles = (Role.ADMIN, Role.ML_STAFF)

    class OutputSerializer(serializers.Serializer):
        comparisons = serializers.IntegerField()
        slots = serializers.IntegerField()
        filled = serializers.IntegerField()
        leased = serializers.IntegerField()
        open = serializers.IntegerField()
        expired_leases = serializers.IntegerField()
        judgments = serializers.IntegerField()
        percent = serializers.FloatField()
        raters = RaterProgressSerializer(many=True)

    @extend_schema(responses={200: OutputSerializer})
    def get(self, request: Request, slug: str) -> Response:
        progress = selectors.campaign_progress(campaign=self.campaign)
        return Response(self.OutputSerializer(progress).data)


class _FirstRenderer(DefaultContentNegotiation):
    """The export's ``?format=`` names the file format, not a DRF renderer."""

    def select_renderer(self, request: Any, renderers: Any, format_suffix: Any = None) -> Any:
        return renderers[0], renderers[0].media_type


class JudgmentExportApi(BaseApi):
    """Stream a campaign's judgments as JSONL (its admins and ML staff).

    ``?format=trl``: TRL's conversational ``prompt`` / ``chosen`` / ``rejected`` with
    ``margin`` from strength (ties and both-bad are left out); ``?format=text``: the same with
    plain strings (HH dialogue prompt); ``?format=full``: every judgment with its choice,
    aspects, rater, critique shown and timings; ``?format=rankings``: each K-wise ranking as
    its K(K-1)/2 pairs, with ``group`` (the ranking) and ``rank_chosen`` / ``rank_rejected``.
    ``?split=train|eval`` narrows it.
    Memory stays flat: rows are read in keyset-paginated chunks and written as they come.
    """

    permission_classes = (IsAuthenticated, CampaignRole)
    campaign_roles = (Role.ADMIN, Role.ML_STAFF)
    content_negotiation_class = _FirstRenderer

    class QuerySerializer(serializers.Serializer):
        # The public name of the parameter; the stubs type Field.format as a string.
        format = serializers.ChoiceField(  # type: ignore[assignment]
            choices=formats.EXPORT_FORMATS, default="trl"
        )
        split = serializers.ChoiceField(choices=Split.choices, required=False)

    @extend_schema(
        parameters=[QuerySerializer],
        responses={(200, "application/x-ndjson"): OpenApiTypes.BINARY},
    )
    def get(self, request: Request, slug: str) -> StreamingHttpResponse:
        query = self.QuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        fmt = query.validated_data["format"]
        # Dawid-Skene weights, once per export and before the stream starts (one query).
        weights = (
            reports.judgment_weights(campaign=self.campaign) if fmt in WEIGHTED_FORMATS else None
        )
        split = query.validated_data.get("split")
        if fmt in RANKING_FORMATS:
            judgments: Any = selectors_rankings.rankings_for_export(
                campaign=self.campaign, split=split
            )
        else:
            judgments = selectors.judgments_for_export(campaign=self.campaign, split=split)
        # A generator: rows are read and written while the response is being sent.
        chunks = formats.export_chunks(judgments, fmt=fmt, weights=weights)
        response = StreamingHttpResponse(chunks, content_type="application/x-ndjson")
        response["Content-Disposition"] = f'attachment; filename="{self.campaign.slug}-{fmt}.jsonl"'
        response["Cache-Control"] = "no-store"
        return response
