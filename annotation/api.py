"""The REST API: one DRF class per operation, thin.

Each class parses input with its nested ``InputSerializer`` (an explicit allowlist: the server
sets rater, campaign, gold answers and timestamps), calls one service or selector, and formats
the result with its ``OutputSerializer``. Domain errors from ``annotation.exceptions`` become
HTTP answers that name the field.

Roles: the campaign in the URL is resolved together with the caller's roles in one query
(``CampaignRole``); a campaign where the caller has no role does not exist for them (404), one
where they hold another role is forbidden (403). The HTML views use the same rules
(``annotation.permissions``).

Authentication: ``Authorization: Token <key>`` for machines (no CSRF: a browser never sends
that header by itself), the session for the browser (CSRF enforced by DRF's
``SessionAuthentication`` on every unsafe method).

Raters speak in the terms they see: ``left`` / ``right`` / ``tie`` / ``both_bad``. The server
maps left / right to the canonical a / b with the slot's layout; a rater never learns which
completion is A, nor any model name or source.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, ClassVar, cast

from django.conf import settings
from django.contrib.auth import authenticate
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_serializer,
)
from rest_framework import serializers, status
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import BaseParser, MultiPartParser
from rest_framework.permissions import AllowAny, BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import ScopedRateThrottle
from rest_framework.views import APIView

from annotation import formats, permissions, reports, selectors, selectors_rankings
from annotation.exceptions import AnnotationError, ImportRejected, InvalidJudgment
from annotation.formats.export import RANKING_FORMATS, WEIGHTED_FORMATS
from annotation.models import Campaign, CampaignStatus, CritiqueMode, Judgment, Role, Split
from annotation.services import campaigns as campaign_services
from annotation.services import imports as import_services
from annotation.services import items as item_services
from annotation.services import judgments as judgment_services
from annotation.services import tokens as token_services

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


# -- auth ---------------------------------------------------------------------------------------


class AuthTokenCreateApi(BaseApi):
    """Exchange a username and password for an API token.

    Throttled per client (scope ``login``) and guarded by django-axes: repeated failures lock
    the username out (429) whatever the throttle says, because a throttle is no lockout.
    """

    permission_classes = (AllowAny,)
    throttle_classes = (ScopedRateThrottle,)
    throttle_scope = "login"

    class InputSerializer(serializers.Serializer):
        username = serializers.CharField(max_length=150)
        password = serializers.CharField(max_length=4096, trim_whitespace=False)

    class OutputSerializer(serializers.Serializer):
        token = serializers.CharField()

    @extend_schema(
        request=InputSerializer,
        responses={
            200: OutputSerializer,
            400: OpenApiResponse(description="Wrong username or password."),
            429: OpenApiResponse(description="Throttled, or locked out after failed logins."),
        },
        auth=[],
    )
    def post(self, request: Request) -> Response:
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        # axes needs the Django request: it marks it locked out, and its middleware answers.
        django_request = request._request
        user = authenticate(
            request=django_request,
            username=serializer.validated_data["username"],
            password=serializer.validated_data["password"],
        )
        if user is None:
            if getattr(django_request, "axes_locked_out", False):
                return Response(
                    {"detail": "Too many failed logins; try again later."},
                    status=status.HTTP_429_TOO_MANY_REQUESTS,
                )
            return Response(
                {"detail": "Wrong username or password."}, status=status.HTTP_400_BAD_REQUEST
            )
        token = token_services.token_issue(user=user)
        response = Response(self.OutputSerializer({"token": token.key}).data)
        response["Cache-Control"] = "no-store"
        return response


class AuthTokenDeleteApi(BaseApi):
    """Revoke the caller's API token (every script using it stops working)."""

    permission_classes = (IsAuthenticated,)

    @extend_schema(request=None, responses={204: None})
    def delete(self, request: Request) -> Response:
        token_services.token_revoke(user=_caller(request))
        return Response(status=status.HTTP_204_NO_CONTENT)


# The bases' permission_classes differ on purpose: get_permissions picks by method.
class AuthTokenApi(MethodRoutedApi, AuthTokenCreateApi, AuthTokenDeleteApi):  # type: ignore[misc]
    operations = {"post": AuthTokenCreateApi, "delete": AuthTokenDeleteApi}

    def get_throttles(self) -> list[Any]:
        return super().get_throttles() if self.request.method == "POST" else []


# -- campaigns ----------------------------------------------------------------------------------


