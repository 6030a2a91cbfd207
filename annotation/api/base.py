"""Shared machinery of the REST API: role checks, error translation, the base classes."""

from __future__ import annotations

from typing import Any, ClassVar, cast

from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import (
    OpenApiParameter,
    extend_schema_serializer,
)
from rest_framework import serializers, status
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from annotation import permissions
from annotation.exceptions import AnnotationError, ImportRejected, InvalidJudgment
from annotation.models import Campaign

SIDE_CHOICES = ("left", "right", "tie", "both_bad")
ASPECT_ANSWERS = ("left", "right", "tie")
JSONL_MEDIA_TYPES = (
    "application/x-ndjson",
    "application/jsonl",
    "application/json-lines",
    "application/octet-stream",
    "text/plain",
)
MAX_LIST_ITEMS = 50


# -- shared machinery ---------------------------------------------------------------------------


class CampaignRole(BasePermission):
    """The caller holds one of ``view.campaign_roles`` in the campaign named by the URL.

    Resolves the campaign and the caller's roles in one query and leaves them on the view
    (``view.campaign``, ``view.caller_roles``), so the handler needs no second lookup.
    """

    def has_permission(self, request: Request, view: Any) -> bool:
        campaign, roles = permissions.campaign_and_roles_for(
            user=request.user, slug=view.kwargs["slug"], roles=view.campaign_roles
        )
        view.campaign = campaign
        view.caller_roles = roles
        return True


class CanCreateCampaigns(BasePermission):
    message = "You may not create campaigns."

    def has_permission(self, request: Request, view: Any) -> bool:
        return permissions.can_create_campaigns(request.user)


def _error_body(exc: AnnotationError) -> dict[str, Any]:
    body: dict[str, Any] = {"detail": exc.message}
    field = getattr(exc, "field", None)
    if field:
        body["field"] = field
    if isinstance(exc, ImportRejected):
        body["errors"] = exc.errors
    return body


IDEMPOTENCY_KEY_HEADER = OpenApiParameter(
    "Idempotency-Key",
    str,
    OpenApiParameter.HEADER,
    description="At most 64 characters; a repeat returns the first answer (200).",
)


def idempotency_key(request: Request, data: dict[str, Any]) -> str | None:
    """The submit's idempotency key: the ``Idempotency-Key`` header, else the body's
    ``idempotency_key``; ``InvalidJudgment`` (400 naming the field) unless 1 to 64 characters."""
    key = request.headers.get("Idempotency-Key") or data.get("idempotency_key")
    if key is not None and not 1 <= len(key) <= 64:
        raise InvalidJudgment(
            "The idempotency key must be 1 to 64 characters.", field="idempotency_key"
        )
    return key


class BaseApi(APIView):
    """Translates domain errors to HTTP; subclasses name the roles they need."""

    campaign_roles: tuple[str, ...] = ()
    # No OPTIONS metadata: it would describe the API to callers who may not use it.
    metadata_class = None
    campaign: Campaign
    caller_roles: set[str]

    def handle_exception(self, exc: Exception) -> Response:
        if isinstance(exc, AnnotationError):
            return Response(_error_body(exc), status=exc.status_code)
        if isinstance(exc, DjangoValidationError):
            # A model-level check the serializer did not mirror: same shape as DRF's errors.
            errors = exc.message_dict if hasattr(exc, "error_dict") else {"detail": exc.messages}
            return Response(errors, status=status.HTTP_400_BAD_REQUEST)
        return super().handle_exception(exc)


class MethodRoutedApi(BaseApi):
    """One URL, several operations: each operation class keeps its own permissions.

    The URL scheme puts list and create (or read and update) on one path; the operations stay
    separate classes and this picks the permission classes of the one the method names.
    """

    operations: ClassVar[dict[str, type[APIView]]] = {}

    def get_permissions(self) -> list[Any]:
        method = (self.request.method or "").lower()
        operation = self.operations.get("get" if method == "head" else method)
        if operation is not None:
            classes = list(operation.permission_classes)
            # CampaignRole reads the roles from the view: the operation's, not the first base's.
            self.campaign_roles = getattr(operation, "campaign_roles", ())
        else:
            # OPTIONS or an unsupported method: every operation's checks apply before the 405.
            classes = []
            for op in self.operations.values():
                classes += [c for c in op.permission_classes if c not in classes]
        return [permission() for permission in classes]


def _caller(request: Request) -> AbstractBaseUser:
    """The signed-in caller: every class that calls this requires authentication first."""
    return cast(AbstractBaseUser, request.user)


def name_nested_serializers() -> None:
    """Give each nested serializer an OpenAPI component name from its API class
    (``JudgmentSubmitInput``), since every class calls its own ``InputSerializer``."""
    seen: set[type] = set()
    stack = list(BaseApi.__subclasses__())
    while stack:
        api = stack.pop()
        stack.extend(api.__subclasses__())
        if api in seen:
            continue
        seen.add(api)
        for attr, value in vars(api).items():
            if isinstance(value, type) and issubclass(value, serializers.BaseSerializer):
                name = api.__name__.removesuffix("Api") + attr.removesuffix("Serializer")
                extend_schema_serializer(component_name=name)(value)
