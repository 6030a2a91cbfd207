"""API token authentication for the rater's hot path.

DRF's ``TokenAuthentication`` loads the token with its whole user row (password hash, names,
dates) through the ORM on every request. The API needs the user's id, whether they are active,
and the flags the permission checks read: one fixed SQL statement reads just those, and
building it once instead of compiling a queryset per request was a tenth of a submit's CPU.
Any other user field still loads on first use (one more query), so nothing that reads the user
breaks. No caching: a revoked token (or a deactivated user) stops working on the very next
request.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from django.contrib.auth import get_user_model
from django.db import connection
from django.utils.translation import gettext_lazy as _
from rest_framework import authentication, exceptions
from rest_framework.authtoken.models import Token

from annotation import db

# What request handling reads: id and is_active here; is_superuser / is_staff in the
# permission checks; username in logs and error pages.
USER_FIELDS = ("id", "is_active", "is_superuser", "is_staff", "username")


def _user_fields() -> tuple[str, ...]:
    return db.in_model_order(get_user_model(), USER_FIELDS)


@cache
def _user_by_token_sql() -> str:
    user = get_user_model()
    columns = ", ".join(f"u.{db.column(user, f)}" for f in _user_fields())
    return (
        f"SELECT {columns} FROM {db.table(user)} u"
        f" JOIN {db.table(Token)} t ON t.{db.column(Token, 'user')} = u.{db.column(user, 'pk')}"
        f" WHERE t.{db.column(Token, 'pk')} = %s"
    )


class TokenAuthentication(authentication.TokenAuthentication):
    """``Authorization: Token <key>``, reading only the user columns a request needs."""

    def authenticate_credentials(self, key: str) -> tuple[Any, Any]:
        with connection.cursor() as cursor:
            cursor.execute(_user_by_token_sql(), [key])
            row = cursor.fetchone()
        if row is None:
            raise exceptions.AuthenticationFailed(_("Invalid token."))
        user = get_user_model().from_db(connection.alias, _user_fields(), row)
        if not user.is_active:
            raise exceptions.AuthenticationFailed(_("User inactive or deleted."))
        # The token as DRF hands it on (``request.auth``); loaded, not new.
        token = Token.from_db(connection.alias, ("key", "user_id"), (key, user.pk))
        token.user = user
        return (user, token)
