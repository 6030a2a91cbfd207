"""API token authentication for the rater's hot path.

DRF's ``TokenAuthentication`` loads the token with its whole user row (password hash, names,
dates) on every request. The API needs the user's id, whether they are active, and the flags
the permission checks read; loading only those makes the query cheaper for the ORM to build
and to turn into objects. Any other field still loads on first use (one more query), so
nothing that reads the user breaks. No caching: a revoked token (or a deactivated user) stops
working on the very next request.
"""

from __future__ import annotations

from typing import Any

from django.utils.translation import gettext_lazy as _
from rest_framework import authentication, exceptions
from rest_framework.authtoken.models import Token

# What request handling reads: id and is_active here; is_superuser / is_staff in the
# permission checks; username in logs and error pages.
USER_FIELDS = ("id", "is_active", "is_superuser", "is_staff", "username")


class TokenAuthentication(authentication.TokenAuthentication):
    """``Authorization: Token <key>``, reading only the user columns a request needs."""

    def authenticate_credentials(self, key: str) -> tuple[Any, Any]:
        try:
            token = (
                Token.objects.select_related("user")
                .only("key", "user_id", *(f"user__{field}" for field in USER_FIELDS))
                .get(key=key)
            )
        except Token.DoesNotExist:
            raise exceptions.AuthenticationFailed(_("Invalid token.")) from None
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed(_("User inactive or deleted."))
        return (token.user, token)
