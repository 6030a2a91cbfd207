"""TrainingRun's state machine, its dataset snapshot, and the Celery settings (R18-R20, R23)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from annotation.models import Judgment
from tests.conftest import make_campaign
from tests.training.helpers import add_judgments, judge, judged_campaign, tiny_base_model
from training.core.data import read_preference_jsonl
from training.models import ModelVersion, RunMetric, RunStatus, TrainingRun
from training.services import runs

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _artifacts(settings, tmp_path: Path) -> None:
    settings.ARTIFACTS_ROOT = tmp_path / "artifacts"


@pytest.fixture
def fake_train(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace the trainer; records the attempt number of every call."""
    calls: list[int] = []

    def train(*, run: TrainingRun, worker: str) -> dict[str, float]:
        calls.append(run.attempts)
        return {"eval_accuracy": 0.75}

    monkeypatch.setattr(runs, "_train", train)
    return calls


def _run(campaign, **fields) -> TrainingRun:
    run = runs.run_create(campaign=campaign, kind="reward", config={"base_model": "/nowhere"})
    TrainingRun.objects.filter(pk=run.pk).update(**fields)
    run.refresh_from_db()
    return run


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(proc.stdout)


# -- settings (R19) -----------------------------------------------------------------------------


def test_celery_settings_make_redelivery_safe() -> None:
    from rlhf_site.celery import app

    conf = app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_track_started is True
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is True
    assert conf.task_always_eager is False  # the web request never runs a task
    assert conf.result_backend is None
    assert conf.task_soft_time_limit < conf.task_time_limit
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit
    assert conf.result_backend_transport_options["visibility_timeout"] > conf.task_time_limit
    assert conf.task_default_queue == "default"
    assert app.amqp.router.route({}, "training.tasks.run_training")["queue"].name == "training"
    # The embedded default needs no broker server.
    if settings.CELERY_BROKER_URL.startswith("filesystem://"):
        for key in ("data_folder_in", "data_folder_out", "processed_folder"):
            assert Path(conf.broker_transport_options[key]).is_dir()
    assert settings.TRAINING_HEARTBEAT_SECONDS < settings.TRAINING_HEARTBEAT_STALE_SECONDS


def test_training_task_is_registered_with_late_acks() -> None:
    from training.tasks import run_training

    assert run_training.acks_late is True
    assert run_training.reject_on_worker_lost is True
    assert run_training.queue == "training"


# -- create -------------------------------------------------------------------------------------


def test_run_config_is_checked_against_an_allowlist() -> None:
    campaign = judged_campaign(comparisons=1)
    with pytest.raises(runs.RunError) as err:
        runs.run_create(
            campaign=campaign,
            kind="reward",
            config={"base_model": "m", "learning_rat": 1e-4, "max_steps": "10", "batch_size": 0},
        )
    message = str(err.value)
    assert "learning_rat: not a setting of a reward run" in message
    assert "max_steps: expected int, got str" in message
    assert "batch_size: must be at least 1" in message
    with pytest.raises(runs.RunError, match="base_model: required"):
        runs.run_create(campaign=campaign, kind="reward", config={})
    with pytest.raises(runs.RunError, match="unknown run kind"):
        runs.run_create(campaign=campaign, kind="magic", config={})
    assert not TrainingRun.objects.exists()


def test_run_create_enqueues_only_on_commit(django_capture_on_commit_callbacks) -> None:
    campaign = judged_campaign(comparisons=1)
    sent: list[int] = []
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        run = runs.run_create(
            campaign=campaign, kind="reward", config={"base_model": "m"}, enqueue=sent.append
        )
    assert sent == []
    assert len(callbacks) == 1
    callbacks[0]()
    assert sent == [run.pk]
    assert run.status == RunStatus.QUEUED
    assert run.attempts == 0


