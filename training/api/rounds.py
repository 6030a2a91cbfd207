"""Rounds of the loop: list and start them per campaign, read and cancel one, and the
campaign's loop schedule."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from annotation.api.base import CampaignRole, MethodRoutedApi, _caller
from training import access, selectors, tasks
from training.api.base import (
    RoundAccess,
    TrainingApi,
    TrainingRoundSerializer,
    TrainingRunSummarySerializer,
)
from training.services import rounds as round_services

CONFIG_HELP = (
    "Round settings by name (algorithm, kl_coef, policy_steps, lora, strategy, ...); "
    "unset ones take their defaults, unknown or mistyped ones are refused by name."
)


class RoundListApi(TrainingApi):
    """The campaign's rounds, newest first (its admins and ML staff)."""

    permission_classes = (IsAuthenticated, CampaignRole)
    campaign_roles = access.VIEWERS

    @extend_schema(responses={200: TrainingRoundSerializer(many=True)})
    def get(self, request: Request, slug: str) -> Response:
        rounds = selectors.rounds_list(
            campaign_ids=[self.campaign.pk], campaign_id=self.campaign.pk
        )
        return Response(TrainingRoundSerializer(rounds, many=True).data)


class RoundCreateApi(TrainingApi):
    """Start a round (ML staff). A round still queued or running for the campaign makes this
    one skipped: 409 with ``{"detail": "skipped: ..."}``, nothing queued."""

    permission_classes = (IsAuthenticated, CampaignRole)
    campaign_roles = access.OPERATORS

    class InputSerializer(serializers.Serializer):
        config = serializers.DictField(required=False, default=dict, help_text=CONFIG_HELP)

    @extend_schema(
        request=InputSerializer,
        responses={
            201: TrainingRoundSerializer,
            400: OpenApiResponse(description="A setting was refused; ``field`` names it."),
            409: OpenApiResponse(description="Skipped: a round of this campaign is active."),
        },
    )
    def post(self, request: Request, slug: str) -> Response:
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        round_obj = round_services.round_create(
            campaign=self.campaign,
            config=dict(serializer.validated_data["config"]),
            created_by=_caller(request),
            enqueue=tasks.enqueue_round,
        )
        return Response(TrainingRoundSerializer(round_obj).data, status=status.HTTP_201_CREATED)


class RoundsApi(MethodRoutedApi, RoundListApi, RoundCreateApi):  # type: ignore[misc]
    operations = {"get": RoundListApi, "post": RoundCreateApi}


class RoundDetailApi(TrainingApi):
    """One round with its stage and the runs that did each stage."""

    permission_classes = (IsAuthenticated, RoundAccess)

    class OutputSerializer(TrainingRoundSerializer):
        runs = TrainingRunSummarySerializer(many=True)

    @extend_schema(responses={200: OutputSerializer})
    def get(self, request: Request, round_id: int) -> Response:
        round_obj = self.round_obj
        data: dict[str, Any] = dict(TrainingRoundSerializer(round_obj).data)
        data["runs"] = TrainingRunSummarySerializer(
            selectors.round_runs(round_obj=round_obj), many=True
        ).data
        return Response(data)


class RoundCancelApi(TrainingApi):
    """Cancel a round (ML staff): its active run is cancelled and no further stage starts."""

    permission_classes = (IsAuthenticated, RoundAccess)
    access_roles = access.OPERATORS

    @extend_schema(request=None, responses={200: TrainingRoundSerializer})
    def post(self, request: Request, round_id: int) -> Response:
        round_obj = self.round_obj
        if not round_obj.is_terminal:
            round_obj = round_services.round_cancel(round_obj=round_obj)
        return Response(TrainingRoundSerializer(round_obj).data)


class TrainingScheduleSerializer(serializers.Serializer):
    enabled = serializers.BooleanField()
    min_new_judgments = serializers.IntegerField(min_value=1, max_value=10_000_000)
    config = serializers.DictField(help_text=CONFIG_HELP)


class TrainingScheduleOutputSerializer(TrainingScheduleSerializer):
    exists = serializers.BooleanField(help_text="False: no schedule saved, these are defaults.")
    last_checked_at = serializers.DateTimeField(allow_null=True)
    last_message = serializers.CharField()


def _schedule_data(campaign: Any) -> dict[str, Any]:
    schedule = selectors.schedule_get(campaign=campaign)
    if schedule is None:
        return {
            "exists": False,
            "enabled": False,
            "min_new_judgments": 200,
            "config": {},
            "last_checked_at": None,
            "last_message": "",
        }
    return {
        "exists": True,
        "enabled": schedule.enabled,
        "min_new_judgments": schedule.min_new_judgments,
        "config": schedule.config,
        "last_checked_at": schedule.last_checked_at,
        "last_message": schedule.last_message,
    }


class ScheduleGetApi(TrainingApi):
    """The campaign's loop schedule (its admins and ML staff)."""

    permission_classes = (IsAuthenticated, CampaignRole)
    campaign_roles = access.VIEWERS

    @extend_schema(responses={200: TrainingScheduleOutputSerializer})
    def get(self, request: Request, slug: str) -> Response:
        return Response(TrainingScheduleOutputSerializer(_schedule_data(self.campaign)).data)


class ScheduleSetApi(TrainingApi):
    """Set the loop schedule (ML staff): start a round with ``config`` once the campaign has
    ``min_new_judgments`` judgments since its last round."""

    permission_classes = (IsAuthenticated, CampaignRole)
    campaign_roles = access.OPERATORS

    @extend_schema(
        request=TrainingScheduleSerializer,
        responses={
            200: TrainingScheduleOutputSerializer,
            400: OpenApiResponse(description="A setting was refused; ``field`` names it."),
        },
    )
    def put(self, request: Request, slug: str) -> Response:
        serializer = TrainingScheduleSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        round_services.schedule_set(
            campaign=self.campaign,
            enabled=data["enabled"],
            min_new_judgments=data["min_new_judgments"],
            config=dict(data["config"]),
        )
        return Response(TrainingScheduleOutputSerializer(_schedule_data(self.campaign)).data)


class ScheduleApi(MethodRoutedApi, ScheduleGetApi, ScheduleSetApi):  # type: ignore[misc]
    operations = {"get": ScheduleGetApi, "put": ScheduleSetApi}