class CampaignFieldsSerializer(serializers.Serializer):
    """The editable settings of a campaign; mirrors the model's constraints so bad values are
    answered with the field named."""

    name = serializers.CharField(max_length=200)
    description = serializers.CharField(allow_blank=True, required=False, max_length=20_000)
    guidelines = serializers.CharField(
        allow_blank=True, required=False, max_length=100_000, trim_whitespace=False
    )
    overlap = serializers.IntegerField(min_value=1, max_value=50, required=False)
    lease_seconds = serializers.IntegerField(min_value=10, max_value=7 * 24 * 3600, required=False)
    strength_scale = serializers.IntegerField(min_value=0, max_value=10, required=False)
    aspects = serializers.ListField(
        child=serializers.CharField(max_length=60), max_length=MAX_LIST_ITEMS, required=False
    )
    reason_tags = serializers.ListField(
        child=serializers.CharField(max_length=60), max_length=MAX_LIST_ITEMS, required=False
    )
    flag_options = serializers.ListField(
        child=serializers.CharField(max_length=60), max_length=MAX_LIST_ITEMS, required=False
    )
    allow_tie = serializers.BooleanField(required=False)
    allow_both_bad = serializers.BooleanField(required=False)
    require_rationale = serializers.BooleanField(required=False)
    critique_mode = serializers.ChoiceField(choices=CritiqueMode.choices, required=False)
    critique_fraction = serializers.FloatField(min_value=0, max_value=1, required=False)
    gold_fraction = serializers.FloatField(min_value=0, max_value=1, required=False)
    gold_overlap = serializers.IntegerField(min_value=1, max_value=50, required=False)
    screening_items = serializers.IntegerField(min_value=0, max_value=100, required=False)
    screening_min_accuracy = serializers.FloatField(min_value=0, max_value=1, required=False)


class CampaignDetailOutputSerializer(serializers.Serializer):
    slug = serializers.CharField()
    name = serializers.CharField()
    description = serializers.CharField()
    guidelines = serializers.CharField()
    guidelines_version = serializers.IntegerField()
    status = serializers.CharField()
    overlap = serializers.IntegerField()
    lease_seconds = serializers.IntegerField()
    strength_scale = serializers.IntegerField()
    aspects = serializers.ListField(child=serializers.CharField())
    reason_tags = serializers.ListField(child=serializers.CharField())
    flag_options = serializers.ListField(child=serializers.CharField())
    allow_tie = serializers.BooleanField()
    allow_both_bad = serializers.BooleanField()
    require_rationale = serializers.BooleanField()
    critique_mode = serializers.CharField()
    critique_fraction = serializers.FloatField()
    gold_fraction = serializers.FloatField()
    gold_overlap = serializers.IntegerField()
    screening_items = serializers.IntegerField()
    screening_min_accuracy = serializers.FloatField()
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()


class CampaignListApi(BaseApi):
    """The caller's campaigns, each with the caller's roles in it."""

    permission_classes = (IsAuthenticated,)
    # Explicit allowlists: query parameters never reach the ORM as field paths.
    ORDERINGS: ClassVar[dict[str, tuple[str, bool]]] = {
        "name": ("name", False),
        "-name": ("name", True),
        "created_at": ("created_at", False),
        "-created_at": ("created_at", True),
    }

    class FilterSerializer(serializers.Serializer):
        status = serializers.ChoiceField(choices=CampaignStatus.choices, required=False)
        role = serializers.ChoiceField(choices=Role.choices, required=False)
        ordering = serializers.ChoiceField(
            choices=["name", "-name", "created_at", "-created_at"], required=False
        )

    class OutputSerializer(serializers.Serializer):
        slug = serializers.CharField()
        name = serializers.CharField()
        description = serializers.CharField()
        status = serializers.CharField()
        guidelines = serializers.CharField()
        guidelines_version = serializers.IntegerField()
        roles = serializers.ListField(child=serializers.CharField())

    @extend_schema(parameters=[FilterSerializer], responses={200: OutputSerializer(many=True)})
    def get(self, request: Request) -> Response:
        filters = self.FilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        wanted_status = filters.validated_data.get("status")
        wanted_role = filters.validated_data.get("role")
        rows = [
            {**_campaign_summary(campaign), "roles": sorted(roles)}
            for campaign, roles in selectors.campaigns_with_roles(user=request.user)
            if (wanted_status is None or campaign.status == wanted_status)
            and (wanted_role is None or wanted_role in roles)
        ]
        ordering = filters.validated_data.get("ordering")
        if ordering:
            key, reverse = self.ORDERINGS[ordering]
            rows.sort(key=lambda row: row[key], reverse=reverse)
        return Response(self.OutputSerializer(rows, many=True).data)


