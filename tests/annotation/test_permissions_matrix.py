"""Every URL, every role, every method: nobody reaches what is not theirs (R1, R2, R10).

The routes are enumerated from the resolver, so a new URL is tested the moment it exists, and
a URL missing from ``ROUTES`` fails ``test_every_route_is_classified``: classify it with one
line there (and, if it has a new path parameter, one line in ``PATH_VALUES``).

Path parameters are filled with objects of *the* campaign (``world.campaign``) or with objects
that belong to somebody who is not one of the callers (a slot leased by a bystander). The
callers are: anonymous, an outsider, the rater and the admin of *another* campaign, and the
rater, admin and ML staff of this campaign, plus a superuser. For each route and method, a
caller the table does not grant must get 302-to-login, 401, 403, 404 or 405: never 2xx, never
another redirect, never 500 (the test client re-raises server errors). A caller the table
grants must not be refused a GET (so the table cannot be looser than the code without this
test noticing either).

CSRF: with ``Client(enforce_csrf_checks=True)`` every unsafe method on every route, sent with a
session by a caller who would otherwise be let in, is refused with 403. The exemptions are
listed in ``CSRF_EXEMPT`` with the reason: token-authenticated API calls need no CSRF token
(a browser never attaches an ``Authorization: Token`` header by itself), and the token
endpoint, called without a session, neither reads nor sets a cookie.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission
from django.core.cache import cache
from django.shortcuts import resolve_url
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, resolve

from annotation.models import Role, Slot
from annotation.services.judgments import slot_lease_next
from tests.factories import MembershipFactory, UserFactory

METHODS = ("GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE")
UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


# -- who may use what ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    """Who may use a route when its path names the target campaign's objects."""

    roles: frozenset[str] = frozenset()  # roles in the target campaign
    public: bool = False  # anyone, signed in or not
    signed_in: bool = False  # any signed-in user (the view scopes what it shows)
    staff: bool = False  # Django admin staff
    perm: str = ""  # a model permission, e.g. "annotation.add_campaign"
    owned: bool = False  # the path holds an object of a bystander's: nobody here gets in


def roles(*names: str) -> Access:
    return Access(roles=frozenset(names))


PUBLIC = Access(public=True)
SIGNED_IN = Access(signed_in=True)
STAFF = Access(staff=True)
CAN_CREATE_CAMPAIGNS = Access(perm="annotation.add_campaign")
RATER = roles(Role.RATER)
ADMIN = roles(Role.ADMIN)
ADMIN_OR_ML = roles(Role.ADMIN, Role.ML_STAFF)
ML_STAFF = roles(Role.ML_STAFF)
OWNED_BY_ANOTHER = Access(owned=True)

# Route name (namespaced) -> Access, or {method: Access} with "*" for the other methods.
# "admin:*" covers every Django admin page not listed: each goes through
# AdminSite.admin_view (staff only), custom admin views included, and all are still walked.
ROUTES: dict[str, Access | dict[str, Access]] = {
    # Django admin
    "admin:*": STAFF,
    "admin:login": PUBLIC,
    "admin:logout": PUBLIC,
    # log in / out
    "login": PUBLIC,
    "logout": PUBLIC,
    # OpenAPI schema and docs
    "schema": SIGNED_IN,
    "api-docs": SIGNED_IN,
    # rater pages
    "annotation:home": SIGNED_IN,
    "annotation:rate": RATER,
    "annotation:rate_submit": RATER,
    "annotation:rate_skip": RATER,
    "annotation:rank": RATER,
    "annotation:rank_submit": RATER,
    # campaign-admin pages
    "annotation:campaign_list": SIGNED_IN,
    "annotation:campaign_create": CAN_CREATE_CAMPAIGNS,
    "annotation:campaign_detail": ADMIN,
    "annotation:campaign_edit": ADMIN,
    "annotation:campaign_members": ADMIN,
    "annotation:campaign_status": ADMIN,
    "annotation:campaign_import": ADMIN,
    "annotation:campaign_build": ADMIN,
    "annotation:campaign_export": ADMIN_OR_ML,
    "annotation:campaign_quality": ADMIN,
    "annotation:campaign_gold": ADMIN,
    "annotation:campaign_rank_build": ADMIN,
    # REST API
    "annotation:api-token": {"POST": PUBLIC, "*": SIGNED_IN},
    "annotation:api-campaigns": {"POST": CAN_CREATE_CAMPAIGNS, "*": SIGNED_IN},
    "annotation:api-campaign": ADMIN,
    "annotation:api-members": ADMIN,
    "annotation:api-campaign-import": ADMIN,
    "annotation:api-comparisons-build": ADMIN,
    "annotation:api-gold": ADMIN,
    "annotation:api-comparison-gold": ADMIN,
    "annotation:api-next": RATER,
    "annotation:api-judgments": RATER,
    "annotation:api-slot-release": OWNED_BY_ANOTHER,
    "annotation:api-rank-next": RATER,
    "annotation:api-rankings": RATER,
    "annotation:api-ranking-tasks-build": ADMIN,
    "annotation:api-progress": ADMIN_OR_ML,
    "annotation:api-export": ADMIN_OR_ML,
    "annotation:api-quality": ADMIN,
    # training pages: admins and ML staff read, ML staff start, schedule and cancel
    "training:index": SIGNED_IN,
    "training:campaign": ADMIN_OR_ML,
    "training:round_new": ML_STAFF,
    "training:schedule": ML_STAFF,
    "training:run": ADMIN_OR_ML,
    "training:run_live": ADMIN_OR_ML,
    "training:run_cancel": ML_STAFF,
    "training:round": ADMIN_OR_ML,
    "training:round_live": ADMIN_OR_ML,
    "training:round_cancel": ML_STAFF,
    "training:versions": SIGNED_IN,
    "training:versions_compare": SIGNED_IN,
    "training:version": ADMIN_OR_ML,
    # training API
    "training:api-rounds": {"POST": ML_STAFF, "*": ADMIN_OR_ML},
    "training:api-schedule": {"PUT": ML_STAFF, "*": ADMIN_OR_ML},
    "training:api-round": ADMIN_OR_ML,
    "training:api-round-cancel": ML_STAFF,
    "training:api-runs": SIGNED_IN,
    "training:api-run": ADMIN_OR_ML,
    "training:api-run-metrics": ADMIN_OR_ML,
    "training:api-run-cancel": ML_STAFF,
    "training:api-versions": SIGNED_IN,
    "training:api-version": ADMIN_OR_ML,
}

