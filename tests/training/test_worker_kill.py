"""A real Celery worker process runs a reward run, and gets killed (R18, R20).

The worker is ``celery -A rlhf_site worker`` in a subprocess, on the filesystem broker in a
temporary folder and on this test's database (PostgreSQL: the worker must see committed rows,
which an in-memory SQLite test database cannot share). The training task's pool child is
SIGKILLed mid-run: its parent requeues the message (``reject_on_worker_lost``), the next
child finds a dead worker on the row and resumes from the last checkpoint; after three lost
workers the run is FAILED with the reason, and the message is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from tests.training.helpers import judged_campaign, tiny_base_model
from training.models import ModelVersion, RunMetric, RunStatus, TrainingRun
from training.services import runs

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parents[2]
CELERY = Path(sys.executable).with_name("celery")


class Worker:
    def __init__(self, env: dict[str, str], log: Path, queues: str = "training,default") -> None:
        self.log = log
        self.file = open(log, "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [
                str(CELERY), "-A", "rlhf_site", "worker", "-Q", queues,
                "--pool", "prefork", "--concurrency", "1", "--max-tasks-per-child", "1",
                "--loglevel", "INFO", "-n", f"test{os.getpid()}@%h", "--without-heartbeat",
                "--without-gossip", "--without-mingle",
            ],
            cwd=ROOT, env=env, stdout=self.file, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.file.close()


def wait_for(what: str, check: Callable[[], object], worker: Worker, timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if worker.proc.poll() is not None:
            pytest.fail(
                f"the worker exited ({worker.proc.returncode}) waiting for {what}:\n"
                f"{worker.text()[-4000:]}"
            )
        time.sleep(0.2)
    pytest.fail(
        f"timed out after {timeout:.0f} s waiting for {what}; worker log:\n{worker.text()[-4000:]}"
    )


@pytest.fixture
def broker(tmp_path: Path) -> dict[str, str]:
    folder = tmp_path / "broker"
    return {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "processed_folder": str(folder / "processed"),
        "control_folder": str(folder / "control"),
    }


def start_worker(
    tmp_path: Path, settings, broker_env: dict[str, str], queues: str = "training,default"
) -> Worker:
    """A worker process on this test's database, with artifacts under ``tmp_path``, ready."""
    db = connection.settings_dict
    artifacts = tmp_path / "artifacts"
    settings.ARTIFACTS_ROOT = artifacts
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": (
            f"postgres://{db['USER']}:{db['PASSWORD'] or ''}@{db['HOST'] or '127.0.0.1'}:"
            f"{db['PORT'] or 5432}/{db['NAME']}"
        ),
        **broker_env,
        "ARTIFACTS_ROOT": str(artifacts),
        "TRAINING_HEARTBEAT_SECONDS": "1",
        "TRAINING_HEARTBEAT_STALE_SECONDS": "60",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    w = Worker(env, tmp_path / "worker.log", queues=queues)
    try:
        wait_for("the worker to be ready", lambda: "ready." in w.text(), w, timeout=60)
    except BaseException:
        w.stop()
        raise
    return w


@pytest.fixture
def worker(tmp_path: Path, settings, broker) -> Iterator[Worker]:
    broker_env = {
        "CELERY_BROKER_URL": "filesystem://",
        "CELERY_BROKER_DIR": str(Path(broker["data_folder_in"]).parent),
    }
    w = start_worker(tmp_path, settings, broker_env)
    try:
        yield w
    finally:
        w.stop()


@pytest.fixture
def enqueue(broker) -> Iterator[Callable[[int], None]]:
    """Send ``run_training`` to the worker's broker folder (this process's settings point
    at var/broker)."""
    from kombu import Connection

    from training.tasks import run_training

    conn = Connection("filesystem://", transport_options=broker)
    try:
        yield lambda run_id: run_training.apply_async(args=(run_id,), connection=conn)
    finally:
        conn.release()


def _row(run_id: int) -> TrainingRun:
    return TrainingRun.objects.get(pk=run_id)


def _child_pid(run: TrainingRun) -> int:
    return int(run.worker.rpartition(":")[2])


