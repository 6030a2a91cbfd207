"""The whole loop in a real browser with a real worker (PostgreSQL, headless Chromium).

A rater judges comparisons with the keyboard; ML staff start a round from the form; a real
Celery worker process trains a reward model and a DPO policy (tiny model), generates and
evaluates; the round page follows it live to "succeeded" without a reload, and the new
comparisons are in the campaign for the rater.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.db import connection

from annotation.models import Comparison, Judgment, Role
from tests.annotation.test_browser_rater import (  # noqa: F401  (fixtures)
    browser,
    session_factory,
)
from tests.factories import MembershipFactory, UserFactory
from tests.training.helpers import tiny_base_model
from tests.training.test_worker_kill import Worker, broker, wait_for, worker  # noqa: F401
from training.models import Round, RunStatus

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def to_worker(broker, monkeypatch) -> Iterator[Callable[[int], None]]:  # noqa: F811
    """The web process sends ``advance_round`` into the test worker's broker folder."""
    from kombu import Connection

    from training import tasks

    conn = Connection("filesystem://", transport_options=broker)
    send = lambda round_id: tasks.advance_round.apply_async(args=(round_id,), connection=conn)  # noqa: E731
    monkeypatch.setattr(tasks.advance_round, "delay", send)
    try:
        yield send
    finally:
        conn.release()


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the worker needs PostgreSQL")
def test_rate_then_start_a_round_and_watch_it_finish(
    session_factory,  # noqa: F811
    worker: Worker,  # noqa: F811
    to_worker,
    tmp_path: Path,
) -> None:
    from tests.conftest import make_campaign

    base = tiny_base_model(tmp_path / "base")
    campaign = make_campaign(comparisons=4, overlap=1)
    rater, ml = UserFactory(), UserFactory()
    MembershipFactory(campaign=campaign, user=rater, role=Role.RATER)
    MembershipFactory(campaign=campaign, user=ml, role=Role.ML_STAFF)

    # The rater judges every comparison with the keyboard.
    r = session_factory()
    r.login(rater.username)
    r.open_campaign(campaign)
    for _ in range(4):
        card = r.card_id()
        assert card is not None
        r.page.keyboard.press("1")
        r.page.keyboard.press("Enter")
        r.wait_for_next(card)
    assert Judgment.objects.filter(campaign=campaign, rater=rater).count() == 4
    before = Comparison.objects.filter(campaign=campaign).count()

    # ML staff start a round from the form.
    s = session_factory()
    s.login(ml.username)
    page = s.page
    page.goto(f"{s.base_url}/training/campaigns/{campaign.slug}/")
    form = "#start-round form.round-form"
    page.wait_for_selector(form)
    for name, value in (
        ("policy_model", str(base)),
        ("reward_steps", "3"),
        ("policy_steps", "2"),
        ("batch_size", "2"),
        ("max_new_tokens", "6"),
        ("eval_prompts", "2"),
        ("device", "cpu"),
    ):
        page.fill(f"{form} [name={name}]", value)
    page.click(f"{form} button[type=submit]")
    page.wait_for_selector("#round-live")
    made = Round.objects.get(campaign=campaign)
    page.evaluate("window.__marker = 'still-here'")

    # The worker does the rest; the page follows without a reload.
    def terminal() -> Round | None:
        row = Round.objects.get(pk=made.pk)
        return row if row.is_terminal else None

    done = wait_for("the round to finish", terminal, worker, timeout=420)
    assert isinstance(done, Round)
    assert done.status == RunStatus.SUCCEEDED, f"{done.error}\n{worker.text()[-3000:]}"
    page.wait_for_selector("#round-live[data-status='succeeded']", timeout=15_000)
    assert page.get_attribute("#round-live", "hx-trigger") is None
    assert page.evaluate("window.__marker") == "still-here", "the page was reloaded"
    assert s.violations() == []

    # The new policy's candidates are new comparisons, and the rater gets them.
    assert Comparison.objects.filter(campaign=campaign).count() == before + done.comparisons_created
    assert done.comparisons_created > 0
    r.page.goto(f"{r.base_url}/rate/{campaign.slug}/")
    r.page.wait_for_selector("form.judge")
    assert r.violations() == []