# Routes that end the session: the matrix signs the caller in again after each call.
LOGS_OUT = {"logout", "admin:logout"}

# (route, method) pairs that need no CSRF token, and why.
CSRF_EXEMPT: dict[tuple[str, str], str] = {
    ("annotation:api-token", "POST"): (
        "credentials in the body, no session read or written; the token in the answer cannot "
        "be read cross-origin (no CORS), and it is refused with a session (DRF enforces CSRF "
        "for session-authenticated callers)"
    ),
}


# -- what the path parameters are filled with ---------------------------------------------------


@dataclass
class Targets:
    """Objects of the target campaign that path parameters name."""

    world: object
    bystander_slot: Slot
    values: dict[str, str] = field(default_factory=dict)


PATH_VALUES: dict[str, Callable[[Targets], object]] = {
    "slug": lambda t: t.world.campaign.slug,
    "slot_id": lambda t: t.bystander_slot.pk,
    "comparison_id": lambda t: t.bystander_slot.comparison_id,
    # training: a round of the target campaign, its run, and the version the run made
    "run_id": lambda t: _training_rows(t)["run"],
    "round_id": lambda t: _training_rows(t)["round"],
    "version_id": lambda t: _training_rows(t)["version"],
    # Django admin
    "object_id": lambda t: t.world.rater.pk,
    "id": lambda t: t.world.rater.pk,
    "content_type_id": lambda t: 1,
    "app_label": lambda t: "auth",
    "url": lambda t: "no-such-page/",
}


def _training_rows(targets: Targets) -> dict[str, int]:
    from training.models import ModelVersion, Round, TrainingRun

    if "run" not in targets.values:
        campaign = targets.world.campaign
        round_obj = Round.objects.create(campaign=campaign, number=1, status="running")
        run = TrainingRun.objects.create(
            campaign=campaign, kind="reward", round=round_obj, status="running"
        )
        version = ModelVersion.objects.create(kind="reward", name="rm", artifact="/x", run=run)
        targets.values.update(run=str(run.pk), round=str(round_obj.pk), version=str(version.pk))
    return {k: int(v) for k, v in targets.values.items()}


# -- walking the URLconf ------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    key: str  # the namespaced name, or "<namespace:>unnamed <pattern>"
    pattern: str  # the full pattern text, prefixes included

    @property
    def namespace(self) -> str:
        return self.key.split(":")[0] + ":" if ":" in self.key else ""

    def params(self) -> list[str]:
        return re.findall(r"<(?:\w+:)?(\w+)>", self.pattern) + re.findall(
            r"\(\?P<(\w+)>", self.pattern
        )

    def path(self, targets: Targets) -> str:
        def value(name: str) -> str:
            if name not in PATH_VALUES:
                raise AssertionError(
                    f"{self.key}: add a value for path parameter {name!r} to PATH_VALUES"
                )
            return str(PATH_VALUES[name](targets))

        text = re.sub(r"<(?:\w+:)?(\w+)>", lambda m: value(m.group(1)), self.pattern)
        text = _replace_groups(text, value)
        return "/" + text.replace("^", "").replace("$", "")