def test_database_refuses_two_active_runs_of_one_kind_per_campaign() -> None:
    campaign = judged_campaign(comparisons=1)
    first = runs.run_create(campaign=campaign, kind="reward", config={"base_model": "m"})
    with pytest.raises(IntegrityError), transaction.atomic():
        TrainingRun.objects.create(campaign=campaign, kind="reward")
    with pytest.raises(runs.RunAlreadyActive) as err:
        runs.run_create(campaign=campaign, kind="reward", config={"base_model": "m"})
    assert str(err.value) == (
        f"skipped: a reward run is already queued for this campaign (#{first.pk})"
    )
    TrainingRun.objects.filter(pk=first.pk).update(status=RunStatus.RUNNING)
    with pytest.raises(runs.RunAlreadyActive, match=r"already running .*#"):
        runs.run_create(campaign=campaign, kind="reward", config={"base_model": "m"})
    # Once the first has finished, a new one is welcome; other campaigns never conflict.
    TrainingRun.objects.filter(pk=first.pk).update(status=RunStatus.FAILED)
    runs.run_create(campaign=campaign, kind="reward", config={"base_model": "m"})
    runs.run_create(
        campaign=judged_campaign(comparisons=1), kind="reward", config={"base_model": "m"}
    )


# -- the state machine --------------------------------------------------------------------------


def test_a_duplicate_delivery_with_a_live_heartbeat_changes_nothing(fake_train) -> None:
    run = _run(
        judged_campaign(comparisons=2),
        status=RunStatus.RUNNING,
        attempts=1,
        worker="another-host:4242",
        heartbeat_at=timezone.now(),
    )
    before = TrainingRun.objects.values().get(pk=run.pk)
    assert runs.run_execute(run_id=run.pk, worker="this-host:1") == runs.Outcome.DUPLICATE
    assert TrainingRun.objects.values().get(pk=run.pk) == before
    assert fake_train == []


def test_a_stale_heartbeat_resumes_with_one_more_attempt(fake_train) -> None:
    stale = timezone.now() - timedelta(seconds=settings.TRAINING_HEARTBEAT_STALE_SECONDS + 1)
    run = _run(
        judged_campaign(comparisons=2),
        status=RunStatus.RUNNING,
        attempts=1,
        worker="another-host:4242",
        heartbeat_at=stale,
    )
    assert runs.run_execute(run_id=run.pk, worker="this-host:1") == runs.Outcome.SUCCEEDED
    run.refresh_from_db()
    assert fake_train == [2]
    assert (run.status, run.attempts, run.worker) == (RunStatus.SUCCEEDED, 2, "this-host:1")
    assert "attempt 1 lost its worker another-host:4242" in run.log_tail
    version = ModelVersion.objects.get(run=run)
    assert (version.kind, version.metrics) == ("reward", {"eval_accuracy": 0.75})


def test_a_dead_worker_on_this_host_is_not_waited_for(fake_train) -> None:
    """A fresh heartbeat from a process that no longer exists (a killed pool child) does not
    block the redelivered message."""
    import socket

    run = _run(
        judged_campaign(comparisons=2),
        status=RunStatus.RUNNING,
        attempts=1,
        worker=f"{socket.gethostname()}:{_dead_pid()}",
        heartbeat_at=timezone.now(),
    )
    assert runs.run_execute(run_id=run.pk) == runs.Outcome.SUCCEEDED
    assert fake_train == [2]


def test_after_max_attempts_the_run_fails_with_the_reason(fake_train) -> None:
    run = _run(
        judged_campaign(comparisons=2),
        status=RunStatus.RUNNING,
        attempts=3,
        worker="another-host:4242",
        heartbeat_at=timezone.now() - timedelta(hours=1),
    )
    assert runs.run_execute(run_id=run.pk, worker="this-host:1") == runs.Outcome.GAVE_UP
    run.refresh_from_db()
    assert run.status == RunStatus.FAILED
    assert run.attempts == 3
    assert run.error.startswith("gave up after 3 attempts; last error: the worker another-host")
    assert run.finished_at is not None
    assert fake_train == []
    assert not ModelVersion.objects.exists()


@pytest.mark.parametrize("status", [RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED])
def test_terminal_runs_are_never_run_again(fake_train, status) -> None:
    run = _run(judged_campaign(comparisons=2), status=status, attempts=1)
    before = TrainingRun.objects.values().get(pk=run.pk)
    assert runs.run_execute(run_id=run.pk, worker="w:1") == runs.Outcome.TERMINAL
    assert TrainingRun.objects.values().get(pk=run.pk) == before
    assert fake_train == []


