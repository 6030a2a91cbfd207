"""The training REST API through the URLconf: access by role for every route and method, the
round and schedule writes through the real services, incremental metrics, lineage, and the
OpenAPI schema."""

from __future__ import annotations

import pytest
from django.core.cache import cache
from django.core.management import call_command
from django.urls import reverse
from rest_framework.test import APIClient

from annotation.models import Prompt
from annotation.services.tokens import token_issue
from tests.factories import UserFactory
from tests.training.test_views import (  # noqa: F401  (_settings is an autouse fixture)
    Team,
    _settings,
    add_metrics,
    answer,
    make_lineage,
    make_round,
    make_run,
    make_team,
)
from training.models import LoopSchedule, Round, RunKind, RunMetric, RunStatus

pytestmark = pytest.mark.django_db


@pytest.fixture
def team() -> Team:
    return make_team()


@pytest.fixture(autouse=True)
def _fresh_throttles():
    cache.clear()
    yield
    cache.clear()


def api_as(user=None) -> APIClient:
    client = APIClient()
    if user is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Token {token_issue(user=user).key}")
    return client


def _routes(team: Team) -> dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """name -> (url, methods readers may use, methods only ML staff may use)."""
    run = make_run(team.campaign, status=RunStatus.SUCCEEDED)
    round_obj = make_round(team.campaign)
    version = make_lineage(team.campaign, depth=1).policies[0]
    slug = team.campaign.slug
    return {
        "rounds": (reverse("training:api-rounds", args=[slug]), ("get",), ("post",)),
        "schedule": (reverse("training:api-schedule", args=[slug]), ("get",), ("put",)),
        "round": (reverse("training:api-round", args=[round_obj.pk]), ("get",), ()),
        "round-cancel": (reverse("training:api-round-cancel", args=[round_obj.pk]), (), ("post",)),
        "run": (reverse("training:api-run", args=[run.pk]), ("get",), ()),
        "run-metrics": (reverse("training:api-run-metrics", args=[run.pk]), ("get",), ()),
        "run-cancel": (reverse("training:api-run-cancel", args=[run.pk]), (), ("post",)),
        "version": (reverse("training:api-version", args=[version.pk]), ("get",), ()),
    }


def test_every_route_answers_by_the_campaign_roles(team):
    routes = _routes(team)
    for name, (url, reads, writes) in routes.items():
        for method in ("get", "post", "put", "patch", "delete", "options"):
            sent = {"data": {}, "format": "json"} if method in ("post", "put", "patch") else {}
            assert getattr(api_as(), method)(url, **sent).status_code == 401, (name, method)
            assert getattr(api_as(team.outsider), method)(url, **sent).status_code == 404
            assert getattr(api_as(team.other_ml), method)(url, **sent).status_code == 404
            assert getattr(api_as(team.rater), method)(url, **sent).status_code == 403
            admin = getattr(api_as(team.admin), method)(url, **sent).status_code
            if method in writes:
                assert admin == 403, (name, method)
            elif method in reads:
                assert admin == 200, (name, method)
        for method in reads:
            assert getattr(api_as(team.ml), method)(url).status_code == 200, (name, method)


def test_session_writes_need_the_csrf_token(team):
    run = make_run(team.campaign, status=RunStatus.QUEUED)
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(team.ml)
    response = client.post(reverse("training:api-run-cancel", args=[run.pk]))
    assert response.status_code == 403
    run.refresh_from_db()
    assert run.status == RunStatus.QUEUED


# -- rounds ---------------------------------------------------------------------------------------


