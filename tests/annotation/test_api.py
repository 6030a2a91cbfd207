"""The REST API, end to end through the URLconf: auth, campaigns, import, the rater's loop,
progress, export, the schema and its docs page."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from django.contrib.auth.models import Permission
from django.core.cache import cache
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.http import StreamingHttpResponse
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from annotation.models import (
    Campaign,
    CampaignStatus,
    Comparison,
    Critique,
    CritiqueMode,
    Judgment,
    Membership,
    Prompt,
    Role,
    Slot,
    SlotStatus,
)
from annotation.services.tokens import token_issue
from tests.conftest import make_campaign
from tests.factories import UserFactory

PASSWORD = "correct-horse-battery"  # tests.factories.UserFactory's


@pytest.fixture(autouse=True)
def _fresh_throttles():
    # DRF keeps throttle history in the cache, which outlives a test's transaction.
    cache.clear()
    yield
    cache.clear()


def api_as(user=None) -> APIClient:
    client = APIClient()
    if user is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Token {token_issue(user=user).key}")
    return client


def url(campaign: Campaign, tail: str = "") -> str:
    return f"/api/campaigns/{campaign.slug}/{tail}"


def lease(client: APIClient, campaign: Campaign) -> dict:
    response = client.post(url(campaign, "next/"))
    assert response.status_code == 200, response.content
    return response.json()


# -- auth ---------------------------------------------------------------------------------------


def test_token_is_issued_for_the_right_password_and_authenticates_requests(db):
    user = UserFactory()
    response = APIClient().post(
        "/api/auth/token/", {"username": user.username, "password": PASSWORD}, format="json"
    )
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    token = response.json()["token"]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert client.get("/api/campaigns/").status_code == 200
    # Asking again hands out the same token rather than piling up new ones.
    again = APIClient().post(
        "/api/auth/token/", {"username": user.username, "password": PASSWORD}, format="json"
    )
    assert again.json()["token"] == token


def test_token_is_refused_for_a_wrong_password_or_an_inactive_user(db):
    user = UserFactory()
    wrong = APIClient().post(
        "/api/auth/token/", {"username": user.username, "password": "nope"}, format="json"
    )
    assert wrong.status_code == 400
    assert "token" not in wrong.json()
    user.is_active = False
    user.save()
    inactive = APIClient().post(
        "/api/auth/token/", {"username": user.username, "password": PASSWORD}, format="json"
    )
    assert inactive.status_code == 400


def test_revoked_token_stops_working(db):
    user = UserFactory()
    client = api_as(user)
    assert client.delete("/api/auth/token/").status_code == 204
    assert client.get("/api/campaigns/").status_code == 401


def test_anonymous_calls_get_401_with_a_token_challenge(world):
    response = APIClient().post(url(world.campaign, "next/"))
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"


# -- campaigns ----------------------------------------------------------------------------------


def test_campaign_list_holds_only_the_callers_campaigns_with_their_roles(world):
    MembershipFactory_role(world.campaign, world.admin, Role.RATER)
    rows = api_as(world.admin).get("/api/campaigns/").json()
    assert [(r["slug"], r["roles"]) for r in rows] == [(world.campaign.slug, ["admin", "rater"])]
    assert api_as(world.outsider).get("/api/campaigns/").json() == []


def MembershipFactory_role(campaign, user, role):
    Membership.objects.create(campaign=campaign, user=user, role=role)


def test_campaign_list_filters_and_orders_only_by_allowlisted_fields(world):
    second = make_campaign(comparisons=0, name="Aardvark")
    MembershipFactory_role(second, world.rater, Role.RATER)
    client = api_as(world.rater)
    plain = client.get("/api/campaigns/").json()
    by_name = client.get("/api/campaigns/?ordering=-name").json()
    assert [r["name"] for r in by_name] == sorted((r["name"] for r in plain), reverse=True)
    # An ORM path in ordering is refused; one in a filter is ignored: neither reaches a query.
    hostile = client.get("/api/campaigns/?ordering=rater__password")
    assert hostile.status_code == 400
    assert "ordering" in hostile.json()
    ignored = client.get("/api/campaigns/?memberships__user__password__startswith=x").json()
    assert ignored == plain
    assert client.get("/api/campaigns/?status=paused").json() == []


def test_creating_a_campaign_needs_the_add_campaign_permission(db):
    user = UserFactory()
    body = {"name": "New", "slug": "new-one"}
    assert api_as(user).post("/api/campaigns/", body, format="json").status_code == 403
    assert not Campaign.objects.filter(slug="new-one").exists()


def test_created_campaign_is_a_draft_administered_by_its_creator_whatever_the_body_says(db):
    creator, someone = UserFactory(), UserFactory()
    creator.user_permissions.add(Permission.objects.get(codename="add_campaign"))
    body = {
        "name": "Helpfulness",
        "slug": "helpfulness",
        "overlap": 3,
        "aspects": ["accuracy"],
        # Server-owned fields: ignored.
        "status": "active",
        "created_by": someone.pk,
        "guidelines_version": 99,
    }
    response = api_as(creator).post("/api/campaigns/", body, format="json")
    assert response.status_code == 201, response.content
    campaign = Campaign.objects.get(slug="helpfulness")
    assert (campaign.status, campaign.created_by, campaign.guidelines_version) == (
        CampaignStatus.DRAFT,
        creator,
        1,
    )
    assert campaign.overlap == 3
    assert Membership.objects.filter(campaign=campaign, user=creator, role=Role.ADMIN).exists()


def test_bad_campaign_settings_are_answered_with_the_field_named(world):
    world.admin.user_permissions.add(Permission.objects.get(codename="add_campaign"))
    client = api_as(world.admin)
    taken = client.post(
        "/api/campaigns/", {"name": "x", "slug": world.campaign.slug}, format="json"
    )
    assert taken.status_code == 400
    assert "slug" in taken.json()
    too_big = client.post(
        "/api/campaigns/", {"name": "x", "slug": "x", "overlap": 51}, format="json"
    )
    assert too_big.status_code == 400
    assert "overlap" in too_big.json()


def test_admin_edits_settings_and_status_in_one_patch(world):
    client = api_as(world.admin)
    response = client.patch(
        url(world.campaign), {"guidelines": "Be strict.", "status": "paused"}, format="json"
    )
    assert response.status_code == 200, response.content
    assert response.json()["guidelines_version"] == 2
    world.campaign.refresh_from_db()
    assert (world.campaign.status, world.campaign.guidelines) == ("paused", "Be strict.")


def test_a_refused_status_change_leaves_the_settings_unchanged(world):
    world.campaign.status = CampaignStatus.ARCHIVED
    world.campaign.save()
    response = api_as(world.admin).patch(
        url(world.campaign), {"name": "Renamed", "status": "active"}, format="json"
    )
    assert response.status_code == 400
    assert "archived" in response.json()["detail"]
    world.campaign.refresh_from_db()
    assert world.campaign.name != "Renamed"


def test_admin_adds_a_rater_who_can_then_lease(world):
    newcomer = UserFactory()
    response = api_as(world.admin).post(
        url(world.campaign, "members/"),
        {"username": newcomer.username, "role": "rater"},
        format="json",
    )
    assert response.status_code == 201
    assert api_as(newcomer).post(url(world.campaign, "next/")).status_code == 200
    unknown = api_as(world.admin).post(
        url(world.campaign, "members/"), {"username": "ghost", "role": "rater"}, format="json"
    )
    assert (unknown.status_code, unknown.json()["field"]) == (400, "username")


# -- import and build ---------------------------------------------------------------------------


def jsonl(*rows: dict) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def test_import_reads_a_raw_jsonl_body(world):
    body = jsonl(
        {"prompt": "Why is the sky blue?", "completions": ["Rayleigh scattering.", "Paint."]},
        {"prompt": [{"role": "user", "content": "2+2?"}], "completions": ["4", "5", "22"]},
    )
    response = api_as(world.admin).post(
        url(world.campaign, "import/?kind=candidates"),
        body,
        content_type="application/x-ndjson",
    )
    assert response.status_code == 201, response.content
    assert response.json() == {"prompts": 2, "completions": 5, "comparisons": 4, "critiques": 0}


def test_import_streams_a_body_larger_than_djangos_in_memory_cap(world, settings):
    line = {"prompt": "x" * 2000}
    body = jsonl(*[line] * 3000)
    assert len(body) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    response = api_as(world.admin).post(
        url(world.campaign, "import/?kind=prompts"), body, content_type="application/x-ndjson"
    )
    assert response.status_code == 201, response.content[:500]
    assert response.json()["prompts"] == 3000


def test_import_reads_a_multipart_upload(world):
    upload = SimpleUploadedFile("p.jsonl", jsonl({"prompt": "One?"}, {"prompt": "Two?"}))
    before = Prompt.objects.filter(campaign=world.campaign).count()
    response = api_as(world.admin).post(
        url(world.campaign, "import/?kind=prompts"), {"file": upload}, format="multipart"
    )
    assert response.status_code == 201, response.content
    assert Prompt.objects.filter(campaign=world.campaign).count() == before + 2


def test_rejected_import_names_line_and_field_and_writes_nothing(world):
    body = jsonl({"prompt": "Fine."}, {"prompt": "Fine too."}) + b'{"prompt": 5}\n'
    before = Prompt.objects.count()
    response = api_as(world.admin).post(
        url(world.campaign, "import/?kind=prompts"), body, content_type="application/x-ndjson"
    )
    assert response.status_code == 400
    assert response.json()["errors"][0]["line"] == 3
    assert response.json()["errors"][0]["field"] == "prompt"
    assert Prompt.objects.count() == before


def test_import_refuses_unknown_kinds_media_types_and_oversized_bodies(world, settings):
    client = api_as(world.admin)
    wrong_kind = client.post(
        url(world.campaign, "import/?kind=users"), b"{}\n", content_type="application/x-ndjson"
    )
    assert wrong_kind.status_code == 400
    assert "kind" in wrong_kind.json()
    html = client.post(
        url(world.campaign, "import/?kind=prompts"), b"<x>", content_type="text/html"
    )
    assert html.status_code == 415
    settings.IMPORT_MAX_BYTES = 10
    big = client.post(
        url(world.campaign, "import/?kind=prompts"),
        jsonl({"prompt": "This body is longer than ten bytes."}),
        content_type="application/x-ndjson",
    )
    assert big.status_code == 413


def test_building_comparisons_pairs_each_prompts_candidates_once(world):
    client = api_as(world.admin)
    campaign = make_campaign(comparisons=0)
    MembershipFactory_role(campaign, world.admin, Role.ADMIN)
    client.post(
        url(campaign, "import/?kind=candidates&strategy=random_k&k=1"),
        jsonl({"prompt": "Q?", "completions": ["x", "y", "z"]}),
        content_type="application/x-ndjson",
    )
    assert Comparison.objects.filter(campaign=campaign).count() == 1
    built = client.post(url(campaign, "comparisons/build/"), {}, format="json")
    assert built.json() == {"created": 2}  # all pairs of 3, one already there
    again = client.post(url(campaign, "comparisons/build/"), {}, format="json")
    assert again.json() == {"created": 0}
    bad = client.post(url(campaign, "comparisons/build/"), {"strategy": "best"}, format="json")
    assert bad.status_code == 400
    assert "strategy" in bad.json()


# -- the rater's loop ---------------------------------------------------------------------------


def test_next_shows_both_outputs_without_model_names_or_canonical_order(world):
    comparison = Comparison.objects.filter(campaign=world.campaign).first()
    comparison.gold_choice = "a"
    comparison.save()
    card = lease(api_as(world.rater), world.campaign)
    slot = Slot.objects.get(pk=card["slot"])
    comparison = slot.comparison
    texts = {comparison.completion_a.text, comparison.completion_b.text}
    assert {card["left"]["text"], card["right"]["text"]} == texts
    expected_left = comparison.completion_a if slot.left_is_a else comparison.completion_b
    assert card["left"]["text"] == expected_left.text
    assert card["messages"] == comparison.prompt.messages
    raw = json.dumps(card)
    for leaked in (comparison.completion_a.source.name, comparison.completion_b.source.name):
        assert leaked not in raw
    assert "gold" not in raw
    assert "completion_a" not in raw
    assert card["form"]["choices"] == ["left", "right", "tie", "both_bad"]


def test_next_renews_the_lease_already_held(world):
    client = api_as(world.rater)
    first, second = lease(client, world.campaign), lease(client, world.campaign)
    assert first["slot"] == second["slot"]


def test_next_shows_critiques_only_when_the_campaign_does_and_hides_the_critic(world):
    world.campaign.critique_mode = CritiqueMode.ALWAYS
    world.campaign.save()
    for comparison in Comparison.objects.filter(campaign=world.campaign):
        Critique.objects.create(
            completion=comparison.completion_a, critic="secret-critic-7b", text="Wrong year."
        )
    card = lease(api_as(world.rater), world.campaign)
    assert card["critique_shown"] is True
    critiques = card["left"]["critiques"] + card["right"]["critiques"]
    assert [c["text"] for c in critiques] == ["Wrong year."]
    assert "secret-critic-7b" not in json.dumps(card)


def test_next_answers_204_when_nothing_is_left_and_409_when_paused(world):
    client = api_as(world.rater)
    for _ in range(3):
        slot = lease(client, world.campaign)["slot"]
        client.post(
            url(world.campaign, "judgments/"), {"slot": slot, "choice": "tie"}, format="json"
        )
    assert client.post(url(world.campaign, "next/")).status_code == 204
    world.campaign.status = CampaignStatus.PAUSED
    world.campaign.save()
    paused = client.post(url(world.campaign, "next/"))
    assert paused.status_code == 409
    assert "paused" in paused.json()["detail"]


@pytest.mark.parametrize("left_is_a", [True, False])
def test_left_and_right_are_mapped_to_canonical_choices_by_the_slots_layout(world, left_is_a):
    client = api_as(world.rater)
    slot_id = lease(client, world.campaign)["slot"]
    Slot.objects.filter(pk=slot_id).update(left_is_a=left_is_a)
    response = client.post(
        url(world.campaign, "judgments/"),
        {"slot": slot_id, "choice": "left", "strength": 2, "aspects": {"helpfulness": "right"}},
        format="json",
    )
    assert response.status_code == 201, response.content
    judgment = Judgment.objects.get()
    assert judgment.choice == ("a" if left_is_a else "b")
    assert judgment.aspects == {"helpfulness": "b" if left_is_a else "a"}
    assert judgment.left_was_a is left_is_a
    # The answer comes back in the rater's terms.
    assert response.json()["choice"] == "left"
    assert response.json()["aspects"] == {"helpfulness": "right"}


def test_canonical_choices_are_refused_so_a_client_cannot_mix_up_the_two_vocabularies(world):
    client = api_as(world.rater)
    slot_id = lease(client, world.campaign)["slot"]
    response = client.post(
        url(world.campaign, "judgments/"), {"slot": slot_id, "choice": "a"}, format="json"
    )
    assert response.status_code == 400
    assert "choice" in response.json()
    assert not Judgment.objects.exists()


def test_submit_stores_the_caller_as_rater_whatever_the_body_claims(world):
    client = api_as(world.rater)
    slot_id = lease(client, world.campaign)["slot"]
    body = {
        "slot": slot_id,
        "choice": "right",
        "rater": world.other_rater.pk,
        "rater_id": world.other_rater.pk,
        "campaign": world.other_campaign.pk,
        "is_gold": True,
        "guidelines_version": 42,
        "created_at": "2001-01-01T00:00:00Z",
    }
    assert client.post(url(world.campaign, "judgments/"), body, format="json").status_code == 201
    judgment = Judgment.objects.get()
    assert (judgment.rater, judgment.campaign, judgment.guidelines_version) == (
        world.rater,
        world.campaign,
        1,
    )
    assert judgment.created_at.year > 2001


def test_repeated_submit_with_the_same_idempotency_key_returns_the_same_judgment(world):
    client = api_as(world.rater)
    slot_id = lease(client, world.campaign)["slot"]
    body = {"slot": slot_id, "choice": "left", "strength": 3}
    first = client.post(
        url(world.campaign, "judgments/"), body, format="json", HTTP_IDEMPOTENCY_KEY="k-1"
    )
    second = client.post(
        url(world.campaign, "judgments/"), body, format="json", HTTP_IDEMPOTENCY_KEY="k-1"
    )
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json() == second.json()
    assert Judgment.objects.count() == 1
    assert Judgment.objects.get().idempotency_key == "k-1"


def test_idempotency_key_can_be_a_body_field_and_a_double_click_without_one_is_harmless(world):
    client = api_as(world.rater)
    slot_id = lease(client, world.campaign)["slot"]
    body = {"slot": slot_id, "choice": "tie", "idempotency_key": "body-key"}
    first = client.post(url(world.campaign, "judgments/"), body, format="json")
    assert Judgment.objects.get().idempotency_key == "body-key"
    body.pop("idempotency_key")
    double_click = client.post(url(world.campaign, "judgments/"), body, format="json")
    assert double_click.status_code == 200
    assert double_click.json()["id"] == first.json()["id"]
    too_long = client.post(
        url(world.campaign, "judgments/"), body, format="json", HTTP_IDEMPOTENCY_KEY="k" * 65
    )
    assert too_long.status_code == 400
    assert too_long.json()["field"] == "idempotency_key"


def test_answers_that_do_not_fit_the_form_are_refused_with_the_field_named(world):
    client = api_as(world.rater)
    slot_id = lease(client, world.campaign)["slot"]
    cases = {
        "aspects": {"choice": "left", "aspects": {"length": "left"}},
        "reason_tags": {"choice": "left", "reason_tags": ["vibes"]},
        "flags": {"choice": "left", "flags": ["nsfw?"]},
        "strength": {"choice": "tie", "strength": 2},
    }
    for field, extra in cases.items():
        response = client.post(
            url(world.campaign, "judgments/"), {"slot": slot_id, **extra}, format="json"
        )
        assert response.status_code == 400, field
        assert response.json()["field"] == field
    assert not Judgment.objects.exists()


def test_submitting_someone_elses_slot_is_a_lost_lease(world):
    MembershipFactory_role(world.campaign, world.other_rater, Role.RATER)
    theirs = lease(api_as(world.other_rater), world.campaign)["slot"]
    response = api_as(world.rater).post(
        url(world.campaign, "judgments/"), {"slot": theirs, "choice": "left"}, format="json"
    )
    assert response.status_code == 409
    assert not Judgment.objects.exists()


def test_release_puts_the_slot_back_in_the_pool_once(world):
    client = api_as(world.rater)
    slot_id = lease(client, world.campaign)["slot"]
    assert client.post(url(world.campaign, f"slots/{slot_id}/release/")).status_code == 204
    assert Slot.objects.get(pk=slot_id).status == SlotStatus.OPEN
    assert client.post(url(world.campaign, f"slots/{slot_id}/release/")).status_code == 404


def test_hot_path_queries_stay_few_and_flat(world):
    """Token auth is one query and campaign + role check another; the services do the rest.
    More comparisons must not mean more queries (no N+1)."""
    big = make_campaign(comparisons=30)
    MembershipFactory_role(big, world.rater, Role.RATER)
    client = api_as(world.rater)
    counts = {}
    for campaign in (world.campaign, big):
        with CaptureQueriesContext(connection) as next_queries:
            slot_id = lease(client, campaign)["slot"]
        with CaptureQueriesContext(connection) as submit_queries:
            response = client.post(
                url(campaign, "judgments/"),
                {"slot": slot_id, "choice": "left", "strength": 1},
                format="json",
                HTTP_IDEMPOTENCY_KEY=f"key-{campaign.pk}",
            )
        assert response.status_code == 201
        counts[campaign.pk] = (len(next_queries), len(submit_queries))
    assert counts[world.campaign.pk] == counts[big.pk]
    lease_count, submit_count = counts[big.pk]
    assert lease_count <= 10, next_queries.captured_queries
    assert submit_count <= 10, submit_queries.captured_queries
    auth_and_roles = [q["sql"] for q in submit_queries.captured_queries[:2]]
    assert "authtoken_token" in auth_and_roles[0]
    assert "annotation_membership" in auth_and_roles[1]


# -- progress and export ------------------------------------------------------------------------


def judge_all(world, choices=("left", "tie", "both_bad")):
    client = api_as(world.rater)
    for choice in choices:
        slot_id = lease(client, world.campaign)["slot"]
        extra = {"strength": 3} if choice in ("left", "right") else {}
        response = client.post(
            url(world.campaign, "judgments/"),
            {"slot": slot_id, "choice": choice, "decision_ms": 1200, **extra},
            format="json",
        )
        assert response.status_code == 201


def test_progress_counts_the_campaign_and_each_rater(world):
    judge_all(world)
    for user in (world.admin, world.ml_staff):
        data = api_as(user).get(url(world.campaign, "progress/")).json()
        assert (data["comparisons"], data["filled"], data["open"]) == (3, 3, 0)
        assert data["percent"] == 100.0
        [rater] = data["raters"]
        assert (rater["username"], rater["judgments"], rater["ties"], rater["both_bad"]) == (
            world.rater.username,
            3,
            1,
            1,
        )
        assert rater["median_decision_ms"] == 1200


def test_progress_and_export_ignore_orm_paths_in_the_query_string(world):
    judge_all(world)
    client = api_as(world.admin)
    hostile = "?ordering=rater__password&rater__password__startswith=x&rater__is_superuser=1"
    plain = client.get(url(world.campaign, "progress/")).json()
    assert client.get(url(world.campaign, "progress/" + hostile)).json() == plain
    exported = b"".join(client.get(url(world.campaign, "export/?format=full")).streaming_content)
    sneaky = client.get(url(world.campaign, "export/" + hostile + "&format=full"))
    assert b"".join(sneaky.streaming_content) == exported
    for hash_prefix in (b"pbkdf2", b"argon2", b"md5$"):
        assert hash_prefix not in exported


def read_export(response) -> list[dict]:
    assert isinstance(response, StreamingHttpResponse)
    return [json.loads(line) for line in b"".join(response.streaming_content).splitlines()]


def test_export_streams_trl_pairs_without_ties_and_the_full_format_with_them(world):
    judge_all(world)
    client = api_as(world.ml_staff)
    trl = client.get(url(world.campaign, "export/?format=trl"))
    assert trl["Content-Type"] == "application/x-ndjson"
    assert "attachment" in trl["Content-Disposition"]
    [pair] = read_export(trl)
    judgment = Judgment.objects.get(choice__in=("a", "b"))
    comparison = judgment.comparison
    winner = comparison.completion_a if judgment.choice == "a" else comparison.completion_b
    assert pair["chosen"] == [{"role": "assistant", "content": winner.text}]
    assert pair["margin"] == 2.0
    full = read_export(api_as(world.admin).get(url(world.campaign, "export/?format=full")))
    assert sorted(row["choice"] for row in full) == sorted([judgment.choice, "tie", "both_bad"])
    assert {row["rater"] for row in full} == {world.rater.username}


def test_export_refuses_unknown_formats(world):
    response = api_as(world.admin).get(url(world.campaign, "export/?format=csv"))
    assert response.status_code == 400
    assert "format" in response.json()


# -- schema and docs ----------------------------------------------------------------------------


def test_schema_lists_every_api_route_and_needs_a_login(world):
    assert APIClient().get("/api/schema/").status_code == 401
    response = api_as(world.rater).get("/api/schema/?format=json")
    assert response.status_code == 200
    paths = json.loads(response.content)["paths"]
    for path in (
        "/api/auth/token/",
        "/api/campaigns/",
        "/api/campaigns/{slug}/",
        "/api/campaigns/{slug}/members/",
        "/api/campaigns/{slug}/import/",
        "/api/campaigns/{slug}/comparisons/build/",
        "/api/campaigns/{slug}/next/",
        "/api/campaigns/{slug}/judgments/",
        "/api/campaigns/{slug}/slots/{slot_id}/release/",
        "/api/campaigns/{slug}/progress/",
        "/api/campaigns/{slug}/export/",
    ):
        assert path in paths


def test_docs_page_loads_self_hosted_assets_with_no_inline_script_or_style(world, client):
    client.force_login(world.rater)
    page = client.get("/api/docs/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "<style" not in html
    assert "cdn" not in html.lower()
    assert "unpkg" not in html
    csp = page["Content-Security-Policy"]
    assert "'unsafe-inline'" not in csp
    assert "'unsafe-eval'" not in csp
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in html
    script = client.get("/api/docs/?script=")
    assert script.status_code == 200
    assert "SwaggerUIBundle" in script.content.decode()


def test_docs_page_sends_anonymous_visitors_to_the_login_page(db, client):
    response = client.get("/api/docs/")
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
RECORD_CSP_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__cspViolations.push(e.violatedDirective + " " + e.blockedURI);
});
"""


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_docs_page_renders_in_a_browser_with_no_csp_violation(live_server):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("no Chromium at /usr/bin/chromium")
    user = UserFactory()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page()
            page.add_init_script(RECORD_CSP_VIOLATIONS)
            outside: list[str] = []
            page.on(
                "request",
                lambda r: outside.append(r.url) if not r.url.startswith(live_server.url) else None,
            )
            page.goto(f"{live_server.url}/accounts/login/?next=/api/docs/")
            page.fill("input[name=username]", user.username)
            page.fill("input[name=password]", PASSWORD)
            page.press("input[name=password]", "Enter")
            page.wait_for_url("**/api/docs/")
            # Swagger UI has fetched the schema (with the session) and rendered our routes.
            page.wait_for_selector("text=/api/campaigns/{slug}/next/", timeout=20_000)
            violations = page.evaluate("window.__cspViolations")
            # The recorder works: an inline script is blocked and reported.
            page.evaluate(
                "() => { const s = document.createElement('script');"
                " s.textContent = 'window.__ran = 1'; document.body.appendChild(s); }"
            )
            page.wait_for_function("window.__cspViolations.length > 0")
            assert page.evaluate("window.__ran") is None
        finally:
            browser.close()
    assert violations == []
    assert [u for u in outside if not u.startswith(("data:", "blob:"))] == []