def test_an_exception_fails_the_run_with_its_message(monkeypatch) -> None:
    def boom(*, run, worker):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(runs, "_train", boom)
    run = _run(judged_campaign(comparisons=2))
    assert runs.run_execute(run_id=run.pk, worker="w:1") == runs.Outcome.FAILED
    run.refresh_from_db()
    assert (run.status, run.attempts) == (RunStatus.FAILED, 1)
    assert run.error == "RuntimeError: CUDA out of memory"
    assert "attempt 1 failed: RuntimeError: CUDA out of memory" in run.log_tail


def test_a_campaign_without_judgments_fails_clearly() -> None:
    from tests.conftest import make_campaign

    run = _run(make_campaign(comparisons=1))
    assert runs.run_execute(run_id=run.pk, worker="w:1") == runs.Outcome.FAILED
    run.refresh_from_db()
    assert run.error == "RunError: the campaign has no judgments to train on"


# -- the dataset snapshot (R13) -----------------------------------------------------------------


def test_a_snapshot_is_a_function_of_its_cutoff(tmp_path: Path) -> None:
    campaign = judged_campaign(comparisons=4, overlap=2)
    cutoff = Judgment.objects.filter(campaign=campaign).latest("id").pk
    sha1, lines1 = runs.snapshot_write(campaign=campaign, cutoff=cutoff, path=tmp_path / "1.jsonl")
    # New comparisons and judgments after the cutoff (new raters change Dawid-Skene weights
    # when they count): not in a snapshot with the old cutoff, byte for byte.
    add_judgments(campaign, comparisons=2, overlap=2)
    assert Judgment.objects.filter(campaign=campaign, id__gt=cutoff).count() == 4
    sha2, lines2 = runs.snapshot_write(campaign=campaign, cutoff=cutoff, path=tmp_path / "2.jsonl")
    assert (sha1, lines1) == (sha2, lines2) == (sha1, 8)
    assert (tmp_path / "1.jsonl").read_bytes() == (tmp_path / "2.jsonl").read_bytes()
    row = json.loads((tmp_path / "1.jsonl").read_text().splitlines()[0])
    # The full format (ties kept as 0.5 targets), with the rater's weight.
    assert {"prompt", "completion_a", "completion_b", "choice", "weight"} <= set(row)
    newer, _ = runs.snapshot_write(campaign=campaign, cutoff=cutoff + 4, path=tmp_path / "3.jsonl")
    assert newer != sha1


def test_a_snapshot_keeps_ties_and_leaves_both_bad_out(tmp_path: Path) -> None:
    campaign = make_campaign(comparisons=6, overlap=1)
    judge(campaign, raters=1, choices=["a", "tie", "both_bad"])
    cutoff = Judgment.objects.filter(campaign=campaign).latest("id").pk
    _, lines = runs.snapshot_write(campaign=campaign, cutoff=cutoff, path=tmp_path / "s.jsonl")
    pairs = read_preference_jsonl(tmp_path / "s.jsonl")
    assert lines == len(pairs) == 4  # 2 x a, 2 x tie; the 2 both-bad judgments left out
    assert sorted(p.label for p in pairs) == [0.5, 0.5, 1.0, 1.0]


def test_a_resumed_attempt_reuses_the_same_snapshot(fake_train) -> None:
    campaign = judged_campaign(comparisons=3)
    run = _run(campaign)
    path = runs.snapshot_ensure(run=run)
    run.refresh_from_db()
    first = (run.judgment_cutoff, run.dataset_sha256, run.dataset_path, run.dataset_pairs)
    assert first[1]
    assert first[3] == 6
    assert Path(first[2]) == path
    add_judgments(campaign)  # after the cutoff
    stamp = path.stat().st_mtime_ns
    runs.snapshot_ensure(run=run)
    assert path.stat().st_mtime_ns == stamp  # reused, not rewritten
    path.unlink()  # lost: rebuilt from the same cutoff, to the same bytes
    runs.snapshot_ensure(run=run)
    run.refresh_from_db()
    assert (run.judgment_cutoff, run.dataset_sha256, run.dataset_path, run.dataset_pairs) == first
    path.write_text("tampered\n")
    TrainingRun.objects.filter(pk=run.pk).update(judgment_cutoff=first[0] + 1000)
    run.refresh_from_db()
    with pytest.raises(runs.RunError, match="no longer hashes"):
        runs.snapshot_ensure(run=run)


