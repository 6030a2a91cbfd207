"""Training runs: create one, and drive one through its state machine.

``run_execute`` is what the Celery task calls, and it is safe to call any number of times for
one run (acks_late redelivers a message whose worker died; Redis redelivers after the
visibility timeout). The row decides what happens, in one short locked transaction:

* a terminal run (succeeded, failed, cancelled) is never run again;
* a running run whose heartbeat is fresh and whose worker is another live process is a
  duplicate delivery: it returns ``DUPLICATE`` and changes nothing (the task asks again later,
  so a message is never dropped while its run might still need it);
* a run that has used ``max_attempts`` attempts is marked FAILED with the reason;
* otherwise the attempt is claimed (attempts += 1, status running, this worker, heartbeat now)
  and the run starts, or resumes from the newest checkpoint in its output folder.

Failure policy: an exception raised by the trainer marks the run FAILED with the error (a bug
or bad data does not fix itself on a retry). A worker that disappears (SIGKILL, out of memory,
host lost) raises nothing: the broker redelivers the message (``acks_late`` +
``reject_on_worker_lost``, or Redis' visibility timeout), the next call sees a dead or stale
heartbeat and resumes from the checkpoint, and after ``max_attempts`` lost workers the run is
FAILED: never lost, never looping.

Services never import tasks: the caller of ``run_create`` passes ``enqueue``, called after the
transaction commits.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator
from datetime import timedelta
from itertools import takewhile
from pathlib import Path
from typing import Any, cast

from django.conf import settings
from django.db import IntegrityError, close_old_connections, connection, transaction
from django.db.models import Max
from django.utils import timezone

from annotation import formats, quality, selectors
from annotation.models import Campaign, Judgment
from training.models import (
    ACTIVE_STATUSES,
    ModelKind,
    ModelVersion,
    RunKind,
    RunMetric,
    RunStatus,
    TrainingRun,
)

log = logging.getLogger(__name__)

# The annotation app's ``full`` rows with the Dawid-Skene weight: ties stay in (the reward
# model reads them as a 0.5 target); both-bad judgments are left out of the snapshot, since
# they say nothing about which output is better, so every line is one training pair.
SNAPSHOT_FORMAT = "full"
LOG_TAIL_LINES = 40


class RunError(ValueError):
    """A run cannot be created as asked; the message is for the user."""


class RunAlreadyActive(RunError):
    pass


class Outcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    GAVE_UP = "gave_up"
    DUPLICATE = "duplicate"
    TERMINAL = "terminal"


# -- configuration ------------------------------------------------------------------------------

# What a user may set for a reward run, and its type. Anything else is refused by name.
REWARD_CONFIG_KEYS: dict[str, type | tuple[type, ...]] = {
    "base_model": str,
    "max_steps": int,
    "num_epochs": int,
    "batch_size": int,
    "grad_accum": int,
    "learning_rate": (int, float),
    "lr_schedule": str,
    "warmup_steps": int,
    "weight_decay": (int, float),
    "max_length": int,
    "max_prompt_length": int,
    "save_every": int,
    "log_every": int,
    "seed": int,
    "eval_fraction": (int, float),
    "lapse": (int, float),
    "center_rewards_coefficient": (int, float),
    "use_weights": bool,
    "ensemble_size": int,
    "normalize": bool,
    "lora": bool,
    "lora_r": int,
    "lora_alpha": int,
    "gradient_checkpointing": bool,
    "device": str,
    "dtype": str,
}
CONFIG_KEYS = {RunKind.REWARD: REWARD_CONFIG_KEYS}
REQUIRED_KEYS = {RunKind.REWARD: ("base_model",)}


def run_config_clean(*, kind: str, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` checked against the allowlist of ``kind``; raises ``RunError`` naming every
    problem."""
    if kind not in CONFIG_KEYS:
        raise RunError(f"unknown run kind {kind!r}; expected one of {', '.join(CONFIG_KEYS)}")
    allowed = CONFIG_KEYS[RunKind(kind)]
    problems = []
    for key in sorted(config):
        if key not in allowed:
            problems.append(f"{key}: not a setting of a {kind} run")
            continue
        expected = allowed[key]
        value = config[key]
        # bool is an int in Python; an int field must not take True.
        if isinstance(value, bool) and expected is not bool:
            problems.append(f"{key}: expected a number, got {value!r}")
        elif not isinstance(value, expected):
            names = expected if isinstance(expected, tuple) else (expected,)
            want = " or ".join(t.__name__ for t in names)
            problems.append(f"{key}: expected {want}, got {type(value).__name__}")
    for key in REQUIRED_KEYS[RunKind(kind)]:
        if key not in config:
            problems.append(f"{key}: required")
    for key, low in (("max_steps", -1), ("batch_size", 1), ("save_every", 0), ("log_every", 1)):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < low:
            problems.append(f"{key}: must be at least {low}")
    if config.get("max_steps") == 0:
        problems.append("max_steps: must be positive, or -1 for whole epochs")
    if problems:
        raise RunError("invalid run config: " + "; ".join(problems))
    return dict(config)


