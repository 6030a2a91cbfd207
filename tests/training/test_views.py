"""The ML staff pages: who gets in, what each page shows (escaped), the live partials and when
they stop polling, the writes through the real services, and flat query counts.

The training rows are made directly (what a worker would have written); the writes go through
the real ``rounds`` / ``runs`` services, with the enqueue captured on commit."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from annotation.models import Campaign, Completion, Prompt, Role, Source, SourceKind, Split
from annotation.services.items import PairSpec, comparisons_create
from tests.conftest import make_campaign
from tests.factories import MembershipFactory, UserFactory
from tests.training.helpers import judge, judged_campaign
from training import selectors
from training.models import (
    LoopSchedule,
    ModelKind,
    ModelVersion,
    Round,
    RoundStage,
    RunKind,
    RunMetric,
    RunStatus,
    TrainingRun,
)

pytestmark = pytest.mark.django_db

XSS = "<script>alert('x')</script><img src=x onerror=alert(1)>"


@pytest.fixture(autouse=True)
def _settings(settings, tmp_path: Path) -> None:
    settings.ARTIFACTS_ROOT = tmp_path / "artifacts"
    # A model path the round service accepts without the demo model being installed.
    settings.LOOP_POLICY_MODEL = str(tmp_path / "base-model")
    settings.LOOP_CRITIC_MODEL = ""


# -- building what a worker would have written ---------------------------------------------------


@dataclass
class Team:
    campaign: Campaign
    other: Campaign
    ml: Any
    admin: Any
    rater: Any
    outsider: Any
    other_ml: Any


def make_team() -> Team:
    campaign = judged_campaign(comparisons=3, overlap=1)
    other = make_campaign(comparisons=1)
    ml, admin, rater, outsider, other_ml = (UserFactory() for _ in range(5))
    MembershipFactory(campaign=campaign, user=ml, role=Role.ML_STAFF)
    MembershipFactory(campaign=campaign, user=admin, role=Role.ADMIN)
    MembershipFactory(campaign=campaign, user=rater, role=Role.RATER)
    MembershipFactory(campaign=other, user=other_ml, role=Role.ML_STAFF)
    return Team(campaign, other, ml, admin, rater, outsider, other_ml)


@pytest.fixture
def team() -> Team:
    return make_team()


def make_run(campaign: Campaign, kind: str = RunKind.REWARD, **fields: Any) -> TrainingRun:
    fields.setdefault("status", RunStatus.SUCCEEDED)
    return TrainingRun.objects.create(campaign=campaign, kind=kind, **fields)


def add_metrics(run: TrainingRun, steps: range, names: tuple[str, ...] = ("loss",)) -> None:
    RunMetric.objects.bulk_create(
        RunMetric(run=run, step=step, name=name, value=1.0 / (step + 1) + i)
        for step in steps
        for i, name in enumerate(names)
    )


def make_round(campaign: Campaign, number: int | None = None, **fields: Any) -> Round:
    """A round (succeeded unless told); ``number`` defaults to the campaign's next one."""
    fields.setdefault("status", RunStatus.SUCCEEDED)
    fields.setdefault("stage", RoundStage.DONE)
    if number is None:
        number = Round.objects.filter(campaign=campaign).count() + 1
    return Round.objects.create(campaign=campaign, number=number, **fields)


@dataclass
class Lineage:
    base: ModelVersion
    reward: ModelVersion
    policies: list[ModelVersion]  # oldest first
    rounds: list[Round]