# -- a real (tiny) training run, in this process ------------------------------------------------


@pytest.mark.slow
def test_a_reward_run_trains_registers_and_records_metrics(settings, tmp_path: Path) -> None:
    settings.TRAINING_HEARTBEAT_SECONDS = 1
    base = tiny_base_model(tmp_path / "base")
    campaign = judged_campaign(comparisons=6)
    run = runs.run_create(
        campaign=campaign,
        kind="reward",
        config={
            "base_model": str(base),
            "max_steps": 4,
            "batch_size": 4,
            "save_every": 2,
            "max_length": 64,
            "max_prompt_length": 32,
        },
    )
    assert runs.run_execute(run_id=run.pk) == runs.Outcome.SUCCEEDED
    run.refresh_from_db()
    assert (run.status, run.attempts, run.step, run.total_steps) == ("succeeded", 1, 4, 4)
    assert run.progress == 1.0
    version = ModelVersion.objects.get(run=run)
    assert Path(version.artifact, "config.json").is_file()
    assert "eval_accuracy" in version.metrics or "eval_pairs" in version.metrics
    losses = RunMetric.objects.filter(run=run, name="loss").order_by("step")
    assert [m.step for m in losses] == [1, 2, 3, 4]
    assert "training from step 0" in run.log_tail


# The task closes stale connections around itself; inside a test's transaction that would
# close the test's own connection, so the task tests run in autocommit.
@pytest.mark.django_db(transaction=True)
def test_the_task_asks_again_later_on_a_duplicate(monkeypatch) -> None:
    """A duplicate delivery is not dropped: if the live worker dies later, this message is
    what resumes the run."""
    from celery.exceptions import Retry

    from training.tasks import run_training

    seen: list[tuple[int, str]] = []

    def execute(*, run_id: int, worker: str) -> runs.Outcome:
        seen.append((run_id, worker))
        return runs.Outcome.DUPLICATE

    run = runs.run_create(campaign=judged_campaign(), kind="reward", config={"base_model": "/x"})
    monkeypatch.setattr(runs, "run_execute", execute)
    with pytest.raises(Retry):
        run_training(run.pk)
    assert seen == [(run.pk, runs.worker_name())]
    monkeypatch.setattr(runs, "run_execute", lambda **_: runs.Outcome.SUCCEEDED)
    assert run_training(run.pk) == "succeeded"


@pytest.mark.django_db(transaction=True)
def test_a_finished_round_run_moves_its_round_on(monkeypatch, settings, tmp_path) -> None:
    from training.services import rounds
    from training.tasks import run_training

    settings.LOOP_POLICY_MODEL = str(tmp_path / "base")
    advanced: list[int] = []
    monkeypatch.setattr("training.tasks.enqueue_round", advanced.append)
    made = rounds.round_create(campaign=judged_campaign(), config={})
    rounds.round_advance(round_id=made.pk)
    run = made.runs.get()
    monkeypatch.setattr(runs, "run_execute", lambda **_: runs.Outcome.FAILED)
    assert run_training(run.pk) == "failed"
    assert advanced == [made.pk]


# -- cancel -------------------------------------------------------------------------------------


def test_cancelling_a_queued_run_ends_it_at_once() -> None:
    run = runs.run_create(campaign=judged_campaign(), kind="reward", config={"base_model": "/x"})
    run = runs.run_cancel(run=run)
    assert run.status == RunStatus.CANCELLED
    assert run.finished_at is not None
    assert "cancelled before it started" in run.log_tail
    assert runs.run_execute(run_id=run.pk, worker="w:1") == runs.Outcome.TERMINAL
    assert runs.run_cancel(run=run).status == RunStatus.CANCELLED  # twice is harmless


