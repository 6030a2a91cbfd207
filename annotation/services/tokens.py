"""API tokens for machines (DRF authtoken: one token per user)."""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from rest_framework.authtoken.models import Token


def token_issue(*, user: AbstractBaseUser) -> Token:
    """The user's API token, created on first use. Asking again returns the same token, so
    several scripts of one user can share it; ``token_revoke`` ends it for all of them."""
    with transaction.atomic():
        token, _ = Token.objects.get_or_create(user_id=user.pk)
    return token


def token_revoke(*, user: AbstractBaseUser) -> bool:
    """Delete the user's token; the next ``token_issue`` makes a new one."""
    with transaction.atomic():
        deleted, _ = Token.objects.filter(user_id=user.pk).delete()
    return bool(deleted)