def test_a_killed_worker_resumes_from_its_checkpoint(tmp_path, worker, enqueue) -> None:
    base = tiny_base_model(tmp_path / "base")
    campaign = judged_campaign(comparisons=6)
    steps, k = 600, 100
    run = runs.run_create(
        campaign=campaign,
        kind="reward",
        config={
            "base_model": str(base),
            "max_steps": steps,
            "batch_size": 4,
            "save_every": 10,
            "max_length": 64,
            "max_prompt_length": 32,
        },
        enqueue=enqueue,
    )
    started = time.monotonic()
    seen = wait_for(f"step >= {k}", lambda: (r := _row(run.pk)).step >= k and r, worker, 90)
    assert isinstance(seen, TrainingRun)
    assert seen.attempts == 1
    killed_at_step = seen.step
    os.kill(_child_pid(seen), signal.SIGKILL)

    done = wait_for(
        "the run to finish",
        lambda: (r := _row(run.pk)).is_terminal and r,
        worker,
        120,
    )
    assert isinstance(done, TrainingRun)
    print(f"killed at step {killed_at_step}; finished in {time.monotonic() - started:.1f} s")
    assert done.status == RunStatus.SUCCEEDED, (done.error, done.log_tail, worker.text()[-3000:])
    assert done.attempts == 2
    assert done.step == steps
    assert done.progress == 1.0
    assert "attempt 1 lost its worker" in done.log_tail
    resumed = [line for line in done.log_tail.splitlines() if "attempt 2: resuming" in line]
    assert resumed, done.log_tail
    resumed_step = int(resumed[0].rsplit(" ", 1)[1])
    assert k <= resumed_step <= killed_at_step + 200  # from a checkpoint, not from scratch
    # Every step's metrics once: the resumed steps replaced the killed attempt's values.
    losses = list(RunMetric.objects.filter(run=done, name="loss").values_list("step", flat=True))
    assert sorted(losses) == list(range(1, steps + 1))
    version = ModelVersion.objects.get(run=done)
    assert version.kind == "reward"
    assert Path(version.artifact, "config.json").is_file()
    assert not Path(version.artifact, "checkpoints").exists()


def test_three_lost_workers_fail_the_run_and_empty_the_queue(
    tmp_path, worker, enqueue, broker
) -> None:
    base = tiny_base_model(tmp_path / "base")
    campaign = judged_campaign(comparisons=4)
    run = runs.run_create(
        campaign=campaign,
        kind="reward",
        config={
            "base_model": str(base),
            "max_steps": 5000,
            "batch_size": 4,
            "save_every": 50,
            "max_length": 64,
            "max_prompt_length": 32,
        },
        enqueue=enqueue,
    )
    for attempt in (1, 2, 3):
        row = wait_for(
            f"attempt {attempt} to start",
            lambda a=attempt: (r := _row(run.pk)).attempts == a and r.status == "running" and r,
            worker,
            90,
        )
        assert isinstance(row, TrainingRun)
        os.kill(_child_pid(row), signal.SIGKILL)

    done = wait_for("the run to fail", lambda: (r := _row(run.pk)).is_terminal and r, worker, 60)
    assert isinstance(done, TrainingRun)
    assert done.status == RunStatus.FAILED
    assert done.attempts == 3
    assert done.error.startswith("gave up after 3 attempts; last error: the worker ")
    assert not ModelVersion.objects.filter(run=done).exists()
    # The message was acknowledged: nothing waits in the queue, and no fourth attempt starts.
    time.sleep(3)
    assert list(Path(broker["data_folder_in"]).glob("*.msg")) == []
    assert _row(run.pk).attempts == 3
    assert "gave up after 3 attempts" in _row(run.pk).log_tail


REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _redis_or_skip() -> Any:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip(f"needs Redis at {REDIS_URL} (the production broker)")
    client.flushdb()
    return client


@pytest.fixture
def redis_worker(tmp_path: Path, settings) -> Iterator[tuple[Worker, Any]]:
    """The production shape: a training worker on a Redis broker (R19 is about its prefetch,
    which the remote-control inspect shows)."""
    client = _redis_or_skip()
    w = start_worker(tmp_path, settings, {"CELERY_BROKER_URL": REDIS_URL}, queues="training")
    try:
        yield w, client
    finally:
        w.stop()
        client.flushdb()


def test_a_training_worker_holds_one_run_at_a_time(tmp_path, redis_worker) -> None:
    """R19: prefetch 1 with acks_late and concurrency 1: with 3 runs queued, the busy worker
    has reserved nothing beyond the one it runs; the other two wait in Redis, free for
    another worker."""
    from celery import Celery
    from kombu import Connection

    from training.tasks import run_training

    worker, client = redis_worker
    base = tiny_base_model(tmp_path / "base")
    with Connection(REDIS_URL) as conn:
        made = [
            runs.run_create(
                campaign=judged_campaign(comparisons=4),
                kind="reward",
                config={
                    "base_model": str(base),
                    "max_steps": 4000,
                    "batch_size": 4,
                    "max_length": 64,
                },
                enqueue=lambda run_id: run_training.apply_async(args=(run_id,), connection=conn),
            )
            for _ in range(3)
        ]
        running = wait_for(
            "a run to start",
            lambda: TrainingRun.objects.filter(status=RunStatus.RUNNING).first(),
            worker,
            90,
        )
        assert isinstance(running, TrainingRun)
        time.sleep(3)  # time enough to prefetch more, if it were going to
        # An app of its own: this process's app is configured for the embedded broker.
        inspect = Celery(broker=REDIS_URL).control.inspect(timeout=5)
        reserved, active = inspect.reserved(), inspect.active()
    assert reserved is not None, "the worker did not answer the inspect broadcast"
    assert active is not None
    assert [len(tasks) for tasks in reserved.values()] == [0]
    assert [len(tasks) for tasks in active.values()] == [1]
    assert client.llen("training") == 2
    assert TrainingRun.objects.filter(pk__in=[r.pk for r in made], status="queued").count() == 2
    runs.run_cancel(run=running)
    wait_for("the cancel", lambda: _row(running.pk).status == "cancelled", worker, 60)