def make_lineage(campaign: Campaign, depth: int = 2) -> Lineage:
    """The campaign's base model (registered once), then ``depth`` more rounds, each with a
    reward model and a DPO policy whose parent is the previous policy and whose outputs have
    a Source of their own (no completions: tests add those with ``answer``)."""
    name = f"base:tiny-{campaign.pk}"
    base = ModelVersion.objects.filter(name=name).first() or ModelVersion.objects.create(
        kind=ModelKind.POLICY,
        name=name,
        base_model="/models/tiny",
        artifact="/models/tiny",
        source=Source.objects.create(name=name, kind=SourceKind.POLICY),
    )
    parent, policies, made_rounds, reward = base, [], [], base
    for _ in range(depth):
        round_obj = make_round(campaign, policy_before=parent)
        number = round_obj.number
        reward_run = make_run(
            campaign,
            RunKind.REWARD,
            round=round_obj,
            judgment_cutoff=10 * number,
            dataset_sha256="ab" * 32,
            dataset_pairs=5 * number,
        )
        reward = ModelVersion.objects.create(
            kind=ModelKind.REWARD,
            name=f"reward-{campaign.pk}-{number}",
            artifact="/a",
            run=reward_run,
            metrics={"eval_accuracy": 0.7},
        )
        policy_run = make_run(
            campaign,
            RunKind.DPO,
            round=round_obj,
            input_version=parent,
            judgment_cutoff=10 * number,
            dataset_sha256="cd" * 32,
            dataset_pairs=5 * number,
        )
        source = Source.objects.create(
            name=f"policy-{campaign.pk}-{number}", kind=SourceKind.POLICY
        )
        policy = ModelVersion.objects.create(
            kind=ModelKind.POLICY,
            name=f"policy-{campaign.pk}-{number}",
            artifact="/p",
            run=policy_run,
            parent=parent,
            source=source,
            metrics={"win_rate": 0.5 + number / 10, "kl": 0.1 * number},
        )
        Round.objects.filter(pk=round_obj.pk).update(reward_version=reward, policy_version=policy)
        policies.append(policy)
        made_rounds.append(round_obj)
        parent = policy
    return Lineage(base=base, reward=reward, policies=policies, rounds=made_rounds)


def answer(prompt: Prompt, version: ModelVersion, text: str) -> Completion:
    assert version.source is not None
    return Completion.objects.create(prompt=prompt, source=version.source, text=text)


