"""API tokens: exchange a password for a token, revoke it."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import authenticate
from drf_spectacular.utils import (
    OpenApiResponse,
    extend_schema,
)
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import ScopedRateThrottle

from annotation.api.base import (
    BaseApi,
    MethodRoutedApi,
    _caller,
)
from annotation.services import tokens as token_services

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
