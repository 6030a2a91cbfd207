"""Importing items and building comparisons."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiResponse,
    extend_schema,
)
from rest_framework import serializers, status
from rest_framework.parsers import BaseParser, MultiPartParser
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from annotation import formats
from annotation.api.base import (
    JSONL_MEDIA_TYPES,
    BaseApi,
    CampaignRole,
)
from annotation.models import Role
from annotation.services import imports as import_services
from annotation.services import items as item_services

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