def test_create_a_round_then_read_it_and_cancel_it(
    team, monkeypatch, django_capture_on_commit_callbacks
):
    from training import tasks

    sent: list[int] = []
    monkeypatch.setattr(tasks.advance_round, "delay", sent.append)
    client = api_as(team.ml)
    url = reverse("training:api-rounds", args=[team.campaign.slug])
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            url, {"config": {"algorithm": "ppo", "kl_coef": 0.02, "lora": False}}, format="json"
        )
    assert response.status_code == 201, response.content
    body = response.json()
    round_obj = Round.objects.get(pk=body["id"])
    assert sent == [round_obj.pk]
    assert body["number"] == 1
    assert body["status"] == "queued"
    assert body["campaign"] == team.campaign.slug
    assert body["config"]["kl_coef"] == 0.02
    assert body["config"]["policy_steps"] == round_obj.config["policy_steps"]  # a default
    assert round_obj.created_by == team.ml
    # Listed, and readable with its runs.
    listed = client.get(url).json()
    assert [r["id"] for r in listed] == [round_obj.pk]
    run = make_run(team.campaign, RunKind.REWARD, round=round_obj, status=RunStatus.RUNNING)
    detail = client.get(reverse("training:api-round", args=[round_obj.pk])).json()
    assert [r["id"] for r in detail["runs"]] == [run.pk]
    assert detail["runs"][0]["status"] == "running"
    # A second round now is skipped, nothing queued.
    with django_capture_on_commit_callbacks(execute=True):
        again = client.post(url, {}, format="json")
    assert again.status_code == 409
    assert again.json()["detail"].startswith("skipped: round 1 of this campaign is still")
    assert sent == [round_obj.pk]
    # Cancel: the round and its running run.
    cancelled = client.post(reverse("training:api-round-cancel", args=[round_obj.pk]))
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    run.refresh_from_db()
    assert run.cancel_requested is True
    # Cancelling again answers the same, changes nothing.
    assert client.post(reverse("training:api-round-cancel", args=[round_obj.pk])).status_code == 200


def test_a_refused_setting_names_its_field(team):
    client = api_as(team.ml)
    url = reverse("training:api-rounds", args=[team.campaign.slug])
    response = client.post(url, {"config": {"kl_coef": -1}}, format="json")
    assert response.status_code == 400
    assert response.json()["field"] == "config.kl_coef"
    assert "kl_coef: must be positive" in response.json()["detail"]
    unknown = client.post(url, {"config": {"learning_rat": 1e-4}}, format="json")
    assert unknown.status_code == 400
    assert "learning_rat: not a round setting" in unknown.json()["detail"]
    not_an_object = client.post(url, {"config": [1, 2]}, format="json")
    assert not_an_object.status_code == 400
    assert "config" in not_an_object.json()
    assert not Round.objects.exists()


