"""The closed loop end to end, with a real Celery worker process on PostgreSQL.

Judgments in a campaign -> a round is triggered -> the worker trains a reward model and a
DPO policy (tiny model), generates candidates and builds comparisons, evaluates -> the new
comparisons are in the campaign, and every link of the lineage holds: a new comparison's
completion leads to the policy version that wrote it, the run that trained it, the round,
and the judgment snapshot it learned from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.db import connection

from annotation.models import Comparison, Judgment
from tests.training.helpers import judged_campaign, tiny_base_model
from tests.training.test_round_tiny import TINY_ROUND
from tests.training.test_worker_kill import Worker, broker, wait_for, worker  # noqa: F401
from training.models import ModelVersion, Round, RunStatus
from training.services import rounds

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def send_advance(broker) -> Iterator[Callable[[int], None]]:  # noqa: F811
    from kombu import Connection

    from training.tasks import advance_round

    conn = Connection("filesystem://", transport_options=broker)
    try:
        yield lambda round_id: advance_round.apply_async(args=(round_id,), connection=conn)
    finally:
        conn.release()


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the worker needs PostgreSQL")
def test_a_round_runs_in_the_worker_and_its_comparisons_reach_the_campaign(
    worker: Worker,  # noqa: F811
    send_advance,
    tmp_path: Path,
) -> None:
    base = tiny_base_model(tmp_path / "base")
    campaign = judged_campaign(comparisons=4)
    before = set(Comparison.objects.filter(campaign=campaign).values_list("pk", flat=True))
    made = rounds.round_create(
        campaign=campaign,
        config={**TINY_ROUND, "policy_model": str(base), "strategy": "new_vs_previous"},
        enqueue=send_advance,
    )
    # on_commit ran at once: this test runs in autocommit (transaction=True).

    def finished() -> Round | None:
        row = Round.objects.get(pk=made.pk)
        return row if row.is_terminal else None

    done = wait_for("the round to finish", finished, worker, timeout=420)
    assert isinstance(done, Round)
    assert done.status == RunStatus.SUCCEEDED, f"{done.error}\n{worker.text()[-3000:]}"
    assert done.stage == "done"
    runs = {r.kind: r for r in done.runs.all()}
    assert set(runs) == {"reward", "dpo", "generate", "eval"}
    assert all(r.status == RunStatus.SUCCEEDED and r.attempts == 1 for r in runs.values())
    assert all(r.worker.split(":")[-1] != "" for r in runs.values())

    new = Comparison.objects.filter(campaign=campaign).exclude(pk__in=before)
    assert new.count() == done.comparisons_created > 0
    assert all(c.slots.count() == c.judgments_wanted for c in new)
    comparison = new.select_related("completion_a__source", "completion_b__source").first()
    sources = {comparison.completion_a.source, comparison.completion_b.source}
    writer = ModelVersion.objects.get(source__in=sources, run__isnull=False)
    # Lineage: completion -> version -> run -> round -> judgments it learned from.
    assert writer == done.policy_version
    assert writer.run == runs["dpo"]
    assert writer.run.round == done
    assert writer.parent == done.policy_before
    assert writer.parent.name.startswith("base:")
    assert writer.run.judgment_cutoff == done.judgment_cutoff
    assert writer.run.dataset_pairs > 0
    assert len(writer.run.dataset_sha256) == 64
    learned = Judgment.objects.filter(campaign=campaign, id__lte=done.judgment_cutoff).count()
    assert learned == Judgment.objects.filter(campaign=campaign).count()
    assert Path(writer.artifact, "config.json").is_file()
    assert {"kl", "win_rate", "reward_accuracy"} <= set(done.metrics)
