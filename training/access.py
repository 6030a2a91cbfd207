"""Who may see and do what on the training pages and API; both doors call these.

The rules are the campaign's roles (``annotation.permissions``): a campaign's admins and ML
staff see its runs, rounds and models; only ML staff (superusers hold every role) start,
schedule or cancel training, which spends GPU time. A run, round or version of a campaign
the caller has no role in does not exist for them (404); in a campaign where they hold
another role it is forbidden (403).
"""

from __future__ import annotations

from collections.abc import Collection

from django.http import Http404

from annotation import permissions, selectors
from annotation.models import Campaign, Role
from training import selectors as training_selectors
from training.models import ModelVersion, Round, TrainingRun

VIEWERS = (Role.ADMIN, Role.ML_STAFF)
OPERATORS = (Role.ML_STAFF,)


def training_campaigns(*, user: selectors.AnyUser) -> list[tuple[Campaign, set[str]]]:
    """The campaigns whose training the user may see, by name, with their roles in each."""
    return [
        (campaign, roles)
        for campaign, roles in selectors.campaigns_with_roles(user=user)
        if roles & set(VIEWERS)
    ]


def can_operate(roles: set[str]) -> bool:
    return bool(roles & set(OPERATORS))


def campaign_for(
    *, user: selectors.AnyUser, slug: str, roles: tuple[str, ...] = VIEWERS
) -> tuple[Campaign, set[str]]:
    return permissions.campaign_and_roles_for(user=user, slug=slug, roles=roles)


def _check(user: selectors.AnyUser, campaign: Campaign, roles: tuple[str, ...]) -> set[str]:
    # The object's campaign was loaded with it; the check reads the user's roles in it by
    # slug, the same single statement every campaign-scoped page uses.
    return permissions.campaign_and_roles_for(user=user, slug=campaign.slug, roles=roles)[1]


def run_for(
    *, user: selectors.AnyUser, run_id: int, roles: tuple[str, ...] = VIEWERS
) -> tuple[TrainingRun, set[str]]:
    run = training_selectors.run_get(run_id=run_id)
    if run is None:
        raise Http404("No such run.")
    return run, _check(user, run.campaign, roles)


def round_for(
    *, user: selectors.AnyUser, round_id: int, roles: tuple[str, ...] = VIEWERS
) -> tuple[Round, set[str]]:
    round_obj = training_selectors.round_get(round_id=round_id)
    if round_obj is None:
        raise Http404("No such round.")
    return round_obj, _check(user, round_obj.campaign, roles)


def version_visible(version: ModelVersion, campaign_ids: Collection[int]) -> bool:
    """Whether a version may be shown to someone who trains in ``campaign_ids``: one made by
    a run belongs to that run's campaign; a registered base model (made by no run) is shared
    by every campaign that starts from it and tells nothing about any of them."""
    if version.run_id is None:
        return bool(campaign_ids)
    return version.run is not None and version.run.campaign_id in campaign_ids


def version_for(*, user: selectors.AnyUser, version_id: int) -> tuple[ModelVersion, set[str]]:
    """A version of a campaign by the campaign's roles (404 / 403 as for runs); a base model
    to anyone who is an admin or ML staff somewhere, with no roles to act on it."""
    version = training_selectors.version_get(version_id=version_id)
    if version is None:
        raise Http404("No such model version.")
    if version.run is None:
        if not training_campaigns(user=user):
            raise Http404("No such model version.")
        return version, set()
    return version, _check(user, version.run.campaign, VIEWERS)