def _replace_groups(text: str, value: Callable[[str], str]) -> str:
    """Replace each ``(?P<name>...)`` (nested parentheses included) with its value."""
    while (start := text.find("(?P<")) >= 0:
        name = text[start + 4 : text.index(">", start)]
        depth, end = 0, start
        for end in range(start, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        text = text[:start] + value(name) + text[end + 1 :]
    return text


def _walk(patterns: list, prefix: str = "", namespace: str = "") -> Iterator[Route]:
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            inner = f"{namespace}{pattern.namespace}:" if pattern.namespace else namespace
            yield from _walk(pattern.url_patterns, prefix + str(pattern.pattern), inner)
        elif isinstance(pattern, URLPattern):
            full = prefix + str(pattern.pattern)
            key = f"{namespace}{pattern.name}" if pattern.name else f"{namespace}unnamed {full}"
            yield Route(key=key, pattern=full)


def all_routes() -> list[Route]:
    return list(_walk(get_resolver().url_patterns))


def access_for(route: Route, method: str) -> Access:
    entry = ROUTES.get(route.key)
    if entry is None:
        entry = ROUTES.get(f"{route.namespace}*")
    assert entry is not None, f"classify {route.key!r} ({route.pattern}) in ROUTES"
    if isinstance(entry, dict):
        return entry.get(method, entry["*"])
    return entry


# -- callers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    name: str
    user: object | None
    roles: frozenset[str]  # in the target campaign
    staff: bool = False


def callers(world) -> list[Caller]:
    superuser = UserFactory(is_staff=True, is_superuser=True)
    creator = UserFactory()
    creator.user_permissions.add(Permission.objects.get(codename="add_campaign"))
    return [
        Caller("anonymous", None, frozenset()),
        Caller("outsider", world.outsider, frozenset()),
        Caller("rater of another campaign", world.other_rater, frozenset()),
        Caller("admin of another campaign", world.other_admin, frozenset()),
        Caller("rater", world.rater, frozenset({Role.RATER})),
        Caller("admin", world.admin, frozenset({Role.ADMIN})),
        Caller("ML staff", world.ml_staff, frozenset({Role.ML_STAFF})),
        # Superusers act as admin and ML staff of every campaign, never as its rater.
        Caller("superuser", superuser, frozenset({Role.ADMIN, Role.ML_STAFF}), staff=True),
        # May create campaigns, holds no role in this one.
        Caller("campaign creator", creator, frozenset()),
    ]


def granted(access: Access, caller: Caller) -> bool:
    if access.owned:
        return False
    if access.public:
        return True
    if caller.user is None:
        return False
    if access.signed_in:
        return True
    if access.staff:
        return caller.staff
    if access.perm:
        return caller.user.has_perm(access.perm)
    return bool(access.roles & caller.roles)


def client_for(caller: Caller, **kwargs) -> Client:
    client = Client(**kwargs)
    if caller.user is not None:
        client.force_login(caller.user)
    return client


def send(client: Client, method: str, path: str):
    # An empty JSON body: a denial must not depend on what the body says.
    return client.generic(method, path, data=b"", content_type="application/json")


def login_paths(route: Route) -> tuple[str, ...]:
    if route.namespace == "admin:":
        return (resolve_url("admin:login"),)
    return (resolve_url(settings.LOGIN_URL), resolve_url("admin:login"))


@pytest.fixture
def targets(world) -> Targets:
    # A slot of the target campaign leased by a rater who is none of the callers.
    bystander = UserFactory()
    MembershipFactory(campaign=world.campaign, user=bystander, role=Role.RATER)
    slot = slot_lease_next(rater=bystander, campaign=world.campaign)
    assert slot is not None
    cache.clear()  # throttle history from other tests
    return Targets(world=world, bystander_slot=slot)


ROUTE_LIST = all_routes()


# -- the tests ----------------------------------------------------------------------------------


def test_every_route_is_classified():
    unclassified = []
    for route in ROUTE_LIST:
        try:
            for method in METHODS:
                access_for(route, method)
        except AssertionError:
            unclassified.append(f"{route.key}  ({route.pattern})")
    assert unclassified == [], "classify these routes in ROUTES:\n" + "\n".join(unclassified)


def test_the_table_names_no_route_that_is_gone():
    keys = {route.key for route in ROUTE_LIST}
    stale = [k for k in ROUTES if not k.endswith(":*") and k not in keys]
    assert stale == []


@pytest.mark.parametrize("route", ROUTE_LIST, ids=lambda r: r.key)
def test_nobody_reaches_what_is_not_theirs(route, targets):
    path = route.path(targets)
    assert resolve(path).route is not None  # the filled path still hits this route
    problems = []
    for caller in callers(targets.world):
        client = client_for(caller)
        for method in METHODS:
            access = access_for(route, method)
            if route.key in LOGS_OUT:
                client = client_for(caller)
            response = send(client, method, path)
            status = response.status_code
            where = f"{caller.name} {method} {path} -> {status}"
            if granted(access, caller):
                if method == "GET" and route.namespace != "admin:":
                    refused = status in (401, 403, 404) or (
                        status == 302 and response["Location"].startswith(login_paths(route))
                    )
                    if refused:
                        problems.append(f"{where}: granted by the table but refused")
                continue
            if status in (401, 403, 404, 405):
                continue
            if status == 302 and response["Location"].startswith(login_paths(route)):
                continue
            problems.append(f"{where}: should be refused")
    assert problems == []


@pytest.mark.parametrize("route", ROUTE_LIST, ids=lambda r: r.key)
def test_unsafe_methods_need_a_csrf_token_with_a_session(route, targets):
    path = route.path(targets)
    everyone = callers(targets.world)
    holder = Caller("slot holder", _slot_holder(targets), frozenset({Role.RATER}))
    problems = []
    for method in UNSAFE_METHODS:
        if (route.key, method) in CSRF_EXEMPT:
            continue
        access = access_for(route, method)
        caller = holder if access.owned else next(c for c in everyone if granted(access, c))
        response = send(client_for(caller, enforce_csrf_checks=True), method, path)
        if response.status_code != 403:
            problems.append(f"{caller.name} {method} {path} -> {response.status_code}")
        if access.public and caller.user is None:
            # A signed-in browser is refused too (login CSRF, session-authenticated API).
            signed_in = Caller("outsider", targets.world.outsider, frozenset())
            again = send(client_for(signed_in, enforce_csrf_checks=True), method, path)
            if again.status_code != 403:
                problems.append(f"signed-in {method} {path} -> {again.status_code}")
    assert problems == []


def _slot_holder(targets: Targets):
    return targets.bystander_slot.rater


def test_token_endpoint_is_csrf_exempt_only_without_a_session(targets):
    """The one exemption, checked: no session, no CSRF token needed; with a session, needed."""
    path = "/api/auth/token/"
    anonymous = Client(enforce_csrf_checks=True)
    assert send(anonymous, "POST", path).status_code == 400  # reached the credential check
    signed_in = client_for(
        Caller("outsider", targets.world.outsider, frozenset()), enforce_csrf_checks=True
    )
    assert send(signed_in, "POST", path).status_code == 403


def test_token_authenticated_api_calls_need_no_csrf_token(targets):
    from annotation.services.tokens import token_issue

    client = Client(enforce_csrf_checks=True)
    key = token_issue(user=targets.world.rater).key
    response = client.post(
        f"/api/campaigns/{targets.world.campaign.slug}/next/",
        HTTP_AUTHORIZATION=f"Token {key}",
    )
    assert response.status_code == 200


def test_campaign_creation_is_granted_by_the_permission_not_by_a_role(targets):
    """The permission-gated routes, seen from a caller who holds the permission."""
    user = targets.world.outsider
    user.user_permissions.add(Permission.objects.get(codename="add_campaign"))
    client = Client()
    client.force_login(user)
    assert client.get("/campaigns/new/").status_code == 200
    response = client.post(
        "/api/campaigns/", {"name": "Mine", "slug": "mine"}, content_type="application/json"
    )
    assert response.status_code == 201


def test_every_api_view_declares_its_permissions(targets):
    """R2: no API class falls back to the default; campaign routes check the campaign role."""
    from rest_framework.views import APIView

    from annotation.api import CampaignRole, MethodRoutedApi

    for route in ROUTE_LIST:
        match = resolve(route.path(targets))
        view_class = getattr(match.func, "view_class", None) or getattr(match.func, "cls", None)
        if view_class is None or not issubclass(view_class, APIView):
            continue
        if route.key.startswith("annotation:api-"):
            operations = (
                view_class.operations.values()
                if issubclass(view_class, MethodRoutedApi)
                else [view_class]
            )
            for operation in operations:
                assert "permission_classes" in vars(operation), operation
                if "slug" in route.params():
                    assert CampaignRole in operation.permission_classes, operation
