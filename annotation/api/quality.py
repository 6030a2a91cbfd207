"""The campaign quality report as JSON: ``GET /api/campaigns/<slug>/quality/``.

The same selector as the admin page (``annotation.reports.campaign_quality_report``), the same
numbers: agreement with bootstrap intervals, pairwise kappas, Dawid-Skene reliability, weight
and confusion per rater, bias figures and flags, the critique experiment's arms and uplifts.

Serializers are module-level with names of their own (``QualityReport...``), so they read as
themselves in the OpenAPI components.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from annotation import reports
from annotation.api.base import BaseApi, CampaignRole
from annotation.models import Role


def _interval() -> serializers.ListField:
    return serializers.ListField(
        child=serializers.FloatField(), min_length=2, max_length=2, allow_null=True
    )


class QualityAgreementSerializer(serializers.Serializer):
    n_ratings = serializers.IntegerField()
    n_items = serializers.IntegerField()
    n_raters = serializers.IntegerField()
    n_multi_rated = serializers.IntegerField(
        help_text="Comparisons with two or more judgments: the only ones agreement is measured on."
    )
    raw = serializers.FloatField(allow_null=True)
    raw_ci = _interval()
    alpha_nominal = serializers.FloatField(allow_null=True)
    alpha_nominal_ci = _interval()
    alpha_ordinal = serializers.FloatField(allow_null=True)
    alpha_ordinal_ci = _interval()
    confidence = serializers.FloatField()
    n_resamples = serializers.IntegerField()


class QualityKappaPairSerializer(serializers.Serializer):
    rater_id = serializers.IntegerField()
    username = serializers.CharField()
    other_id = serializers.IntegerField()
    other_username = serializers.CharField()
    kappa = serializers.FloatField(allow_null=True)
    n = serializers.IntegerField()


class QualityDawidSkeneSerializer(serializers.Serializer):
    classes = serializers.ListField(child=serializers.CharField())
    priors = serializers.DictField(child=serializers.FloatField())
    iterations = serializers.IntegerField()
    converged = serializers.BooleanField()


class QualityRaterStatsSerializer(serializers.Serializer):
    n = serializers.IntegerField()
    decisive_n = serializers.IntegerField()
    left_rate = serializers.FloatField(allow_null=True)
    left_p = serializers.FloatField()
    longer_n = serializers.IntegerField()
    longer_rate = serializers.FloatField(allow_null=True)
    longer_p = serializers.FloatField()
    tie_rate = serializers.FloatField(allow_null=True)
    both_bad_rate = serializers.FloatField(allow_null=True)
    timed_n = serializers.IntegerField()
    median_decision_ms = serializers.FloatField(allow_null=True)
    gold_n = serializers.IntegerField()
    gold_accuracy = serializers.FloatField(allow_null=True)


class QualityRaterSerializer(serializers.Serializer):
    rater_id = serializers.IntegerField()
    username = serializers.CharField()
    stats = QualityRaterStatsSerializer()
    reliability = serializers.FloatField(allow_null=True)
    weight = serializers.FloatField(allow_null=True)
    confusion = serializers.DictField(
        child=serializers.DictField(child=serializers.FloatField()),
        allow_null=True,
        help_text="confusion[true answer][rater's answer] = P(rater's answer | true answer).",
    )
    flags = serializers.ListField(child=serializers.CharField())
    suspicious = serializers.BooleanField()


class QualityUpliftSerializer(serializers.Serializer):
    treated_mean = serializers.FloatField(help_text="Critique shown.")
    control_mean = serializers.FloatField(help_text="Critique hidden.")
    difference = serializers.FloatField()
    low = serializers.FloatField()
    high = serializers.FloatField()
    n_treated = serializers.IntegerField()
    n_control = serializers.IntegerField()


class QualityCritiqueArmSerializer(serializers.Serializer):
    shown = serializers.BooleanField()
    n = serializers.IntegerField()
    gold_n = serializers.IntegerField()
    gold_accuracy = serializers.FloatField(allow_null=True)
    planted_n = serializers.IntegerField(help_text="Gold items with a planted error.")
    planted_accuracy = serializers.FloatField(allow_null=True)
    timed_n = serializers.IntegerField()
    median_decision_ms = serializers.FloatField(allow_null=True)
    agreement = serializers.FloatField(allow_null=True)
    agreement_items = serializers.IntegerField()


class QualityCritiqueSerializer(serializers.Serializer):
    shown = QualityCritiqueArmSerializer()
    hidden = QualityCritiqueArmSerializer()
    gold_uplift = QualityUpliftSerializer(allow_null=True)
    planted_uplift = QualityUpliftSerializer(allow_null=True)
    time_uplift = QualityUpliftSerializer(allow_null=True)


class QualityRoundAgreementSerializer(serializers.Serializer):
    round_number = serializers.IntegerField(
        help_text="The loop round that generated the comparisons' completions; 0: imported."
    )
    agreement = QualityAgreementSerializer()


class QualityCriticPrecisionSerializer(serializers.Serializer):
    critic = serializers.CharField()
    verdicts = serializers.IntegerField()
    valid = serializers.IntegerField()
    precision = serializers.FloatField(allow_null=True)


class QualityReportSerializer(serializers.Serializer):
    since = serializers.DateTimeField(allow_null=True)
    until = serializers.DateTimeField(allow_null=True)
    n_judgments = serializers.IntegerField()
    n_comparisons = serializers.IntegerField()
    n_judged_comparisons = serializers.IntegerField()
    n_raters = serializers.IntegerField()
    n_gold_judgments = serializers.IntegerField()
    n_suspicious = serializers.IntegerField()
    agreement = QualityAgreementSerializer()
    by_round = QualityRoundAgreementSerializer(
        many=True, help_text="Agreement per loop round; empty while there is only one round."
    )
    kappas = QualityKappaPairSerializer(many=True)
    dawid_skene = QualityDawidSkeneSerializer(allow_null=True)
    raters = QualityRaterSerializer(many=True)
    overall = QualityRaterStatsSerializer()
    critique = QualityCritiqueSerializer(
        allow_null=True,
        help_text="Null unless the campaign runs the critique experiment or has judgments "
        "with and without critiques.",
    )
    critique_precision = QualityCriticPrecisionSerializer(
        many=True,
        help_text="Per critic: the share of raters' verdicts that called its critiques valid.",
    )
    n_resamples = serializers.IntegerField()
    seed = serializers.IntegerField()


class QualityQuerySerializer(serializers.Serializer):
    since = serializers.DateTimeField(
        required=False, help_text="Only judgments created at or after this time."
    )
    until = serializers.DateTimeField(
        required=False, help_text="Only judgments created before this time."
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        since: datetime | None = attrs.get("since")
        until: datetime | None = attrs.get("until")
        if since is not None and until is not None and until <= since:
            raise serializers.ValidationError({"until": "must be later than since"})
        return attrs


class CampaignQualityApi(BaseApi):
    """Quality report of a campaign (its admins): agreement, rater reliability and bias, the
    critique experiment. ``?since=`` / ``?until=`` (ISO 8601) narrow it to the judgments made
    in between. Computed on each request: one pass over the judgments."""

    permission_classes = (IsAuthenticated, CampaignRole)
    campaign_roles = (Role.ADMIN,)

    @extend_schema(parameters=[QualityQuerySerializer], responses={200: QualityReportSerializer})
    def get(self, request: Request, slug: str) -> Response:
        query = QualityQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        report = reports.campaign_quality_report(
            campaign=self.campaign,
            since=query.validated_data.get("since"),
            until=query.validated_data.get("until"),
        )
        return Response(QualityReportSerializer(report).data)
