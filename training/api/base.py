"""Shared machinery of the training API: access checks as permission classes, the
translation of the run services' errors, and the serializers several operations answer with.

The checks run as DRF permissions (before any handler, for every method, OPTIONS included),
so a caller without the role learns nothing, whatever they send: no role in the object's
campaign is a 404, another role a 403 (``training.access``, the HTML pages' rules).
"""

from __future__ import annotations

from typing import Any

from rest_framework import serializers, status
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response

from annotation.api.base import BaseApi
from training import access
from training.forms import split_service_error
from training.models import ModelVersion, Round, TrainingRun
from training.services import rounds
from training.services.runs import RunAlreadyActive, RunError

# What a refused setting can be called in a service's message.
SETTING_NAMES = (*rounds.ROUND_CONFIG_FIELDS, "min_new_judgments")


class TrainingApi(BaseApi):
    """Answers a refused configuration with 400 (``field`` names the first setting the
    message blames) and an already-active round or run with 409 ``{"detail": "skipped: ..."}``."""

    access_roles: tuple[str, ...] = access.VIEWERS
    run: TrainingRun
    round_obj: Round
    version: ModelVersion

    def handle_exception(self, exc: Exception) -> Response:
        if isinstance(exc, RunError):
            return Response(run_error_body(exc), status=run_error_status(exc))
        return super().handle_exception(exc)


def run_error_status(exc: RunError) -> int:
    if isinstance(exc, RunAlreadyActive) or str(exc).startswith("skipped:"):
        return status.HTTP_409_CONFLICT
    return status.HTTP_400_BAD_REQUEST


def run_error_body(exc: RunError) -> dict[str, Any]:
    message = str(exc)
    body: dict[str, Any] = {"detail": message}
    if run_error_status(exc) == status.HTTP_400_BAD_REQUEST:
        named = [name for name, _ in split_service_error(message, SETTING_NAMES) if name]
        if named:
            # Round settings travel inside the request's "config" object.
            first = named[0]
            body["field"] = f"config.{first}" if first in rounds.ROUND_CONFIG_FIELDS else first
    return body


class RunAccess(BasePermission):
    """The caller holds one of ``view.access_roles`` in the campaign of the run in the URL;
    the run is left on the view."""

    def has_permission(self, request: Request, view: Any) -> bool:
        view.run, view.caller_roles = access.run_for(
            user=request.user, run_id=view.kwargs["run_id"], roles=view.access_roles
        )
        return True


class RoundAccess(BasePermission):
    def has_permission(self, request: Request, view: Any) -> bool:
        view.round_obj, view.caller_roles = access.round_for(
            user=request.user, round_id=view.kwargs["round_id"], roles=view.access_roles
        )
        return True


class VersionAccess(BasePermission):
    def has_permission(self, request: Request, view: Any) -> bool:
        view.version, view.caller_roles = access.version_for(
            user=request.user, version_id=view.kwargs["version_id"]
        )
        return True


# -- serializers shared by several operations --------------------------------------------------


class TrainingRunSummarySerializer(serializers.Serializer):
    id = serializers.IntegerField()
    kind = serializers.CharField()
    status = serializers.CharField()
    campaign = serializers.CharField(source="campaign.slug")
    round = serializers.IntegerField(source="round_id", allow_null=True)
    progress = serializers.FloatField(help_text="0 to 1.")
    step = serializers.IntegerField()
    total_steps = serializers.IntegerField()
    attempts = serializers.IntegerField()
    max_attempts = serializers.IntegerField()
    worker = serializers.CharField()
    heartbeat_at = serializers.DateTimeField(allow_null=True)
    cancel_requested = serializers.BooleanField()
    error = serializers.CharField()
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)


class TrainingRoundSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    number = serializers.IntegerField()
    campaign = serializers.CharField(source="campaign.slug")
    status = serializers.CharField()
    stage = serializers.CharField()
    trigger = serializers.CharField()
    config = serializers.JSONField()
    judgment_cutoff = serializers.IntegerField(allow_null=True)
    new_judgments = serializers.IntegerField()
    policy_before = serializers.IntegerField(source="policy_before_id", allow_null=True)
    reward_version = serializers.IntegerField(source="reward_version_id", allow_null=True)
    policy_version = serializers.IntegerField(source="policy_version_id", allow_null=True)
    metrics = serializers.DictField(
        help_text="Evaluation figures: reward_accuracy, kl, win_rate, mean_reward, ..."
    )
    completions_created = serializers.IntegerField()
    comparisons_created = serializers.IntegerField()
    error = serializers.CharField()
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)


class TrainingVersionSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    kind = serializers.CharField()
    base_model = serializers.CharField()
    # "parent" and "source" are attributes of every DRF field as well: mypy sees the clash,
    # DRF's metaclass takes the declared fields out of the class before it matters.
    parent = serializers.IntegerField(  # type: ignore[assignment]
        source="parent_id", allow_null=True
    )
    artifact = serializers.CharField()
    metrics = serializers.DictField()
    run = serializers.IntegerField(source="run_id", allow_null=True)
    round = serializers.IntegerField(source="run.round_id", allow_null=True)
    campaign = serializers.CharField(
        source="run.campaign.slug", allow_null=True, help_text="Null for a base model."
    )
    source = serializers.CharField(  # type: ignore[assignment]
        source="source.name", allow_null=True, help_text="The annotation source of its outputs."
    )
    created_at = serializers.DateTimeField()