def client_for(user: Any = None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def html_of(response) -> str:
    return response.content.decode()


# -- who gets in ---------------------------------------------------------------------------------


def _pages(team: Team) -> dict[str, str]:
    run = make_run(team.campaign)
    round_obj = make_round(team.campaign)
    lineage = make_lineage(team.campaign, depth=1)
    policy = lineage.policies[0]
    return {
        "campaign": reverse("training:campaign", args=[team.campaign.slug]),
        "round_new": reverse("training:round_new", args=[team.campaign.slug]),
        "run": reverse("training:run", args=[run.pk]),
        "run_live": reverse("training:run_live", args=[run.pk]),
        "round": reverse("training:round", args=[round_obj.pk]),
        "round_live": reverse("training:round_live", args=[round_obj.pk]),
        "version": reverse("training:version", args=[policy.pk]),
    }


def test_campaign_scoped_pages_follow_the_campaign_roles(team):
    pages = _pages(team)
    readers = {"ml": team.ml, "admin": team.admin}
    for name, url in pages.items():
        for who, user in readers.items():
            expected = 403 if (name == "round_new" and who == "admin") else 200
            assert client_for(user).get(url).status_code == expected, (name, who)
        assert client_for(team.rater).get(url).status_code == 403, name
        assert client_for(team.outsider).get(url).status_code == 404, name
        # ML staff of another campaign: this campaign does not exist for them.
        assert client_for(team.other_ml).get(url).status_code == 404, name
        anonymous = client_for().get(url)
        assert anonymous.status_code == 302
        assert anonymous["Location"].startswith(reverse("login"))


def test_only_ml_staff_may_start_cancel_or_schedule(team, django_capture_on_commit_callbacks):
    run = make_run(team.campaign, status=RunStatus.QUEUED)
    round_obj = make_round(team.campaign, status=RunStatus.RUNNING, stage=RoundStage.REWARD)
    writes = [
        reverse("training:round_new", args=[team.campaign.slug]),
        reverse("training:schedule", args=[team.campaign.slug]),
        reverse("training:run_cancel", args=[run.pk]),
        reverse("training:round_cancel", args=[round_obj.pk]),
    ]
    for url in writes:
        assert client_for(team.admin).post(url, {}).status_code == 403, url
        assert client_for(team.rater).post(url, {}).status_code == 403, url
        assert client_for(team.outsider).post(url, {}).status_code == 404, url
    run.refresh_from_db()
    round_obj.refresh_from_db()
    assert run.status == RunStatus.QUEUED
    assert round_obj.status == RunStatus.RUNNING
    assert not LoopSchedule.objects.exists()


def test_writes_need_the_csrf_token(team):
    run = make_run(team.campaign, status=RunStatus.QUEUED)
    client = Client(enforce_csrf_checks=True)
    client.force_login(team.ml)
    assert client.post(reverse("training:run_cancel", args=[run.pk])).status_code == 403
    run.refresh_from_db()
    assert run.status == RunStatus.QUEUED


def test_top_bar_links_to_training_for_those_who_train_only(team):
    home = reverse("annotation:home")
    assert reverse("training:index") in html_of(client_for(team.ml).get(home))
    assert reverse("training:index") in html_of(client_for(team.admin).get(home))
    assert reverse("training:index") not in html_of(client_for(team.rater).get(home))
    superuser = UserFactory(is_superuser=True, is_staff=True)
    assert reverse("training:index") in html_of(client_for(superuser).get(home))


# -- the runs list -------------------------------------------------------------------------------


def test_index_lists_only_the_callers_campaigns_newest_first_with_filters(team):
    old = make_run(team.campaign, RunKind.REWARD)
    new = make_run(
        team.campaign, RunKind.DPO, status=RunStatus.RUNNING, progress=0.25, step=5, total_steps=20
    )
    hidden = make_run(team.other, RunKind.REWARD)
    round_obj = make_round(team.campaign, number=3)
    TrainingRun.objects.filter(pk=old.pk).update(round=round_obj)
    html = html_of(client_for(team.ml).get(reverse("training:index")))
    run_links = re.findall(r'href="/training/runs/(\d+)/"', html)
    assert run_links == [str(new.pk), str(old.pk)]
    assert str(hidden.pk) not in run_links
    assert 'class="badge badge-running"' in html
    assert 'value="0.2500"' in html
    assert "step 5 of 20" in html
    assert reverse("training:round", args=[round_obj.pk]) in html
    # Filters: by kind, by status, by campaign; a campaign the caller cannot see is refused.
    client = client_for(team.ml)
    by_kind = html_of(client.get(reverse("training:index"), {"kind": "reward"}))
    assert re.findall(r'href="/training/runs/(\d+)/"', by_kind) == [str(old.pk)]
    by_status = html_of(client.get(reverse("training:index"), {"status": "running"}))
    assert re.findall(r'href="/training/runs/(\d+)/"', by_status) == [str(new.pk)]
    by_campaign = client.get(reverse("training:index"), {"campaign": team.campaign.slug})
    assert by_campaign.status_code == 200
    refused = client.get(reverse("training:index"), {"campaign": team.other.slug})
    assert refused.status_code == 400
    assert "/training/runs/" not in html_of(refused).split('id="runs"')[1].split("</form>")[1]


def test_index_query_count_does_not_grow_with_runs_and_rounds(team, django_assert_max_num_queries):
    def count() -> int:
        with CaptureQueriesContext(connection) as ctx:
            assert client_for(team.ml).get(reverse("training:index")).status_code == 200
        return len(ctx.captured_queries)

    make_run(team.campaign, round=make_round(team.campaign, 1))
    few = count()
    for number in range(2, 12):
        round_obj = make_round(team.campaign, number)
        for kind in (RunKind.REWARD, RunKind.DPO, RunKind.GENERATE):
            make_run(team.campaign, kind, round=round_obj)
    assert count() == few
    client = client_for(team.ml)
    with django_assert_max_num_queries(8):
        client.get(reverse("training:index"))


# -- a run's page ---------------------------------------------------------------------------------


def test_run_page_shows_state_snapshot_config_and_escapes_log_and_error(team):
    version = make_lineage(team.campaign, depth=1).policies[0]
    run = version.run
    assert run is not None
    TrainingRun.objects.filter(pk=run.pk).update(
        status=RunStatus.FAILED,
        error=f"boom {XSS}",
        log_tail=f"step 1\n{XSS}\n",
        config={"learning_rate": 5e-5, "note": XSS},
        attempts=2,
        worker="host:42",
        total_steps=10,
        step=10,
        progress=1.0,
        started_at=timezone.now() - timedelta(seconds=90),
        finished_at=timezone.now(),
        results={"eval_accuracy": 0.8125, "pairs": 12},
    )
    html = html_of(client_for(team.ml).get(reverse("training:run", args=[run.pk])))
    assert "<script>alert" not in html
    assert "onerror=alert(1)>" not in html
    assert (
        html.count("&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;") == 3
    )  # error, log, config
    assert '<pre class="log-tail">' in html
    assert "2 of 3" in html
    assert "host:42" in html
    assert "judgment #10" in html
    assert "cd" * 32 in html
    assert reverse("training:version", args=[version.pk]) in html  # the model it made
    assert reverse("training:round", args=[run.round_id]) in html
    assert "badge-failed" in html
    results = html.split('class="data figures run-results"')[1].split("</table>")[0]
    assert "eval_accuracy</th><td>0.812" in results
    # Terminal: the live part is not polled.
    assert "hx-trigger" not in html


def test_live_partial_polls_while_active_and_stops_once_terminal(team):
    run = make_run(
        team.campaign,
        RunKind.DPO,
        status=RunStatus.RUNNING,
        step=3,
        total_steps=12,
        progress=0.25,
        heartbeat_at=timezone.now(),
        worker="w:1",
    )
    add_metrics(run, range(1, 4), ("loss", "kl", f"odd{XSS}"))
    client = client_for(team.ml)
    page = html_of(client.get(reverse("training:run", args=[run.pk])))
    live_url = reverse("training:run_live", args=[run.pk])
    assert f'hx-get="{live_url}" hx-trigger="every 2s" hx-swap="outerHTML"' in page
    assert 'name="csrfmiddlewaretoken"' in page
    assert "Cancel run" in page
    partial = html_of(client.get(live_url))
    assert partial.lstrip().startswith('<section id="run-live"')
    assert "<html" not in partial
    assert 'hx-trigger="every 2s"' in partial
    assert 'value="0.2500"' in partial
    assert re.findall(r'data-metric="([^"]+)"', partial) == [
        "loss",
        "kl",
        "odd&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;",
    ]
    assert partial.count("<polyline") == 3
    assert "<script>" not in partial
    # The worker finishes: the next poll answers without a trigger, so polling stops.
    TrainingRun.objects.filter(pk=run.pk).update(
        status=RunStatus.SUCCEEDED, step=12, progress=1.0, finished_at=timezone.now()
    )
    add_metrics(run, range(4, 13), ("loss",))
    done = html_of(client.get(live_url))
    assert "hx-trigger" not in done
    assert "hx-get" not in done
    assert 'value="1.0000"' in done
    assert "badge-succeeded" in done
    assert "Cancel run" not in done
    assert 'data-points="12"' in done  # the loss plot grew with the new rows


def test_live_partial_reads_a_bounded_number_of_metric_rows(team, django_assert_max_num_queries):
    run = make_run(team.campaign, RunKind.DPO, status=RunStatus.RUNNING, total_steps=3000)
    add_metrics(run, range(1, 3001), ("loss", "kl"))
    url = reverse("training:run_live", args=[run.pk])
    client = client_for(team.ml)
    with CaptureQueriesContext(connection) as ctx:
        html = html_of(client.get(url))
    assert len(ctx.captured_queries) <= 8
    points = [int(n) for n in re.findall(r'data-points="(\d+)"', html)]
    assert len(points) == 2
    assert all(300 <= n <= 700 for n in points), points
    with django_assert_max_num_queries(8):
        client.get(url)


def test_heartbeat_age_is_shown_and_a_stale_one_flagged(team, settings):
    run = make_run(
        team.campaign,
        status=RunStatus.RUNNING,
        heartbeat_at=timezone.now()
        - timedelta(seconds=settings.TRAINING_HEARTBEAT_STALE_SECONDS + 30),
    )
    html = html_of(client_for(team.ml).get(reverse("training:run_live", args=[run.pk])))
    assert "(stale)" in html
    assert 'class="stale"' in html


def test_cancel_ends_a_queued_run_and_asks_a_running_one_to_stop(team):
    queued = make_run(team.campaign, RunKind.REWARD, status=RunStatus.QUEUED)
    running = make_run(team.campaign, RunKind.DPO, status=RunStatus.RUNNING)
    client = client_for(team.ml)
    response = client.post(reverse("training:run_cancel", args=[queued.pk]))
    assert response.status_code == 302
    assert response["Location"] == reverse("training:run", args=[queued.pk])
    queued.refresh_from_db()
    assert queued.status == RunStatus.CANCELLED
    client.post(reverse("training:run_cancel", args=[running.pk]))
    running.refresh_from_db()
    assert running.status == RunStatus.RUNNING
    assert running.cancel_requested is True
    html = html_of(client.get(reverse("training:run", args=[running.pk])))
    assert "stopping…" in html
    # GET never cancels.
    assert client.get(reverse("training:run_cancel", args=[running.pk])).status_code == 405


# -- a campaign's training page, starting rounds, the schedule ------------------------------------


def test_campaign_page_shows_policy_rounds_schedule_and_the_round_form(team):
    lineage = make_lineage(team.campaign, depth=2)
    LoopSchedule.objects.create(
        campaign=team.campaign, enabled=True, min_new_judgments=50, last_message=f"waiting {XSS}"
    )
    html = html_of(client_for(team.ml).get(reverse("training:campaign", args=[team.campaign.slug])))
    assert reverse("training:version", args=[lineage.policies[-1].pk]) in html  # current policy
    for round_obj in lineage.rounds:
        assert reverse("training:round", args=[round_obj.pk]) in html
    assert "waiting &lt;script&gt;" in html
    assert "<script>alert" not in html
    # One field per round setting, with the service's defaults.
    from training.services import rounds

    for name in rounds.ROUND_CONFIG_FIELDS:
        assert f'name="{name}"' in html, name
        assert f'name="schedule-{name}"' in html, name
    assert '<option value="ppo">' in html
    assert '<option value="dpo" selected>' in html
    # Admins read the page without the forms.
    admin_html = html_of(
        client_for(team.admin).get(reverse("training:campaign", args=[team.campaign.slug]))
    )
    assert 'name="kl_coef"' not in admin_html
    assert reverse("annotation:campaign_detail", args=[team.campaign.slug]) in admin_html


def _round_form(**changes: Any) -> dict[str, Any]:
    from training.services import rounds

    data: dict[str, Any] = {}
    for name, (kind, default, _) in rounds.ROUND_CONFIG_FIELDS.items():
        if kind is bool:
            if default:
                data[name] = "on"
        else:
            data[name] = default
    for name, value in changes.items():
        if value is None:
            data.pop(name, None)
        else:
            data[name] = value
    return data


def test_starting_a_round_creates_it_and_enqueues_after_commit(
    team, monkeypatch, django_capture_on_commit_callbacks
):
    from training import tasks

    sent: list[int] = []
    monkeypatch.setattr(tasks.advance_round, "delay", sent.append)
    url = reverse("training:round_new", args=[team.campaign.slug])
    with django_capture_on_commit_callbacks(execute=True):
        response = client_for(team.ml).post(
            url, _round_form(algorithm="ppo", kl_coef="0.05", policy_steps="3", lora=None)
        )
    round_obj = Round.objects.get(campaign=team.campaign)
    assert response.status_code == 302
    assert response["Location"] == reverse("training:round", args=[round_obj.pk])
    assert sent == [round_obj.pk]
    assert round_obj.config["algorithm"] == "ppo"
    assert round_obj.config["kl_coef"] == 0.05
    assert round_obj.config["policy_steps"] == 3
    assert round_obj.config["lora"] is False
    assert round_obj.created_by == team.ml
    assert round_obj.status == RunStatus.QUEUED


def test_a_refused_setting_comes_back_on_its_field(team, django_capture_on_commit_callbacks):
    url = reverse("training:round_new", args=[team.campaign.slug])
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = client_for(team.ml).post(url, _round_form(kl_coef="-1", batch_size="0"))
    assert response.status_code == 400
    assert callbacks == []
    assert not Round.objects.exists()
    form = response.context["round_form"]
    assert form.errors["kl_coef"] == ["must be positive"]
    assert form.errors["batch_size"] == ["must be at least 1"]
    # Not a number at all: the form says so before the service is asked.
    response = client_for(team.ml).post(url, _round_form(policy_steps="many"))
    assert response.status_code == 400
    assert "policy_steps" in response.context["round_form"].errors


def test_a_second_round_while_one_runs_is_reported_skipped(team):
    make_round(team.campaign, number=1, status=RunStatus.RUNNING, stage=RoundStage.POLICY)
    response = client_for(team.ml).post(
        reverse("training:round_new", args=[team.campaign.slug]), _round_form()
    )
    assert response.status_code == 409
    assert "skipped: round 1 of this campaign is still running" in html_of(response)
    assert Round.objects.count() == 1


def test_a_campaign_without_judgments_cannot_start_a_round(team):
    ml = UserFactory()
    MembershipFactory(campaign=team.other, user=ml, role=Role.ML_STAFF)
    response = client_for(ml).post(
        reverse("training:round_new", args=[team.other.slug]), _round_form()
    )
    assert response.status_code == 400
    assert "no judgments yet" in html_of(response)


def test_schedule_form_saves_through_the_service(team):
    url = reverse("training:schedule", args=[team.campaign.slug])
    data = {"enabled": "on", "min_new_judgments": "25"}
    data.update({f"schedule-{k}": v for k, v in _round_form(strategy="uncertainty").items()})
    response = client_for(team.ml).post(url, data)
    assert response.status_code == 302
    schedule = LoopSchedule.objects.get(campaign=team.campaign)
    assert schedule.enabled is True
    assert schedule.min_new_judgments == 25
    assert schedule.config["strategy"] == "uncertainty"
    bad = client_for(team.ml).post(url, {**data, "min_new_judgments": "0"})
    assert bad.status_code == 400
    schedule.refresh_from_db()
    assert schedule.min_new_judgments == 25


# -- a round's page -------------------------------------------------------------------------------


def test_round_page_timeline_metrics_and_live_partial(team):
    round_obj = make_round(
        team.campaign,
        status=RunStatus.RUNNING,
        stage=RoundStage.GENERATE,
        metrics={"reward_accuracy": 0.75, "custom": "n/a"},
    )
    reward = make_run(team.campaign, RunKind.REWARD, round=round_obj)
    policy = make_run(team.campaign, RunKind.DPO, round=round_obj)
    generate = make_run(
        team.campaign,
        RunKind.GENERATE,
        round=round_obj,
        status=RunStatus.RUNNING,
        progress=0.5,
        step=4,
        total_steps=8,
    )
    add_metrics(policy, range(1, 6), ("loss", "reward"))
    client = client_for(team.ml)
    html = html_of(client.get(reverse("training:round", args=[round_obj.pk])))
    states = {s: v for v, s in re.findall(r'class="stage stage-(\w+)" data-stage="(\w+)"', html)}
    assert states == {
        "reward": "done",
        "policy": "done",
        "generate": "current",
        "critique": "pending",
        "evaluate": "pending",
    }
    for run in (reward, policy, generate):
        assert reverse("training:run", args=[run.pk]) in html
    assert "Reward model accuracy (held-out judgments)" in html
    assert "0.75" in html
    assert "n/a" in html
    assert f'data-run="{policy.pk}"' in html
    assert html.count("<polyline") == 2
    live_url = reverse("training:round_live", args=[round_obj.pk])
    assert f'hx-get="{live_url}" hx-trigger="every 2s"' in html
    Round.objects.filter(pk=round_obj.pk).update(
        status=RunStatus.SUCCEEDED,
        stage=RoundStage.DONE,
        completions_created=12,
        comparisons_created=6,
    )
    TrainingRun.objects.filter(pk=generate.pk).update(status=RunStatus.SUCCEEDED, progress=1.0)
    done = html_of(client.get(live_url))
    assert "hx-trigger" not in done
    states = {s: v for v, s in re.findall(r'class="stage stage-(\w+)" data-stage="(\w+)"', done)}
    assert states == {
        "reward": "done",
        "policy": "done",
        "generate": "done",
        "critique": "skipped",
        "evaluate": "skipped",
    }


def test_a_failed_round_shows_where_it_stopped_and_its_error(team):
    round_obj = make_round(
        team.campaign, status=RunStatus.FAILED, stage=RoundStage.POLICY, error=f"oops {XSS}"
    )
    make_run(team.campaign, RunKind.REWARD, round=round_obj)
    make_run(team.campaign, RunKind.DPO, round=round_obj, status=RunStatus.FAILED)
    html = html_of(client_for(team.ml).get(reverse("training:round", args=[round_obj.pk])))
    assert 'class="stage stage-stopped" data-stage="policy"' in html
    assert "oops &lt;script&gt;" in html
    assert "<script>alert" not in html


def test_round_cancel_goes_through_the_service(team):
    round_obj = make_round(team.campaign, status=RunStatus.RUNNING, stage=RoundStage.REWARD)
    run = make_run(team.campaign, RunKind.REWARD, round=round_obj, status=RunStatus.QUEUED)
    response = client_for(team.ml).post(reverse("training:round_cancel", args=[round_obj.pk]))
    assert response.status_code == 302
    round_obj.refresh_from_db()
    run.refresh_from_db()
    assert round_obj.status == RunStatus.CANCELLED
    assert run.status == RunStatus.CANCELLED


def test_round_page_query_count_is_flat(team, django_assert_max_num_queries):
    round_obj = make_round(team.campaign, status=RunStatus.RUNNING, stage=RoundStage.EVALUATE)
    for kind in (RunKind.REWARD, RunKind.DPO, RunKind.GENERATE, RunKind.CRITIQUE, RunKind.EVAL):
        add_metrics(make_run(team.campaign, kind, round=round_obj), range(1, 50), ("loss", "kl"))
    client = client_for(team.ml)
    with django_assert_max_num_queries(8):
        client.get(reverse("training:round_live", args=[round_obj.pk]))


# -- model versions -------------------------------------------------------------------------------


def test_version_page_shows_lineage_run_round_snapshot_and_use(team):
    lineage = make_lineage(team.campaign, depth=3)
    newest = lineage.policies[-1]
    prompt = Prompt.objects.filter(campaign=team.campaign).first()
    assert prompt is not None
    x = answer(prompt, newest, "one")
    y = answer(prompt, newest, "two")
    comparisons_create(
        campaign=team.campaign,
        pairs=[PairSpec(prompt_id=prompt.pk, completion_x=x.pk, completion_y=y.pk)],
    )
    judge(team.campaign, raters=1)
    html = html_of(client_for(team.ml).get(reverse("training:version", args=[newest.pk])))
    chain = re.findall(r'<li><a href="/training/models/(\d+)/">', html.split('id="lineage"')[1])
    # Oldest first down to the version itself: base, policy 1, policy 2.
    assert chain[:3] == [
        str(lineage.base.pk),
        str(lineage.policies[0].pk),
        str(lineage.policies[1].pk),
    ]
    assert reverse("training:round", args=[lineage.rounds[-1].pk]) in html
    assert "judgment #30" in html
    assert "cd" * 32 in html
    assert re.search(r'class="use-completions">2<', html)
    assert re.search(r'class="use-comparisons">1<', html)
    assert re.search(r'class="use-judgments">1<', html)
    # The middle policy lists its child.
    middle = html_of(
        client_for(team.ml).get(reverse("training:version", args=[lineage.policies[1].pk]))
    )
    assert reverse("training:version", args=[newest.pk]) in middle.split('id="lineage"')[1]


def test_lineage_query_count_does_not_grow_with_depth(team):
    def count(version: ModelVersion) -> int:
        with CaptureQueriesContext(connection) as ctx:
            response = client_for(team.ml).get(reverse("training:version", args=[version.pk]))
            assert response.status_code == 200
        return len(ctx.captured_queries)

    shallow = make_lineage(team.campaign, depth=1).policies[-1]
    other_campaign = judged_campaign(comparisons=1)
    MembershipFactory(campaign=other_campaign, user=team.ml, role=Role.ML_STAFF)
    deep = make_lineage(other_campaign, depth=8).policies[-1]
    assert len(selectors.version_ancestors(version=deep)) == 8
    assert count(deep) == count(shallow)


def test_a_version_of_another_campaign_is_named_in_a_lineage_but_not_linked(team):
    hidden = make_lineage(team.other, depth=1).policies[0]
    run = make_run(team.campaign, RunKind.DPO)
    child = ModelVersion.objects.create(
        kind=ModelKind.POLICY, name="child-of-hidden", artifact="/c", run=run, parent=hidden
    )
    html = html_of(client_for(team.ml).get(reverse("training:version", args=[child.pk])))
    assert hidden.name in html
    assert reverse("training:version", args=[hidden.pk]) not in html
    assert client_for(team.ml).get(reverse("training:version", args=[hidden.pk])).status_code == 404


def test_models_list_is_scoped_and_filters_by_kind(team):
    mine = make_lineage(team.campaign, depth=1)
    theirs = make_lineage(team.other, depth=1)

    def table(response) -> str:
        return html_of(response).split('id="versions"')[1].split("</table>")[0]

    html = table(client_for(team.ml).get(reverse("training:versions")))
    assert mine.policies[0].name in html
    assert mine.reward.name in html
    assert theirs.policies[0].name not in html
    assert mine.base.name in html  # base models are shared by everyone who trains
    rewards = table(client_for(team.ml).get(reverse("training:versions"), {"kind": "reward"}))
    assert mine.reward.name in rewards
    assert mine.policies[0].name not in rewards
    assert theirs.base.name in html  # a base model belongs to no campaign
    nobody = html_of(client_for(team.rater).get(reverse("training:versions")))
    assert mine.base.name not in nobody
    assert "No model versions yet." in nobody


def test_compare_shows_both_policies_outputs_on_the_same_prompts_escaped(team):
    lineage = make_lineage(team.campaign, depth=1)
    base, policy = lineage.base, lineage.policies[0]
    prompts = list(Prompt.objects.filter(campaign=team.campaign).order_by("id"))
    Prompt.objects.filter(pk=prompts[1].pk).update(split=Split.EVAL)
    for prompt in prompts[:2]:
        answer(prompt, base, f"base says {XSS}")
        answer(prompt, policy, f"policy says hi to prompt {prompt.pk}")
    answer(prompts[2], base, "only the base answered this one")
    response = client_for(team.ml).get(
        reverse("training:versions_compare"), {"a": base.pk, "b": policy.pk}
    )
    assert response.status_code == 200
    html = html_of(response)
    assert html.count('class="compared"') == 2
    assert "only the base answered" not in html
    # The held-out prompt comes first.
    assert html.index(f"prompt {prompts[1].pk}") < html.index(f"prompt {prompts[0].pk}")
    assert "<script>alert" not in html
    assert "base says &lt;script&gt;" in html
    assert "win_rate" in html
    assert "0.6" in html
    reward = client_for(team.ml).get(
        reverse("training:versions_compare"), {"a": base.pk, "b": lineage.reward.pk}
    )
    assert reward.status_code == 400
    assert "not a policy" in html_of(reward)
    hidden = make_lineage(team.other, depth=1).policies[0]
    assert (
        client_for(team.ml)
        .get(reverse("training:versions_compare"), {"a": base.pk, "b": hidden.pk})
        .status_code
        == 404
    )


def test_compare_query_count_is_flat(team, django_assert_max_num_queries):
    lineage = make_lineage(team.campaign, depth=1)
    for prompt in Prompt.objects.filter(campaign=team.campaign):
        for _ in range(3):
            answer(prompt, lineage.base, "b")
            answer(prompt, lineage.policies[0], "p")
    client = client_for(team.ml)
    with django_assert_max_num_queries(10):
        response = client.get(
            reverse("training:versions_compare"),
            {"a": lineage.base.pk, "b": lineage.policies[0].pk},
        )
    assert html_of(response).count('class="compared"') == 3


# -- selectors ------------------------------------------------------------------------------------


def test_metric_series_since_and_thinning_keep_the_last_step(team):
    run = make_run(team.campaign, RunKind.DPO)
    RunMetric.objects.bulk_create(
        [RunMetric(run=run, step=s, name="loss", value=float(s)) for s in range(10, 10001, 10)]
        + [RunMetric(run=run, step=s, name="eval", value=float(s)) for s in (500, 1000)]
    )
    full = selectors.metric_series(run_ids=[run.pk])[run.pk]
    assert len(full["loss"]) == 1000
    assert full["eval"] == [(500, 500.0), (1000, 1000.0)]
    newer = selectors.metric_series(run_ids=[run.pk], since=9980)[run.pk]
    assert newer == {"loss": [(9990, 9990.0), (10000, 10000.0)]}
    thin = selectors.metric_series(run_ids=[run.pk], max_points=100)[run.pk]
    steps = [s for s, _ in thin["loss"]]
    assert 90 <= len(steps) <= 110
    assert steps[-1] == 10000
    assert steps == sorted(steps)
    assert thin["eval"] == full["eval"]  # a short series is left whole


def test_campaign_page_query_count_does_not_grow_with_rounds(team):
    def count() -> int:
        client = client_for(team.ml)
        with CaptureQueriesContext(connection) as ctx:
            response = client.get(reverse("training:campaign", args=[team.campaign.slug]))
            assert response.status_code == 200
        return len(ctx.captured_queries)

    make_lineage(team.campaign, depth=1)
    few = count()
    make_lineage(team.campaign, depth=6)
    make_run(team.campaign, RunKind.GENERATE, status=RunStatus.RUNNING)
    make_run(team.campaign, RunKind.EVAL, status=RunStatus.QUEUED)
    assert count() == few