def _campaign_summary(campaign: Campaign) -> dict[str, Any]:
    return {
        "slug": campaign.slug,
        "name": campaign.name,
        "description": campaign.description,
        "status": campaign.status,
        "guidelines": campaign.guidelines,
        "guidelines_version": campaign.guidelines_version,
        "created_at": campaign.created_at,
    }


class CampaignCreateApi(BaseApi):
    """Create a campaign (in draft); the caller becomes its admin. Needs the
    ``annotation.add_campaign`` permission."""

    permission_classes = (IsAuthenticated, CanCreateCampaigns)

    class InputSerializer(CampaignFieldsSerializer):
        slug = serializers.SlugField(max_length=80)

        def validate_slug(self, value: str) -> str:
            # Checked here to name the field; the service re-checks under its transaction.
            if Campaign.objects.filter(slug=value).exists():
                raise serializers.ValidationError("A campaign with this slug already exists.")
            return value

    @extend_schema(request=InputSerializer, responses={201: CampaignDetailOutputSerializer})
    def post(self, request: Request) -> Response:
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        campaign = campaign_services.campaign_create(
            creator=_caller(request), **serializer.validated_data
        )
        return Response(
            CampaignDetailOutputSerializer(campaign).data, status=status.HTTP_201_CREATED
        )


class CampaignsApi(MethodRoutedApi, CampaignListApi, CampaignCreateApi):  # type: ignore[misc]
    operations = {"get": CampaignListApi, "post": CampaignCreateApi}


class CampaignGetApi(BaseApi):
    """A campaign's settings (its admins)."""

    permission_classes = (IsAuthenticated, CampaignRole)
    campaign_roles = (Role.ADMIN,)

    @extend_schema(responses={200: CampaignDetailOutputSerializer})
    def get(self, request: Request, slug: str) -> Response:
        return Response(CampaignDetailOutputSerializer(self.campaign).data)


