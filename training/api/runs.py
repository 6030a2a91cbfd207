"""Training runs: the list, one run, its metrics (for live plots), and cancelling it."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_field
from rest_framework import serializers
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from training import access, selectors
from training.api.base import RunAccess, TrainingApi, TrainingRunSummarySerializer
from training.models import RunKind, RunStatus, TrainingRun
from training.services import runs as run_services

# {name: [[step, value], ...]}, written as a raw schema: a top-level dict of pairs has no
# serializer to describe it.
METRICS_SCHEMA = {
    "type": "object",
    "additionalProperties": {
        "type": "array",
        "items": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
    },
}


class RunListApi(TrainingApi):
    """Runs of the caller's campaigns (where they are an admin or ML staff), newest first."""

    permission_classes = (IsAuthenticated,)

    class FilterSerializer(serializers.Serializer):
        campaign = serializers.SlugField(required=False, help_text="A campaign's slug.")
        kind = serializers.ChoiceField(choices=RunKind.choices, required=False)
        status = serializers.ChoiceField(choices=RunStatus.choices, required=False)
        round = serializers.IntegerField(min_value=1, required=False, help_text="A round's id.")
        limit = serializers.IntegerField(
            min_value=1, max_value=selectors.RUN_LIST_LIMIT, default=50, required=False
        )

    @extend_schema(
        parameters=[FilterSerializer], responses={200: TrainingRunSummarySerializer(many=True)}
    )
    def get(self, request: Request) -> Response:
        filters = self.FilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        wanted = filters.validated_data
        campaigns = access.training_campaigns(user=request.user)
        ids = [campaign.pk for campaign, _ in campaigns]
        campaign_id = None
        if "campaign" in wanted:
            # A campaign the caller cannot see filters to nothing rather than saying it exists.
            found = [c.pk for c, _ in campaigns if c.slug == wanted["campaign"]]
            campaign_id = found[0] if found else -1
        runs = selectors.runs_list(
            campaign_ids=ids,
            campaign_id=campaign_id,
            kind=wanted.get("kind"),
            status=wanted.get("status"),
            round_id=wanted.get("round"),
            limit=wanted.get("limit", 50),
        )
        return Response(TrainingRunSummarySerializer(runs, many=True).data)


class RunDetailApi(TrainingApi):
    """One run: state, progress, heartbeat, the dataset snapshot it learned from, its
    configuration, the versions it registered and its log tail."""

    permission_classes = (IsAuthenticated, RunAccess)

    class OutputSerializer(TrainingRunSummarySerializer):
        config = serializers.JSONField()
        judgment_cutoff = serializers.IntegerField(allow_null=True)
        dataset_sha256 = serializers.CharField()
        dataset_pairs = serializers.IntegerField()
        input_version = serializers.IntegerField(source="input_version_id", allow_null=True)
        created_by = serializers.CharField(source="created_by.username", allow_null=True)
        model_versions = serializers.SerializerMethodField(
            help_text="Ids of the versions it registered."
        )
        log_tail = serializers.CharField()
        results = serializers.DictField(help_text="The run's final figures, once it succeeded.")
        output_dir = serializers.CharField()

        @extend_schema_field(serializers.ListField(child=serializers.IntegerField()))
        def get_model_versions(self, run: TrainingRun) -> list[int]:
            return [version.pk for version in selectors.run_versions(run=run)]

    @extend_schema(responses={200: OutputSerializer})
    def get(self, request: Request, run_id: int) -> Response:
        return Response(self.OutputSerializer(self.run).data)


class RunMetricsApi(TrainingApi):
    """A run's metrics as ``{name: [[step, value], ...]}``, steps ascending. Poll with
    ``?since=<last step seen>`` to get only what is new."""

    permission_classes = (IsAuthenticated, RunAccess)

    class QuerySerializer(serializers.Serializer):
        since = serializers.IntegerField(
            min_value=0, required=False, help_text="Only steps after this one."
        )

    @extend_schema(
        parameters=[QuerySerializer],
        responses={
            200: OpenApiResponse(
                METRICS_SCHEMA,
                description="Metric name -> [[step, value], ...].",
            )
        },
    )
    def get(self, request: Request, run_id: int) -> Response:
        query = self.QuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        series = selectors.metric_series(
            run_ids=[self.run.pk], since=query.validated_data.get("since")
        )[self.run.pk]
        return Response({name: [[s, v] for s, v in points] for name, points in series.items()})


class RunCancelApi(TrainingApi):
    """Cancel a run (ML staff): a queued run ends at once, a running one stops at its next
    step or batch (``cancel_requested`` until the worker marks it cancelled)."""

    permission_classes = (IsAuthenticated, RunAccess)
    access_roles = access.OPERATORS

    @extend_schema(request=None, responses={200: TrainingRunSummarySerializer})
    def post(self, request: Request, run_id: int) -> Response:
        run = self.run if self.run.is_terminal else run_services.run_cancel(run=self.run)
        return Response(TrainingRunSummarySerializer(run).data)