def test_a_cancel_requested_while_the_worker_was_gone_ends_the_run() -> None:
    run = runs.run_create(campaign=judged_campaign(), kind="reward", config={"base_model": "/x"})
    TrainingRun.objects.filter(pk=run.pk).update(
        status=RunStatus.RUNNING, worker=f"{runs.socket.gethostname()}:{_dead_pid()}", attempts=1
    )
    runs.run_cancel(run=run)
    assert runs.run_execute(run_id=run.pk, worker="w:2") == runs.Outcome.CANCELLED
    run.refresh_from_db()
    assert (run.status, run.attempts) == (RunStatus.CANCELLED, 1)


def test_a_service_step_stops_at_its_next_report_once_cancelled(monkeypatch) -> None:
    """Generation reports after each batch; the report after a cancel raises, and the run
    ends CANCELLED with what it finished kept."""
    from training.services import progress

    batches: list[int] = []

    def generate(*, run: TrainingRun, report: progress.Reporter) -> dict[str, float]:
        for done in range(1, 6):
            batches.append(done)
            if done == 2:
                runs.run_cancel(run=run)
            report(done, 5, mean_length=10.0 + done)
        return {"completions": 5.0}

    import training.services.candidates as candidates

    monkeypatch.setattr(candidates, "generate_execute", generate)
    run = runs.run_create(
        campaign=judged_campaign(),
        kind="generate",
        config={"model": "/x", "source_name": "policy-x"},
    )
    assert runs.run_execute(run_id=run.pk, worker="w:1") == runs.Outcome.CANCELLED
    run.refresh_from_db()
    assert batches == [1, 2]
    assert (run.status, run.step, run.total_steps) == (RunStatus.CANCELLED, 2, 5)
    assert run.progress == pytest.approx(0.4)
    assert list(
        RunMetric.objects.filter(run=run, name="mean_length").values_list("step", "value")
    ) == [(1, 11.0), (2, 12.0)]


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)  # the cancel comes from another connection
def test_a_training_run_stops_at_its_next_step_once_cancelled(settings, tmp_path: Path) -> None:
    """The heartbeat sees the request and leaves a STOP file; the trainer raises at its next
    logged step. Nothing is registered."""
    settings.TRAINING_HEARTBEAT_SECONDS = 1
    base = tiny_base_model(tmp_path / "base")
    campaign = judged_campaign(comparisons=6)
    run = runs.run_create(
        campaign=campaign,
        kind="reward",
        config={"base_model": str(base), "max_steps": 3000, "batch_size": 2, "max_length": 32},
    )
    timer = threading.Timer(3.0, lambda: runs.run_cancel(run=run))
    timer.start()
    try:
        assert runs.run_execute(run_id=run.pk, worker="w:1") == runs.Outcome.CANCELLED
    finally:
        timer.cancel()
        connection.close()
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED
    assert 0 < run.step < 3000
    assert not ModelVersion.objects.filter(run=run).exists()
    assert run.log_tail.splitlines()[-1].endswith("cancelled")


def test_a_soft_time_limit_hands_the_run_back_for_a_resume(monkeypatch) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    def work(*, run: TrainingRun, worker: str) -> dict[str, float]:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(runs, "_work", work)
    run = runs.run_create(campaign=judged_campaign(), kind="reward", config={"base_model": "/x"})
    assert runs.run_execute(run_id=run.pk, worker="w:1") == runs.Outcome.REQUEUE
    run.refresh_from_db()
    assert (run.status, run.heartbeat_at, run.attempts) == (RunStatus.RUNNING, None, 1)
    assert "soft time limit" in run.log_tail
    # The retry (same or another worker) claims it as a new attempt.
    monkeypatch.setattr(runs, "_work", lambda *, run, worker: {"eval_accuracy": 0.5})
    assert runs.run_execute(run_id=run.pk, worker="w:2") == runs.Outcome.SUCCEEDED
    run.refresh_from_db()
    assert run.attempts == 2