class CampaignUpdateApi(BaseApi):
    """Edit a campaign's settings and/or move its status (draft -> active <-> paused ->
    archived). All or nothing. Changing the guidelines bumps their version."""

    permission_classes = (IsAuthenticated, CampaignRole)
    campaign_roles = (Role.ADMIN,)

    class InputSerializer(CampaignFieldsSerializer):
        name = serializers.CharField(max_length=200, required=False)
        status = serializers.ChoiceField(choices=CampaignStatus.choices, required=False)

    @extend_schema(request=InputSerializer, responses={200: CampaignDetailOutputSerializer})
    def patch(self, request: Request, slug: str) -> Response:
        serializer = self.InputSerializer(data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        fields = dict(serializer.validated_data)
        new_status = fields.pop("status", None)
        campaign = self.campaign
        with transaction.atomic():
            if fields:
                campaign = campaign_services.campaign_update(campaign=campaign, **fields)
            if new_status is not None and new_status != campaign.status:
                campaign = campaign_services.campaign_set_status(
                    campaign=campaign, status=new_status
                )
        return Response(CampaignDetailOutputSerializer(campaign).data)


class CampaignDetailApi(MethodRoutedApi, CampaignGetApi, CampaignUpdateApi):
    operations = {"get": CampaignGetApi, "patch": CampaignUpdateApi}


class MembershipAddApi(BaseApi):
    """Give a user a role in the campaign (its admins). Adding a role held already is a no-op."""

    permission_classes = (IsAuthenticated, CampaignRole)
    campaign_roles = (Role.ADMIN,)

    class InputSerializer(serializers.Serializer):
        username = serializers.CharField(max_length=150)
        role = serializers.ChoiceField(choices=Role.choices)

    class OutputSerializer(serializers.Serializer):
        username = serializers.CharField()
        role = serializers.CharField()

    @extend_schema(request=InputSerializer, responses={201: OutputSerializer})
    def post(self, request: Request, slug: str) -> Response:
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        user = selectors.user_by_username(username=serializer.validated_data["username"])
        if user is None:
            return Response(
                {"detail": "No active user has this username.", "field": "username"},
                status=status.HTTP_400_BAD_REQUEST,
            )
        role = serializer.validated_data["role"]
        campaign_services.membership_add(campaign=self.campaign, user=user, role=role)
        return Response(
            self.OutputSerializer({"username": user.get_username(), "role": role}).data,
            status=status.HTTP_201_CREATED,
        )


# -- items --------------------------------------------------------------------------------------


class JsonLinesParser(BaseParser):
    """Declares the raw JSONL body for content negotiation and the schema; the import reads
    the request stream itself, line by line, so the body is never held in memory."""

    media_type = "application/x-ndjson"

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        return stream


class CampaignImportApi(BaseApi):
    """Import JSONL into a campaign: ``?kind=prompts|candidates|pairs``. The body is the JSONL
    itself (``Content-Type: application/x-ndjson``) or a multipart upload in field ``file``.
    All or nothing: a bad line rejects the whole file with errors naming line and field."""

    permission_classes = (IsAuthenticated, CampaignRole)
    campaign_roles = (Role.ADMIN,)
    parser_classes = (JsonLinesParser, MultiPartParser)

    class QuerySerializer(serializers.Serializer):
        kind = serializers.ChoiceField(choices=formats.KINDS)
        # How candidates become comparisons, in the same transaction.
        strategy = serializers.ChoiceField(
            choices=item_services.PairingStrategy.CHOICES,
            default=item_services.PairingStrategy.ALL_PAIRS,
        )
        k = serializers.IntegerField(min_value=1, max_value=1000, default=1)
        seed = serializers.IntegerField(required=False)
        default_source = serializers.CharField(
            max_length=formats.MAX_NAME_CHARS,
            required=False,
            help_text="Source of completions that name none (never shown to raters).",
        )

    class OutputSerializer(serializers.Serializer):
        prompts = serializers.IntegerField()
        completions = serializers.IntegerField()
        comparisons = serializers.IntegerField()
        critiques = serializers.IntegerField()

    @extend_schema(
        parameters=[QuerySerializer],
        request={
            "application/x-ndjson": OpenApiTypes.BINARY,
            "multipart/form-data": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            },
        },
        responses={
            201: OutputSerializer,
            400: OpenApiResponse(
                description="Rejected: ``errors`` lists ``{line, field, error}``; nothing saved."
            ),
            413: OpenApiResponse(description="Larger than IMPORT_MAX_BYTES."),
        },
    )
    def post(self, request: Request, slug: str) -> Response:
        query = self.QuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        length = request.META.get("CONTENT_LENGTH") or "0"
        if length.isdigit() and int(length) > settings.IMPORT_MAX_BYTES:
            return self._too_large()
        media_type = (request.content_type or "").split(";")[0].strip().lower()
        if media_type == "multipart/form-data":
            upload = request.FILES.get("file")
            # annotation.uploads.CappedUploadHandler drops a file past the cap while it arrives
            # (a chunked body has no Content-Length to refuse it by).
            if getattr(request._request, "upload_too_large", False):
                return self._too_large()
            if upload is None:
                return Response(
                    {"detail": "Upload the JSONL in the multipart field 'file'.", "field": "file"},
                    status=status.HTTP_400_BAD_REQUEST,
                )
            stream: Any = upload
        elif media_type in JSONL_MEDIA_TYPES:
            # The Django request is a file-like object over the body; nothing is buffered.
            stream = request._request
        else:
            return Response(
                {"detail": "Send application/x-ndjson or a multipart upload in field 'file'."},
                status=status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            )
        options = query.validated_data
        report = import_services.import_jsonl(
            campaign=self.campaign,
            stream=stream,
            kind=options["kind"],
            source_name_default=options.get("default_source", "imported"),
            strategy=options["strategy"],
            k=options["k"],
            seed=options.get("seed"),
        )
        return Response(self.OutputSerializer(report).data, status=status.HTTP_201_CREATED)

    @staticmethod
    def _too_large() -> Response:
        return Response(
            {"detail": f"The upload is larger than {settings.IMPORT_MAX_BYTES} bytes."},
            status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
        )


class ComparisonsBuildApi(BaseApi):
    """Build comparisons from each prompt's candidates: ``all_pairs`` or ``random_k`` (k
    random pairs per prompt). Existing pairs are skipped, so building twice is harmless."""

    permission_classes = (IsAuthenticated, CampaignRole)
    campaign_roles = (Role.ADMIN,)

    class InputSerializer(serializers.Serializer):
        strategy = serializers.ChoiceField(
            choices=item_services.PairingStrategy.CHOICES,
            default=item_services.PairingStrategy.ALL_PAIRS,
        )
        k = serializers.IntegerField(min_value=1, max_value=1000, default=1)
        seed = serializers.IntegerField(required=False, allow_null=True)

    class OutputSerializer(serializers.Serializer):
        created = serializers.IntegerField()

    @extend_schema(request=InputSerializer, responses={200: OutputSerializer})
    def post(self, request: Request, slug: str) -> Response:
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        created = item_services.comparisons_build(
            campaign=self.campaign, **serializer.validated_data
        )
        return Response(self.OutputSerializer({"created": created}).data)


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


def _name_nested_serializers() -> None:
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


_name_nested_serializers()
