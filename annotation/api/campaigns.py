"""Campaigns and their members."""

from __future__ import annotations

from typing import Any, ClassVar

from django.db import transaction
from drf_spectacular.utils import (
    extend_schema,
)
from rest_framework import serializers, status
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from annotation import selectors
from annotation.api.base import (
    MAX_LIST_ITEMS,
    BaseApi,
    CampaignRole,
    CanCreateCampaigns,
    MethodRoutedApi,
    _caller,
)
from annotation.models import Campaign, CampaignStatus, CritiqueMode, Role
from annotation.services import campaigns as campaign_services

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
    agreement_fraction = serializers.FloatField(min_value=0, max_value=1, required=False)
    agreement_overlap = serializers.IntegerField(min_value=1, max_value=50, required=False)
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
    agreement_fraction = serializers.FloatField()
    agreement_overlap = serializers.IntegerField()
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
