"""The model registry: versions of the caller's campaigns, and one with its lineage."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from training import access, selectors
from training.api.base import TrainingApi, TrainingVersionSerializer, VersionAccess
from training.models import ModelKind, ModelVersion


class TrainingVersionRelativeSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    kind = serializers.CharField()
    visible = serializers.BooleanField(
        help_text="False: made in a campaign you cannot see (not linked from here)."
    )


class TrainingSnapshotSerializer(serializers.Serializer):
    judgment_cutoff = serializers.IntegerField(allow_null=True)
    dataset_sha256 = serializers.CharField()
    dataset_pairs = serializers.IntegerField()


class TrainingSourceUseSerializer(serializers.Serializer):
    completions = serializers.IntegerField()
    comparisons = serializers.IntegerField()
    judgments = serializers.IntegerField()


class VersionListApi(TrainingApi):
    """Model versions made by runs of the caller's campaigns, newest first."""

    permission_classes = (IsAuthenticated,)

    class FilterSerializer(serializers.Serializer):
        kind = serializers.ChoiceField(choices=ModelKind.choices, required=False)
        campaign = serializers.SlugField(required=False, help_text="A campaign's slug.")

    @extend_schema(
        parameters=[FilterSerializer], responses={200: TrainingVersionSerializer(many=True)}
    )
    def get(self, request: Request) -> Response:
        filters = self.FilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        campaigns = access.training_campaigns(user=request.user)
        campaign_id = None
        if "campaign" in filters.validated_data:
            found = [c.pk for c, _ in campaigns if c.slug == filters.validated_data["campaign"]]
            campaign_id = found[0] if found else -1
        versions = selectors.versions_list(
            campaign_ids=[c.pk for c, _ in campaigns],
            kind=filters.validated_data.get("kind"),
            campaign_id=campaign_id,
        )
        return Response(TrainingVersionSerializer(versions, many=True).data)


class VersionDetailApi(TrainingApi):
    """One version with its lineage: the parent chain (nearest first), its children, the
    judgment snapshot its run learned from, and for a policy what its outputs became."""

    permission_classes = (IsAuthenticated, VersionAccess)

    class OutputSerializer(TrainingVersionSerializer):
        lineage = TrainingVersionRelativeSerializer(many=True, help_text="Parents, nearest first.")
        children = TrainingVersionRelativeSerializer(many=True)
        snapshot = TrainingSnapshotSerializer(
            allow_null=True,
            help_text="What the run that made it learned from; null for a base model.",
        )
        use = TrainingSourceUseSerializer(
            allow_null=True, help_text="A policy's outputs in your campaigns; null otherwise."
        )

    @extend_schema(responses={200: OutputSerializer})
    def get(self, request: Request, version_id: int) -> Response:
        version = self.version
        visible = {c.pk for c, _ in access.training_campaigns(user=request.user)}

        def relative(v: ModelVersion) -> dict[str, Any]:
            seen = access.version_visible(v, visible)
            return {"id": v.pk, "name": v.name, "kind": v.kind, "visible": seen}

        use = (
            selectors.source_use(source_id=version.source_id, campaign_ids=visible)
            if version.source_id
            else None
        )
        # Composed from the parts' serializers; OutputSerializer describes the whole.
        data: dict[str, Any] = dict(TrainingVersionSerializer(version).data)
        data["lineage"] = TrainingVersionRelativeSerializer(
            [relative(v) for v in selectors.version_ancestors(version=version)], many=True
        ).data
        data["children"] = TrainingVersionRelativeSerializer(
            [relative(v) for v in selectors.version_children(version=version)], many=True
        ).data
        data["snapshot"] = (
            TrainingSnapshotSerializer(version.run).data if version.run is not None else None
        )
        data["use"] = TrainingSourceUseSerializer(use).data if use is not None else None
        return Response(data)
