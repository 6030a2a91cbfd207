"""Role checks shared by the HTML views and the API, so both doors enforce the same rules.

A campaign the user has no role in does not exist for them (404); a campaign where they hold
another role is forbidden (403).
"""

from __future__ import annotations

from django.core.exceptions import PermissionDenied
from django.http import Http404

from annotation import selectors
from annotation.models import Campaign, Role

ANY_ROLE = (Role.RATER, Role.ADMIN, Role.ML_STAFF)


def campaign_for(*, user: selectors.AnyUser, slug: str, roles: tuple[str, ...]) -> Campaign:
    """The campaign named by ``slug`` if ``user`` holds one of ``roles`` in it."""
    return campaign_and_roles_for(user=user, slug=slug, roles=roles)[0]


def campaign_and_roles_for(
    *, user: selectors.AnyUser, slug: str, roles: tuple[str, ...]
) -> tuple[Campaign, set[str]]:
    """Like ``campaign_for``, also returning the user's roles; one query."""
    found = selectors.campaign_with_roles(user=user, slug=slug)
    if found is None or not found[1]:
        raise Http404("No such campaign.")
    campaign, held = found
    if not held & set(roles):
        raise PermissionDenied("Your role in this campaign does not allow this.")
    return campaign, held


def can_create_campaigns(user: selectors.AnyUser) -> bool:
    return bool(user.is_authenticated and user.has_perm("annotation.add_campaign"))