# -- create -------------------------------------------------------------------------------------


def run_create(
    *,
    campaign: Campaign,
    kind: str,
    config: dict[str, Any],
    created_by: Any = None,
    enqueue: Callable[[int], object] | None = None,
) -> TrainingRun:
    """A queued run; ``enqueue(run_id)`` is called once the transaction commits.

    The database allows one queued-or-running run per campaign and kind: a second one raises
    ``RunAlreadyActive`` ("skipped: ...") instead of starting twice.
    """
    clean = run_config_clean(kind=kind, config=config)
    try:
        with transaction.atomic():
            run = TrainingRun.objects.create(
                campaign=campaign,
                kind=kind,
                config=clean,
                created_by=created_by if getattr(created_by, "pk", None) else None,
            )
    except IntegrityError as exc:
        active = (
            TrainingRun.objects.filter(campaign=campaign, kind=kind, status__in=ACTIVE_STATUSES)
            .values_list("pk", "status")
            .first()
        )
        if active is None:
            raise
        raise RunAlreadyActive(
            f"skipped: a {kind} run is already {active[1]} for this campaign (#{active[0]})"
        ) from exc
    if enqueue is not None:
        run_id = run.pk
        transaction.on_commit(lambda: enqueue(run_id))
    return run


# -- the state machine --------------------------------------------------------------------------


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_is_gone(worker: str) -> bool:
    """True when ``worker`` ("host:pid") ran on this host and that process no longer exists.
    A worker on another host cannot be checked: its heartbeat decides."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    # A zombie (a killed child its parent has not reaped yet) still answers signal 0.
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state in ("Z", "X")
    return False


def run_is_alive(run: TrainingRun, *, now: Any = None) -> bool:
    """Another worker is on this run right now: a fresh heartbeat from a living process."""
    if run.status != RunStatus.RUNNING or run.heartbeat_at is None:
        return False
    now = now or timezone.now()
    stale = timedelta(seconds=settings.TRAINING_HEARTBEAT_STALE_SECONDS)
    return now - run.heartbeat_at < stale and not _pid_is_gone(run.worker)


def _claim(run_id: int, worker: str) -> tuple[Outcome | None, TrainingRun]:
    with transaction.atomic():
        run = TrainingRun.objects.select_for_update().get(pk=run_id)
        now = timezone.now()
        if run.is_terminal:
            log.info("run %s is %s: nothing to do", run.pk, run.status)
            return Outcome.TERMINAL, run
        if run.worker != worker and run_is_alive(run, now=now):
            log.warning(
                "run %s: duplicate delivery; %s holds it (heartbeat %s)",
                run.pk,
                run.worker,
                run.heartbeat_at,
            )
            return Outcome.DUPLICATE, run
        if run.attempts >= run.max_attempts:
            last = run.error or (
                f"the worker {run.worker or '?'} was lost (killed, out of memory or restarted) "
                f"during attempt {run.attempts}"
            )
            run.error = f"gave up after {run.attempts} attempts; last error: {last}"
            run.status = RunStatus.FAILED
            run.finished_at = now
            run.log_tail = _append_tail(run.log_tail, run.error)
            run.save(update_fields=["error", "status", "finished_at", "log_tail"])
            log.error("run %s: %s", run.pk, run.error)
            return Outcome.GAVE_UP, run
        if run.status == RunStatus.RUNNING:
            lost = (
                f"attempt {run.attempts} lost its worker {run.worker} "
                f"(last heartbeat {run.heartbeat_at:%Y-%m-%d %H:%M:%S})"
                if run.heartbeat_at
                else f"attempt {run.attempts} lost its worker {run.worker}"
            )
            run.log_tail = _append_tail(run.log_tail, lost)
        run.attempts += 1
        run.status = RunStatus.RUNNING
        run.worker = worker
        run.heartbeat_at = now
        run.started_at = run.started_at or now
        run.log_tail = _append_tail(run.log_tail, f"attempt {run.attempts} started on {worker}")
        run.save(
            update_fields=[
                "attempts",
                "status",
                "worker",
                "heartbeat_at",
                "started_at",
                "log_tail",
            ]
        )
        return None, run


def run_execute(*, run_id: int, worker: str | None = None) -> Outcome:
    """Claim the run, snapshot its data, train (resuming from a checkpoint), register the
    model. Idempotent; see the module docstring for every case."""
    worker = worker or worker_name()
    outcome, run = _claim(run_id, worker)
    if outcome is not None:
        return outcome
    try:
        snapshot_ensure(run=run)
        metrics = _train(run=run, worker=worker)
    except Exception as exc:
        log.exception("run %s failed", run.pk)
        _finish_failed(run.pk, worker, f"{type(exc).__name__}: {exc}")
        return Outcome.FAILED
    _finish_succeeded(run.pk, worker, metrics)
    return Outcome.SUCCEEDED


def _finish_failed(run_id: int, worker: str, error: str) -> None:
    with transaction.atomic():
        run = TrainingRun.objects.select_for_update().get(pk=run_id)
        if run.worker != worker or run.is_terminal:
            return
        run.status = RunStatus.FAILED
        run.error = error[:4000]
        run.finished_at = timezone.now()
        run.log_tail = _append_tail(run.log_tail, f"attempt {run.attempts} failed: {error}")
        run.save(update_fields=["status", "error", "finished_at", "log_tail"])


def _finish_succeeded(run_id: int, worker: str, metrics: dict[str, Any]) -> None:
    with transaction.atomic():
        run = TrainingRun.objects.select_for_update().select_related("campaign").get(pk=run_id)
        if run.worker != worker or run.is_terminal:
            return
        ModelVersion.objects.create(
            kind=ModelKind.REWARD,
            name=f"{run.campaign.slug}-reward-run{run.pk}",
            base_model=str(run.config.get("base_model", "")),
            artifact=run.output_dir,
            metrics=metrics,
            run=run,
        )
        run.status = RunStatus.SUCCEEDED
        run.progress = 1.0
        run.step = run.total_steps
        run.error = ""
        run.finished_at = timezone.now()
        run.heartbeat_at = run.finished_at
        run.log_tail = _append_tail(run.log_tail, f"attempt {run.attempts} succeeded")
        run.save(
            update_fields=[
                "status",
                "progress",
                "step",
                "error",
                "finished_at",
                "heartbeat_at",
                "log_tail",
            ]
        )


def _append_tail(tail: str, line: str) -> str:
    stamp = timezone.now().strftime("%H:%M:%S")
    lines = [*tail.splitlines(), f"{stamp} {line}"]
    return "\n".join(lines[-LOG_TAIL_LINES:])


# -- dataset snapshot ---------------------------------------------------------------------------


def run_folder(run: TrainingRun) -> Path:
    return Path(settings.ARTIFACTS_ROOT) / "runs" / str(run.pk)


def _weights_up_to(campaign: Campaign, cutoff: int) -> dict[int, float]:
    """Dawid-Skene rater weights from the judgments up to ``cutoff`` only, so a snapshot is a
    function of its cutoff (``reports.judgment_weights`` uses every judgment)."""
    rows = list(
        Judgment.objects.filter(campaign=campaign, id__lte=cutoff)
        .order_by("id")
        .values_list("comparison_id", "rater_id", "choice")
    )
    if not rows:
        return {}
    allowed = {"a", "b"}
    if campaign.allow_tie:
        allowed.add("tie")
    if campaign.allow_both_bad:
        allowed.add("both_bad")
    seen = {choice for _, _, choice in rows}
    classes = tuple(c for c in quality.CHOICES if c in allowed | seen)
    ds = quality.dawid_skene(
        (quality.Rating(item, rater, choice) for item, rater, choice in rows), classes=classes
    )
    return {cast(int, r): quality.judgment_weight(ds, r) for r in ds.reliability}


def snapshot_lines(*, campaign: Campaign, cutoff: int) -> Iterator[bytes]:
    """The export lines of every judgment with id <= ``cutoff``, in id order, both-bad ones
    left out."""
    judgments = (
        j
        for j in takewhile(
            lambda j: j.pk <= cutoff, selectors.judgments_for_export(campaign=campaign)
        )
        if j.choice != "both_bad"
    )
    weights = _weights_up_to(campaign, cutoff)
    return formats.export_lines(judgments, fmt=SNAPSHOT_FORMAT, weights=weights)


def snapshot_write(*, campaign: Campaign, cutoff: int, path: Path) -> tuple[str, int]:
    """Write the snapshot atomically (temp file + ``os.replace``); returns (sha256, lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    digest = hashlib.sha256()
    lines = 0
    with open(tmp, "wb") as f:
        for line in snapshot_lines(campaign=campaign, cutoff=cutoff):
            f.write(line)
            digest.update(line)
            lines += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return digest.hexdigest(), lines


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def snapshot_ensure(*, run: TrainingRun) -> Path:
    """The run's dataset file. The first attempt pins the cutoff (the campaign's newest
    judgment) and records the hash; a later attempt reuses the file, rebuilding it from the
    same cutoff if it is missing, and refuses to train on data whose hash differs."""
    path = run_folder(run) / "data.jsonl"
    if run.judgment_cutoff is None:
        cutoff = Judgment.objects.filter(campaign_id=run.campaign_id).aggregate(m=Max("id"))["m"]
        if cutoff is None:
            raise RunError("the campaign has no judgments to train on")
        run.judgment_cutoff = cutoff
    if run.dataset_sha256 and path.is_file() and _file_sha256(path) == run.dataset_sha256:
        return path
    sha, lines = snapshot_write(campaign=run.campaign, cutoff=run.judgment_cutoff, path=path)
    if run.dataset_sha256 and sha != run.dataset_sha256:
        raise RunError(
            f"the dataset snapshot up to judgment {run.judgment_cutoff} no longer hashes to "
            f"{run.dataset_sha256[:12]} (got {sha[:12]}); start a new run"
        )
    if lines == 0:
        raise RunError("the campaign has no usable judgments up to the cutoff")
    run.dataset_sha256, run.dataset_path, run.dataset_pairs = sha, str(path), lines
    TrainingRun.objects.filter(pk=run.pk).update(
        judgment_cutoff=run.judgment_cutoff,
        dataset_sha256=sha,
        dataset_path=str(path),
        dataset_pairs=lines,
    )
    return path


# -- training with a heartbeat ------------------------------------------------------------------


class _TailHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.lines: deque[str] = deque(maxlen=LOG_TAIL_LINES)

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.lines.append(self.format(record))


class _Heartbeat(threading.Thread):
    """Every few seconds: heartbeat, step, progress, new metrics lines as RunMetric rows.

    Writes only while the row still names this worker, and closes its own database
    connection when it stops."""

    def __init__(self, run: TrainingRun, worker: str, metrics_path: Path, total: int) -> None:
        super().__init__(name=f"heartbeat-run-{run.pk}", daemon=True)
        self.run_id, self.worker, self.metrics_path, self.total = (
            run.pk,
            worker,
            metrics_path,
            total,
        )
        self.stop_event = threading.Event()
        self.offset = 0
        self.step = 0
        self.tail: _TailHandler | None = None
        self.base_tail = run.log_tail

    def run(self) -> None:
        try:
            while not self.stop_event.wait(settings.TRAINING_HEARTBEAT_SECONDS):
                with contextlib.suppress(Exception):
                    self.beat()
        finally:
            connection.close()

    def _new_rows(self) -> tuple[list[dict[str, Any]], int]:
        """Complete lines after ``self.offset``, and the offset after them."""
        if not self.metrics_path.is_file():
            return [], self.offset
        offset = self.offset
        if self.metrics_path.stat().st_size < offset:  # a resumed trainer rewrote the file
            offset = 0
        rows = []
        with open(self.metrics_path, "rb") as f:
            f.seek(offset)
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # a line still being written
                offset += len(raw)
                with contextlib.suppress(ValueError):
                    rows.append(json.loads(raw))
        return rows, offset

    def beat(self) -> None:
        metrics = []
        rows, offset = self._new_rows()
        for row in rows:
            step = int(row.get("step", 0))
            self.step = max(self.step, step)
            for name, value in row.items():
                if name in ("step", "time") or isinstance(value, bool):
                    continue
                if isinstance(value, int | float) and math.isfinite(value):
                    metrics.append(
                        RunMetric(run_id=self.run_id, step=step, name=name[:64], value=value)
                    )
        if metrics:
            # A resumed attempt repeats the steps after its checkpoint: the new value wins.
            RunMetric.objects.bulk_create(
                metrics,
                update_conflicts=True,
                unique_fields=["run", "step", "name"],
                update_fields=["value"],
            )
        fields: dict[str, Any] = {"heartbeat_at": timezone.now()}
        if self.total:
            fields["step"] = min(self.step, self.total)
            fields["progress"] = min(1.0, self.step / self.total)
        if self.tail is not None and self.tail.lines:
            fields["log_tail"] = "\n".join(
                [*self.base_tail.splitlines(), *self.tail.lines][-LOG_TAIL_LINES:]
            )
        TrainingRun.objects.filter(
            pk=self.run_id, worker=self.worker, status=RunStatus.RUNNING
        ).update(**fields)
        # Only now: lines whose write failed are read again on the next beat.
        self.offset = offset


def _total_steps(config: Any, pairs: int) -> int:
    if config.max_steps > 0:
        return int(config.max_steps)
    train = pairs - (max(1, round(pairs * config.eval_fraction)) if config.eval_fraction else 0)
    return max(1, math.ceil(config.num_epochs * max(1, train) / config.batch_size))


def _train(*, run: TrainingRun, worker: str) -> dict[str, Any]:
    # Imported here: torch and transformers load only in the worker that trains.
    from training.core.checkpoint import find_resumable
    from training.core.reward import RewardConfig
    from training.core.reward import run as reward_run

    out = run_folder(run) / "model"
    options = {k: v for k, v in run.config.items() if k != "base_model"}
    config = RewardConfig(
        model=str(run.config["base_model"]),
        data=run.dataset_path,
        output_dir=str(out),
        resume=True,
        **options,
    )
    total = _total_steps(config, run.dataset_pairs)
    resume_from = find_resumable(out)
    note = (
        f"attempt {run.attempts}: resuming from checkpoint step {int(resume_from.name[5:])}"
        if resume_from is not None
        else f"attempt {run.attempts}: training from step 0"
    )
    if resume_from is None and out.exists():
        # Files of an attempt that died before its first checkpoint: start clean.
        shutil.rmtree(out, ignore_errors=True)
    run.log_tail = _append_tail(run.log_tail, note)
    TrainingRun.objects.filter(pk=run.pk).update(
        output_dir=str(out), total_steps=total, log_tail=run.log_tail
    )
    run.output_dir, run.total_steps = str(out), total
    log.info("run %s: %s", run.pk, note)

    heartbeat = _Heartbeat(run, worker, out / "metrics.jsonl", total)
    tail = _TailHandler()
    tail.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    heartbeat.tail = tail
    core_logger = logging.getLogger("training.core")
    core_logger.addHandler(tail)
    heartbeat.start()
    try:
        metrics = reward_run(config)
    finally:
        core_logger.removeHandler(tail)
        heartbeat.stop_event.set()
        heartbeat.join(timeout=30)
        if not connection.in_atomic_block:
            # Hours of training may have outlived the connection (server restart, timeout).
            close_old_connections()
    heartbeat.beat()  # the last metrics lines, in this thread's connection
    eval_path = out / "eval.json"
    if eval_path.is_file():
        metrics = json.loads(eval_path.read_text(encoding="utf-8"))
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | str | None)}
