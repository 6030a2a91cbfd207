"""Starting a round in a real browser and watching it live (headless Chromium through
Playwright, with the fixtures of ``tests.annotation.test_browser_rater``).

The worker is played by the test: it writes the rows a worker would (the round running, its
reward run's progress and metrics, then success), and the page must follow by itself through
its polled HTMX partial: the progress bar moves, a plot appears, the status turns succeeded and
polling stops, all without a page load, a CSP violation or a dialog.

Skipped when /usr/bin/chromium is missing or cannot start.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from django.utils import timezone

from annotation.models import Role
from tests.annotation.test_browser_rater import (  # noqa: F401  (fixtures)
    browser,
    session_factory,
)
from tests.factories import MembershipFactory, UserFactory
from tests.training.helpers import judged_campaign
from training.models import Round, RoundStage, RunKind, RunMetric, RunStatus, TrainingRun

pytestmark = pytest.mark.browser

PROGRESS = "#round-live .stage[data-stage='reward'] progress.run-progress"


def _progress(page) -> float | None:
    return page.evaluate(
        f'(() => {{ const p = document.querySelector("{PROGRESS}"); '
        "return p ? p.value : null; })()"
    )


def _metrics(run: TrainingRun, steps: range) -> None:
    RunMetric.objects.bulk_create(
        RunMetric(run=run, step=step, name=name, value=value)
        for step in steps
        for name, value in (("loss", 1.0 / step), ("accuracy", 0.5 + step / 100))
    )


def test_round_started_from_the_form_updates_live_without_reload(
    session_factory,  # noqa: F811  (the fixture imported above)
    transactional_db,
    monkeypatch,
    settings,
    tmp_path: Path,
):
    from training import tasks

    settings.ARTIFACTS_ROOT = tmp_path / "artifacts"
    settings.LOOP_POLICY_MODEL = str(tmp_path / "base-model")
    sent: list[int] = []
    # No broker in a test: record what would have been sent to the workers.
    monkeypatch.setattr(tasks.advance_round, "delay", sent.append)

    campaign = judged_campaign(comparisons=3, overlap=1)
    ml = UserFactory()
    MembershipFactory(campaign=campaign, user=ml, role=Role.ML_STAFF)

    s = session_factory()
    s.login(ml.username)
    page = s.page
    # The top bar leads to training, and from there to the campaign's training page.
    page.click(".topnav a[href='/training/']")
    page.click(f"a[href='/training/campaigns/{campaign.slug}/']")
    page.wait_for_selector("#start-round form.round-form")

    form = "#start-round form.round-form"
    page.select_option(f"{form} select[name=algorithm]", "ppo")
    page.fill(f"{form} input[name=kl_coef]", "0.05")
    page.fill(f"{form} input[name=policy_steps]", "2")
    page.uncheck(f"{form} input[name=lora]")
    page.click(f"{form} button[type=submit]")
    page.wait_for_selector("#round-live")

    round_obj = Round.objects.get(campaign=campaign)
    assert page.url.endswith(f"/training/rounds/{round_obj.pk}/")
    assert sent == [round_obj.pk]
    assert round_obj.config["algorithm"] == "ppo"
    assert round_obj.config["kl_coef"] == 0.05
    assert round_obj.config["policy_steps"] == 2
    assert round_obj.config["lora"] is False
    assert page.get_attribute("#round-live", "data-status") == "queued"
    assert page.get_attribute("#round-live", "hx-trigger") == "every 2s"
    page.evaluate("window.__marker = 'still-here'")
    loads = len(s.navigations)

    # The worker picks the round up and the reward run gets going.
    now = timezone.now()
    Round.objects.filter(pk=round_obj.pk).update(status=RunStatus.RUNNING, started_at=now)
    run = TrainingRun.objects.create(
        campaign=campaign,
        kind=RunKind.REWARD,
        round=round_obj,
        status=RunStatus.RUNNING,
        step=5,
        total_steps=20,
        progress=0.25,
        heartbeat_at=now,
        started_at=now,
        worker="test:1",
    )
    _metrics(run, range(1, 6))
    page.wait_for_selector("#round-live[data-status='running']", timeout=10_000)
    page.wait_for_function(
        f'() => {{ const p = document.querySelector("{PROGRESS}"); return p && p.value === 0.25; }}',
        timeout=10_000,
    )
    page.wait_for_selector(
        f"#round-live .run-plots[data-run='{run.pk}'] figure[data-metric='loss'] polyline",
        timeout=10_000,
    )
    assert page.get_attribute("figure[data-metric='loss']", "data-points") == "5"
    assert page.is_visible("figure[data-metric='accuracy']")

    # More steps: the bar and the plot follow.
    TrainingRun.objects.filter(pk=run.pk).update(
        step=15, progress=0.75, heartbeat_at=timezone.now()
    )
    _metrics(run, range(6, 16))
    page.wait_for_function(
        "() => { const f = document.querySelector(\"figure[data-metric='loss']\");"
        " return f && f.dataset.points === '15'; }",
        timeout=10_000,
    )
    assert _progress(page) == 0.75

    # The run and then the round finish: the status turns, and polling stops.
    TrainingRun.objects.filter(pk=run.pk).update(
        status=RunStatus.SUCCEEDED, step=20, progress=1.0, finished_at=timezone.now()
    )
    Round.objects.filter(pk=round_obj.pk).update(
        status=RunStatus.SUCCEEDED,
        stage=RoundStage.DONE,
        finished_at=timezone.now(),
        metrics={"reward_accuracy": 0.8125},
    )
    page.wait_for_selector("#round-live[data-status='succeeded']", timeout=10_000)
    assert _progress(page) == 1.0
    assert page.get_attribute("#round-live", "hx-trigger") is None
    assert page.is_visible("text=0.812")
    assert page.is_visible("#round-live .badge-succeeded")

    # Nothing else is fetched once the round is over.
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.wait_for_timeout(4500)
    assert [url for url in requests if "/live/" in url] == []

    assert page.evaluate("window.__marker") == "still-here", "the page was reloaded"
    assert len(s.navigations) == loads
    assert s.violations() == []
    assert s.dialogs == []