def test_schedule_get_and_put(team):
    client = api_as(team.ml)
    url = reverse("training:api-schedule", args=[team.campaign.slug])
    empty = client.get(url).json()
    assert empty["exists"] is False
    assert empty["enabled"] is False
    response = client.put(
        url,
        {"enabled": True, "min_new_judgments": 40, "config": {"strategy": "uncertainty"}},
        format="json",
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["exists"] is True
    assert body["min_new_judgments"] == 40
    assert body["config"]["strategy"] == "uncertainty"
    assert LoopSchedule.objects.get(campaign=team.campaign).enabled is True
    bad = client.put(
        url,
        {"enabled": True, "min_new_judgments": 5, "config": {"strategy": "vibes"}},
        format="json",
    )
    assert bad.status_code == 400
    assert bad.json()["field"] == "config.strategy"
    assert LoopSchedule.objects.get(campaign=team.campaign).min_new_judgments == 40


# -- runs ----------------------------------------------------------------------------------------


def test_runs_list_is_scoped_and_filtered(team):
    mine_old = make_run(team.campaign, RunKind.REWARD)
    mine_new = make_run(team.campaign, RunKind.DPO, status=RunStatus.RUNNING, progress=0.5)
    make_run(team.other, RunKind.REWARD)
    client = api_as(team.ml)
    url = reverse("training:api-runs")
    assert [r["id"] for r in client.get(url).json()] == [mine_new.pk, mine_old.pk]
    assert [r["id"] for r in client.get(url, {"kind": "dpo"}).json()] == [mine_new.pk]
    assert [r["id"] for r in client.get(url, {"status": "succeeded"}).json()] == [mine_old.pk]
    assert client.get(url, {"campaign": team.other.slug}).json() == []
    assert client.get(url, {"status": "exploded"}).status_code == 400
    assert client.get(url, {"limit": 1}).json()[0]["progress"] == 0.5
    assert api_as(team.rater).get(url).json() == []


def test_run_detail_and_incremental_metrics(team):
    version = make_lineage(team.campaign, depth=1).policies[0]
    run = version.run
    assert run is not None
    add_metrics(run, range(1, 6), ("loss", "kl"))
    client = api_as(team.ml)
    detail = client.get(reverse("training:api-run", args=[run.pk])).json()
    assert detail["model_versions"] == [version.pk]
    assert detail["dataset_sha256"] == "cd" * 32
    assert detail["input_version"] == version.parent_id
    metrics_url = reverse("training:api-run-metrics", args=[run.pk])
    everything = client.get(metrics_url).json()
    assert set(everything) == {"loss", "kl"}
    assert [step for step, _ in everything["loss"]] == [1, 2, 3, 4, 5]
    assert everything["loss"][0][1] == pytest.approx(0.5)
    # A poller asks only for what it has not seen.
    RunMetric.objects.create(run=run, step=6, name="loss", value=0.1)
    assert client.get(metrics_url, {"since": 5}).json() == {"loss": [[6, 0.1]]}
    assert client.get(metrics_url, {"since": 6}).json() == {}
    assert client.get(metrics_url, {"since": -1}).status_code == 400


def test_run_cancel(team):
    queued = make_run(team.campaign, RunKind.REWARD, status=RunStatus.QUEUED)
    running = make_run(team.campaign, RunKind.DPO, status=RunStatus.RUNNING)
    client = api_as(team.ml)
    body = client.post(reverse("training:api-run-cancel", args=[queued.pk])).json()
    assert body["status"] == "cancelled"
    body = client.post(reverse("training:api-run-cancel", args=[running.pk])).json()
    assert body["status"] == "running"
    assert body["cancel_requested"] is True


# -- models --------------------------------------------------------------------------------------


def test_versions_list_and_lineage(team):
    lineage = make_lineage(team.campaign, depth=3)
    make_lineage(team.other, depth=1)
    client = api_as(team.ml)
    listed = client.get(reverse("training:api-versions")).json()
    names = {v["name"] for v in listed}
    assert {p.name for p in lineage.policies} <= names
    assert lineage.base.name in names
    assert not any(v["campaign"] == team.other.slug for v in listed)
    rewards = client.get(reverse("training:api-versions"), {"kind": "reward"}).json()
    assert {v["kind"] for v in rewards} == {"reward"}
    newest = lineage.policies[-1]
    prompt = Prompt.objects.filter(campaign=team.campaign).first()
    assert prompt is not None
    answer(prompt, newest, "hello")
    body = client.get(reverse("training:api-version", args=[newest.pk])).json()
    assert [v["id"] for v in body["lineage"]] == [
        lineage.policies[1].pk,
        lineage.policies[0].pk,
        lineage.base.pk,
    ]
    assert all(v["visible"] for v in body["lineage"])
    assert body["round"] == lineage.rounds[-1].pk
    assert body["snapshot"] == {
        "judgment_cutoff": 30,
        "dataset_sha256": "cd" * 32,
        "dataset_pairs": 15,
    }
    assert body["use"] == {"completions": 1, "comparisons": 0, "judgments": 0}
    middle = client.get(reverse("training:api-version", args=[lineage.policies[1].pk])).json()
    assert [v["id"] for v in middle["children"]] == [newest.pk]
    base = client.get(reverse("training:api-version", args=[lineage.base.pk])).json()
    assert base["run"] is None
    assert base["snapshot"] is None
    assert base["campaign"] is None
    # A base model is no secret to anyone who trains, but not shown to a mere rater.
    assert (
        api_as(team.other_ml)
        .get(reverse("training:api-version", args=[lineage.base.pk]))
        .status_code
        == 200
    )
    assert (
        api_as(team.rater).get(reverse("training:api-version", args=[lineage.base.pk])).status_code
        == 404
    )


def test_superuser_reads_everything(team):
    make_run(team.other)
    superuser = UserFactory(is_superuser=True, is_staff=True)
    listed = api_as(superuser).get(reverse("training:api-runs")).json()
    assert {r["campaign"] for r in listed} == {team.other.slug}


def test_schema_stays_valid_with_the_training_api(tmp_path):
    out = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))
    text = out.read_text()
    for path in (
        "/api/training/campaigns/{slug}/rounds/",
        "/api/training/runs/{run_id}/metrics/",
        "/api/training/models/{version_id}/",
    ):
        assert path in text