@pytest.mark.slow
def test_a_run_with_two_processes_trains_through_the_launcher(settings, tmp_path: Path) -> None:
    """``processes`` > 1: the worker starts the same trainer under the launcher (torchrun,
    two gloo processes on CPU) and reads its metrics file as usual."""
    settings.TRAINING_HEARTBEAT_SECONDS = 1
    base = tiny_base_model(tmp_path / "base")
    run = runs.run_create(
        campaign=judged_campaign(comparisons=8),
        kind="reward",
        config={
            "base_model": str(base),
            "max_steps": 3,
            "batch_size": 4,
            "max_length": 32,
            "device": "cpu",
            "processes": 2,
        },
    )
    assert runs.run_execute(run_id=run.pk) == runs.Outcome.SUCCEEDED
    run.refresh_from_db()
    assert (run.status, run.step, run.total_steps) == ("succeeded", 3, 3)
    assert "launching" in run.log_tail
    assert "--nproc_per_node=2" in run.log_tail
    config = json.loads((Path(run.output_dir).parent / "reward-config.json").read_text())
    assert config["model"] == str(base)
    version = ModelVersion.objects.get(run=run)
    assert Path(version.artifact, "model.safetensors").is_file()
    assert [m.step for m in RunMetric.objects.filter(run=run, name="loss")] == [1, 2, 3]


def test_a_launcher_that_fails_fails_the_run_with_its_output(settings, tmp_path: Path) -> None:
    settings.TRAINING_LAUNCHER = "{python} -c 'import sys; print(\"no GPUs here\"); sys.exit(3)'"
    run = runs.run_create(
        campaign=judged_campaign(),
        kind="reward",
        config={"base_model": str(tmp_path), "max_steps": 2, "processes": 2},
    )
    assert runs.run_execute(run_id=run.pk) == runs.Outcome.FAILED
    run.refresh_from_db()
    assert run.error.startswith("RuntimeError: the launcher exited with 3: no GPUs here")


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_near_the_soft_time_limit_a_run_saves_a_checkpoint_and_resumes_there(
    settings, tmp_path: Path
) -> None:
    """R21: with a 3 s soft limit the heartbeat asks the trainer to pause; it saves a loadable
    checkpoint after the step named in PAUSE and hands the run back; the next attempt resumes
    from exactly that step."""
    from training.core.checkpoint import checkpoint_dir, find_resumable, load_checkpoint
    from training.core.modeling import load_reward_model

    settings.TRAINING_HEARTBEAT_SECONDS = 0.5
    settings.CELERY_TASK_SOFT_TIME_LIMIT = 3
    base = tiny_base_model(tmp_path / "base")
    run = runs.run_create(
        campaign=judged_campaign(comparisons=6),
        kind="reward",
        config={
            "base_model": str(base),
            "max_steps": 2500,
            "batch_size": 2,
            "max_length": 32,
            "log_every": 5,
        },
    )
    assert runs.run_execute(run_id=run.pk, worker="w:1") == runs.Outcome.REQUEUE
    run.refresh_from_db()
    out = Path(run.output_dir)
    paused_at = int((out / "PAUSE").read_text())
    assert 0 < paused_at < 2500
    checkpoint = find_resumable(out)
    assert checkpoint is not None
    assert checkpoint == checkpoint_dir(out, paused_at)
    model = load_reward_model(str(base), device="cpu", num_labels=1)
    assert load_checkpoint(checkpoint, model=model)["step"] == paused_at  # loadable
    assert (run.status, run.heartbeat_at) == (RunStatus.RUNNING, None)
    assert "near the time limit" in run.log_tail
    assert not ModelVersion.objects.filter(run=run).exists()

    settings.CELERY_TASK_SOFT_TIME_LIMIT = 3600
    TrainingRun.objects.filter(pk=run.pk).update(config={**run.config, "max_steps": paused_at + 3})
    assert runs.run_execute(run_id=run.pk, worker="w:2") == runs.Outcome.SUCCEEDED
    run.refresh_from_db()
    assert run.attempts == 2
    assert f"resuming from checkpoint step {paused_at}" in run.log_tail
    assert not (out / "PAUSE").exists()
