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
import time
from collections import deque
from collections.abc import Callable, Iterator
from datetime import timedelta
from itertools import takewhile
from pathlib import Path
from typing import Any, cast

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import IntegrityError, close_old_connections, connection, transaction
from django.db.models import Max
from django.utils import timezone

from annotation import formats, quality, selectors
from annotation.models import Campaign, Judgment, Prompt, SourceKind, Split
from annotation.services.items import source_get_or_create
from training.core.tracking import PAUSE_FILE, STOP_FILE, StopRequested
from training.models import (
    ACTIVE_STATUSES,
    ModelKind,
    ModelVersion,
    Round,
    RunKind,
    RunMetric,
    RunStatus,
    TrainingRun,
)
from training.services.progress import Reporter, RunCancelled

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
    CANCELLED = "cancelled"
    REQUEUE = "requeue"


# Outcomes after which the run is over (a round moves on from these).
FINISHED_OUTCOMES = (Outcome.SUCCEEDED, Outcome.FAILED, Outcome.GAVE_UP, Outcome.CANCELLED)


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
    "lora_top_layers": int,
    "processes": int,
    "gradient_checkpointing": bool,
    "device": str,
    "dtype": str,
}
_NUMBER = (int, float)
_TRAINER_KEYS: dict[str, type | tuple[type, ...]] = {
    "base_model": str,
    "max_steps": int,
    "batch_size": int,
    "grad_accum": int,
    "learning_rate": _NUMBER,
    "lr_schedule": str,
    "warmup_steps": int,
    "weight_decay": _NUMBER,
    "max_length": int,
    "max_prompt_length": int,
    "save_every": int,
    "log_every": int,
    "seed": int,
    "lora": bool,
    "lora_r": int,
    "lora_alpha": int,
    "lora_top_layers": int,
    "processes": int,
    "gradient_checkpointing": bool,
    "device": str,
    "dtype": str,
}
_SAMPLING_KEYS: dict[str, type | tuple[type, ...]] = {
    "max_new_tokens": int,
    "temperature": _NUMBER,
    "batch_size": int,
    "seed": int,
    "device": str,
}
_OPTIONAL_INT = (int, type(None))
CONFIG_KEYS: dict[str, dict[str, type | tuple[type, ...]]] = {
    RunKind.REWARD: REWARD_CONFIG_KEYS,
    RunKind.DPO: {
        **_TRAINER_KEYS,
        "reference_model": str,
        "beta": _NUMBER,
        "loss_type": str,
        "label_smoothing": _NUMBER,
        "kl_prompts": int,
        "kl_samples": int,
        "kl_max_new_tokens": int,
    },
    RunKind.PPO: {
        **_TRAINER_KEYS,
        "reward_model": str,
        "ref_model": str,
        "kl_coef": _NUMBER,
        "max_new_tokens": int,
        "temperature": _NUMBER,
        "num_ppo_epochs": int,
        "num_minibatches": int,
        "split": str,
        "prompts_per_round": int,
    },
    RunKind.EVAL: {
        **_SAMPLING_KEYS,
        "base_model": str,
        "ref_model": str,
        "reward_model": str,
        "baseline_model": str,
        "num_samples": int,
        "eval_prompts": int,
        "split": str,
        "max_prompt_length": int,
        "dtype": str,
    },
    RunKind.GENERATE: {
        **_SAMPLING_KEYS,
        "model": str,
        "source_name": str,
        "round_number": _OPTIONAL_INT,
        "num_samples": int,
        "top_p": _NUMBER,
        "split": str,
        "prompts_per_round": int,
        "strategy": str,
        "previous_source": str,
        "previous_model": str,
        "reward_model": str,
        "pairs_per_prompt": int,
        "critiques": bool,
        "dtype": str,
        "max_prompt_length": int,
        "max_length": int,
    },
    RunKind.CRITIQUE: {
        **_SAMPLING_KEYS,
        "model": str,
        "critic_name": str,
        "template": str,
        "round_number": _OPTIONAL_INT,
        "top_p": _NUMBER,
        "dtype": str,
        "max_prompt_length": int,
    },
}
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    RunKind.REWARD: ("base_model",),
    RunKind.DPO: ("base_model",),
    RunKind.PPO: ("base_model", "reward_model"),
    RunKind.EVAL: ("base_model",),
    RunKind.GENERATE: ("model", "source_name"),
    RunKind.CRITIQUE: ("model", "critic_name"),
}
# Kinds whose success registers a model version, and of which kind.
VERSION_KINDS: dict[str, str] = {
    RunKind.REWARD: ModelKind.REWARD,
    RunKind.DPO: ModelKind.POLICY,
    RunKind.PPO: ModelKind.POLICY,
}


def _as_tuple(expected: type | tuple[type, ...]) -> tuple[type, ...]:
    return expected if isinstance(expected, tuple) else (expected,)


def run_config_clean(*, kind: str, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` checked against the allowlist of ``kind``; raises ``RunError`` naming every
    problem."""
    if kind not in CONFIG_KEYS:
        raise RunError(f"unknown run kind {kind!r}; expected one of {', '.join(CONFIG_KEYS)}")
    allowed = CONFIG_KEYS[kind]
    problems = []
    for key in sorted(config):
        if key not in allowed:
            problems.append(f"{key}: not a setting of a {kind} run")
            continue
        expected = allowed[key]
        value = config[key]
        # bool is an int in Python; an int field must not take True.
        if isinstance(value, bool) and expected is not bool and bool not in _as_tuple(expected):
            problems.append(f"{key}: expected a number, got {value!r}")
        elif not isinstance(value, expected):
            names = expected if isinstance(expected, tuple) else (expected,)
            want = " or ".join(t.__name__ for t in names)
            problems.append(f"{key}: expected {want}, got {type(value).__name__}")
    for key in REQUIRED_KEYS[kind]:
        if key not in config:
            problems.append(f"{key}: required")
    for key, low in (("max_steps", -1), ("batch_size", 1), ("save_every", 0), ("log_every", 1)):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < low:
            problems.append(f"{key}: must be at least {low}")
    if config.get("max_steps") == 0:
        problems.append("max_steps: must be positive, or -1 for whole epochs")
    if not problems and kind in (RunKind.GENERATE, RunKind.CRITIQUE):
        # Their own checks (strategy, template placeholders), so a bad one fails now rather
        # than in the worker.
        from training.services import candidates, critiques

        check = (
            candidates.generate_settings
            if kind == RunKind.GENERATE
            else critiques.critique_settings
        )
        try:
            check(config)
        except ValueError as exc:
            problems.append(str(exc))
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
    round: Round | None = None,
    input_version: ModelVersion | None = None,
    judgment_cutoff: int | None = None,
) -> TrainingRun:
    """A queued run; ``enqueue(run_id)`` is called once the transaction commits.

    The database allows one queued-or-running run per campaign and kind: a second one raises
    ``RunAlreadyActive`` ("skipped: ...") instead of starting twice. ``judgment_cutoff`` pins
    the snapshot (a round's runs all learn from the judgments up to the round's cutoff).
    """
    clean = run_config_clean(kind=kind, config=config)
    try:
        with transaction.atomic():
            run = TrainingRun.objects.create(
                campaign=campaign,
                kind=kind,
                config=clean,
                round=round,
                input_version=input_version,
                judgment_cutoff=judgment_cutoff,
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


def run_cancel(*, run: TrainingRun) -> TrainingRun:
    """Stop a run. A queued one is cancelled at once (its message finds it terminal); a
    running one is asked to stop: its worker notices within a heartbeat (a trainer at its next
    logged step, generation at its next batch) and marks it cancelled. Finished runs are left
    as they are."""
    with transaction.atomic():
        run = TrainingRun.objects.select_for_update().get(pk=run.pk)
        if run.is_terminal or run.cancel_requested:
            return run
        run.cancel_requested = True
        fields = ["cancel_requested", "log_tail"]
        if run.status == RunStatus.QUEUED:
            run.status = RunStatus.CANCELLED
            run.finished_at = timezone.now()
            fields += ["status", "finished_at"]
            run.log_tail = _append_tail(run.log_tail, "cancelled before it started")
        else:
            run.log_tail = _append_tail(run.log_tail, "cancel requested")
        run.save(update_fields=fields)
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
        if run.cancel_requested and not run_is_alive(run, now=now):
            # Asked to stop while its worker was gone: nothing to resume.
            _set_cancelled(run, now)
            return Outcome.CANCELLED, run
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
    """Claim the run, do its work (resuming from a checkpoint), record the results and any
    model it made. Idempotent; see the module docstring for every case."""
    worker = worker or worker_name()
    outcome, run = _claim(run_id, worker)
    if outcome is not None:
        return outcome
    try:
        results = _work(run=run, worker=worker)
    except (RunCancelled, StopRequested) as exc:
        cancelled = TrainingRun.objects.filter(pk=run.pk, cancel_requested=True).exists()
        if isinstance(exc, StopRequested) and not cancelled and _paused(run):
            _release(run.pk, worker, f"{exc} (near the time limit); the next attempt resumes")
            return Outcome.REQUEUE
        _finish_cancelled(run.pk, worker)
        return Outcome.CANCELLED
    except SoftTimeLimitExceeded:
        # Out of time for this attempt, not broken: hand the run back so the task's retry
        # resumes it from its newest checkpoint (attempts still count, so it cannot loop).
        _release(run.pk, worker, "the soft time limit was reached; resuming from a checkpoint")
        return Outcome.REQUEUE
    except Exception as exc:
        log.exception("run %s failed", run.pk)
        _finish_failed(run.pk, worker, f"{type(exc).__name__}: {exc}")
        return Outcome.FAILED
    _finish_succeeded(run.pk, worker, results)
    return Outcome.SUCCEEDED


def _paused(run: TrainingRun) -> bool:
    return bool(run.output_dir) and (Path(run.output_dir) / PAUSE_FILE).exists()


def _locked_if_mine(run_id: int, worker: str) -> TrainingRun | None:
    """The run, locked, if this worker still holds it and it is not finished."""
    run = TrainingRun.objects.select_for_update().get(pk=run_id)
    if run.worker != worker or run.is_terminal:
        return None
    return run


def _finish_failed(run_id: int, worker: str, error: str) -> None:
    with transaction.atomic():
        run = _locked_if_mine(run_id, worker)
        if run is None:
            return
        run.status = RunStatus.FAILED
        run.error = error[:4000]
        run.finished_at = timezone.now()
        run.log_tail = _append_tail(run.log_tail, f"attempt {run.attempts} failed: {error}")
        run.save(update_fields=["status", "error", "finished_at", "log_tail"])


def _set_cancelled(run: TrainingRun, now: Any) -> None:
    run.status = RunStatus.CANCELLED
    run.finished_at = now
    run.log_tail = _append_tail(run.log_tail, "cancelled")
    run.save(update_fields=["status", "finished_at", "log_tail"])


def _finish_cancelled(run_id: int, worker: str) -> None:
    with transaction.atomic():
        run = _locked_if_mine(run_id, worker)
        if run is not None:
            _set_cancelled(run, timezone.now())


def _release(run_id: int, worker: str, why: str) -> None:
    """Leave the run RUNNING with no heartbeat: the next delivery claims and resumes it."""
    with transaction.atomic():
        run = _locked_if_mine(run_id, worker)
        if run is None:
            return
        run.heartbeat_at = None
        run.log_tail = _append_tail(run.log_tail, f"attempt {run.attempts}: {why}")
        run.save(update_fields=["heartbeat_at", "log_tail"])


def version_name(run: TrainingRun) -> str:
    return f"{run.campaign.slug}-{VERSION_KINDS[run.kind]}-run{run.pk}"


def _finish_succeeded(run_id: int, worker: str, results: dict[str, Any]) -> None:
    with transaction.atomic():
        run = _locked_if_mine(run_id, worker)
        if run is None:
            return
        if run.kind in VERSION_KINDS:
            kind = VERSION_KINDS[run.kind]
            name = version_name(run)
            source = (
                source_get_or_create(name=name, kind=SourceKind.POLICY)
                if kind == ModelKind.POLICY
                else None
            )
            ModelVersion.objects.create(
                kind=kind,
                name=name,
                base_model=str(run.config.get("base_model", "")),
                parent=run.input_version,
                artifact=run.output_dir,
                metrics=results,
                run=run,
                source=source,
            )
        run.results = results
        run.status = RunStatus.SUCCEEDED
        run.progress = 1.0
        run.step = run.total_steps
        run.error = ""
        run.finished_at = timezone.now()
        run.heartbeat_at = run.finished_at
        run.log_tail = _append_tail(run.log_tail, f"attempt {run.attempts} succeeded")
        run.save(
            update_fields=[
                "results",
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
        # Near the soft time limit, ask the trainer to save and stop (``PAUSE``), so the next
        # attempt resumes from that step instead of the last periodic checkpoint.
        limit = float(settings.CELERY_TASK_SOFT_TIME_LIMIT)
        self.pause_at = (
            time.monotonic() + limit - min(float(settings.TRAINING_PAUSE_MARGIN_SECONDS), limit / 4)
        )
        self.paused = False
        self.log_every = int(run.config.get("log_every", 1) or 1)
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

    def _pause_near_the_limit(self) -> None:
        if not self.total or self.paused or time.monotonic() < self.pause_at:
            return
        rows, _ = self._new_rows()  # the newest step, not the one of the last beat
        newest = max([self.step, *(int(r.get("step", 0)) for r in rows)])
        # A few steps ahead of what the metrics show, so every process is still before it.
        target = newest + 2 * self.log_every + 2
        pause = self.metrics_path.parent / PAUSE_FILE
        tmp = pause.with_name(f".{PAUSE_FILE}.tmp")
        tmp.write_text(str(target))
        os.replace(tmp, pause)
        self.paused = True
        log.warning("run %s: near the time limit; pausing after step %d", self.run_id, target)

    def beat(self) -> None:
        self._pause_near_the_limit()  # files only: works even while the database does not
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
        if TrainingRun.objects.filter(pk=self.run_id, cancel_requested=True).exists():
            # The trainer stops at its next logged step (``MetricsWriter`` sees the file).
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            (self.metrics_path.parent / STOP_FILE).touch()


def _total_steps(config: Any, pairs: int) -> int:
    if config.max_steps > 0:
        return int(config.max_steps)
    eval_fraction = getattr(config, "eval_fraction", 0.0)
    train = pairs - (max(1, round(pairs * eval_fraction)) if eval_fraction else 0)
    return max(1, math.ceil(config.num_epochs * max(1, train) / config.batch_size))


def prompts_write(*, campaign: Campaign, split: str, limit: int, path: Path) -> int:
    """The campaign's prompts of ``split`` (the train split when it has none), oldest first,
    at most ``limit`` (0: all), as ``{"prompt": [...messages]}`` lines; returns how many."""
    prompts = Prompt.objects.filter(campaign=campaign).order_by("id")
    chosen = prompts.filter(split=split)
    if not chosen.exists():
        chosen = prompts.filter(split=Split.TRAIN)
    if limit > 0:
        chosen = chosen[:limit]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    count = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for messages, external_id, pk in chosen.values_list("messages", "external_id", "pk"):
            f.write(json.dumps({"prompt": messages, "id": external_id or str(pk)}) + "\n")
            count += 1
    os.replace(tmp, path)
    if count == 0:
        raise RunError("the campaign has no prompts")
    return count


# What each trainer kind reads from the run's config beyond its core config's own fields.
_SERVICE_KEYS = {
    "base_model",
    "reward_model",
    "split",
    "prompts_per_round",
    "eval_prompts",
    "processes",
}


def _run_prompts(run: TrainingRun, name: str, split: str, limit_key: str) -> Path:
    """The prompts file a PPO or evaluation run reads, in its own folder."""
    path = run_folder(run) / name
    prompts_write(
        campaign=run.campaign,
        split=str(run.config.get("split", split)),
        limit=int(run.config.get(limit_key, 0)),
        path=path,
    )
    return path


def _core_config(run: TrainingRun, out: Path) -> tuple[Any, Callable[[Any], dict[str, Any]]]:
    """The ``training.core`` config and entry point of a trainer run."""
    config: Any
    options: dict[str, Any] = {k: v for k, v in run.config.items() if k not in _SERVICE_KEYS}
    common: dict[str, Any] = {
        "model": str(run.config["base_model"]),
        "output_dir": str(out),
        "resume": True,
    }
    if run.kind == RunKind.REWARD:
        from training.core import reward

        config = reward.RewardConfig(data=run.dataset_path, **common, **options)
        return config, reward.run
    if run.kind == RunKind.DPO:
        from training.core import dpo

        # The snapshot's held-out share is not split off here: the round's evaluation step
        # measures the policy on held-out prompts, and the reward run holds out judgments.
        config = dpo.DPOConfig(data=run.dataset_path, **common, **options)
        return config, dpo.run
    if run.kind == RunKind.PPO:
        from training.core import ppo

        prompts = _run_prompts(run, "prompts.jsonl", Split.TRAIN, "prompts_per_round")
        config = ppo.PPOConfig(
            data=str(prompts), reward=str(run.config["reward_model"]), **common, **options
        )
        return config, ppo.run
    if run.kind == RunKind.EVAL:
        from training.core import evaluate

        prompts = _run_prompts(run, "eval_prompts.jsonl", Split.EVAL, "eval_prompts")
        config = evaluate.EvaluateConfig(
            task="policy",
            data=str(prompts),
            reward_model=str(run.config.get("reward_model", "")),
            max_steps=1,
            **common,
            **options,
        )
        return config, evaluate.run
    raise RunError(f"{run.kind} runs are not trainer runs")


def _work(*, run: TrainingRun, worker: str) -> dict[str, Any]:
    if run.kind in (RunKind.REWARD, RunKind.DPO):
        snapshot_ensure(run=run)
    if run.kind in (RunKind.GENERATE, RunKind.CRITIQUE):
        return _service_step(run=run, worker=worker)
    return _train(run=run, worker=worker)


def _reporter(run: TrainingRun, worker: str) -> Reporter:
    """Progress of a step that runs in the service: heartbeat, step, progress and metrics
    rows after each batch; raises ``RunCancelled`` once a cancel was requested."""

    def report(done: int, total: int, /, **metrics: float) -> None:
        rows = [
            RunMetric(run_id=run.pk, step=done, name=name[:64], value=float(value))
            for name, value in metrics.items()
            if isinstance(value, int | float) and math.isfinite(value)
        ]
        if rows:
            RunMetric.objects.bulk_create(
                rows,
                update_conflicts=True,
                unique_fields=["run", "step", "name"],
                update_fields=["value"],
            )
        TrainingRun.objects.filter(pk=run.pk, worker=worker, status=RunStatus.RUNNING).update(
            step=done,
            total_steps=total,
            progress=min(1.0, done / total) if total else 0.0,
            heartbeat_at=timezone.now(),
        )
        log.info("run %s (%s): %d/%d", run.pk, run.kind, done, total)
        if TrainingRun.objects.filter(pk=run.pk, cancel_requested=True).exists():
            raise RunCancelled(f"cancel requested at {done}/{total}")

    return report


def _service_step(*, run: TrainingRun, worker: str) -> dict[str, Any]:
    """Candidate generation and critiques run here (they write rows as they go), with a
    heartbeat thread that keeps the run alive while one long batch decodes."""
    out = run_folder(run)
    TrainingRun.objects.filter(pk=run.pk).update(output_dir=str(out))
    run.output_dir = str(out)
    with _heartbeat_running(run, worker, out / "metrics.jsonl", 0):
        if run.kind == RunKind.GENERATE:
            from training.services.candidates import generate_execute

            results = generate_execute(run=run, report=_reporter(run, worker))
        else:
            from training.services.critiques import critique_execute

            results = critique_execute(run=run, report=_reporter(run, worker))
    return {k: v for k, v in results.items() if isinstance(v, int | float | str | None)}


@contextlib.contextmanager
def _heartbeat_running(
    run: TrainingRun, worker: str, metrics_path: Path, total: int
) -> Iterator[_Heartbeat]:
    heartbeat = _Heartbeat(run, worker, metrics_path, total)
    tail = _TailHandler()
    tail.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    heartbeat.tail = tail
    loggers = [logging.getLogger("training.core"), logging.getLogger("training.services")]
    for logger in loggers:
        logger.addHandler(tail)
    heartbeat.start()
    try:
        yield heartbeat
    finally:
        for logger in loggers:
            logger.removeHandler(tail)
        heartbeat.stop_event.set()
        heartbeat.join(timeout=30)
        if not connection.in_atomic_block:
            # Hours of work may have outlived the connection (server restart, timeout).
            close_old_connections()
    heartbeat.beat()  # the last metrics lines, in this thread's connection


_CLI_COMMANDS: dict[str, str] = {RunKind.REWARD: "reward", RunKind.DPO: "dpo", RunKind.PPO: "ppo"}


def _die_with_parent() -> None:  # pragma: no cover (runs in the child before exec)
    """Linux: the launcher gets SIGKILL when the worker process dies, so a killed worker
    leaves no training processes behind (its message is requeued and the run resumes)."""
    with contextlib.suppress(Exception):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _launch(run: TrainingRun, config: Any, processes: int) -> dict[str, Any]:
    """Run the trainer in ``processes`` processes (DDP, one per GPU) through the launcher
    command ``TRAINING_LAUNCHER`` (``torchrun`` by default; ``accelerate launch ...`` for
    DeepSpeed or FSDP configs). The same ``training.core`` command runs, reading its config
    from a file; the heartbeat reads the metrics file it writes, and a cancel reaches every
    process through the STOP file."""
    import dataclasses
    import shlex
    import subprocess
    import sys

    out = Path(config.output_dir)
    config_path = out.parent / f"{_CLI_COMMANDS[run.kind]}-config.json"
    config_path.write_text(json.dumps(dataclasses.asdict(config), indent=1), encoding="utf-8")
    launcher = [
        part.replace("{python}", sys.executable).replace("{processes}", str(processes))
        for part in shlex.split(settings.TRAINING_LAUNCHER)
    ]
    command = [
        *launcher,
        "-m",
        "training.core",
        _CLI_COMMANDS[run.kind],
        "--config",
        str(config_path),
    ]
    log.info("run %s: launching %s", run.pk, shlex.join(command))
    tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    launch_log = logging.getLogger("training.core.launch")
    with subprocess.Popen(
        command,
        cwd=settings.BASE_DIR,
        env={**os.environ, "PYTHONPATH": str(settings.BASE_DIR)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        preexec_fn=_die_with_parent,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            launch_log.info("%s", line.rstrip())
        code = proc.wait()
    if code != 0:
        if (out / STOP_FILE).exists():
            raise StopRequested("stop requested")
        raise RuntimeError(f"the launcher exited with {code}: " + " | ".join(list(tail)[-5:]))
    eval_path = out / "eval.json"
    return json.loads(eval_path.read_text(encoding="utf-8")) if eval_path.is_file() else {}


def _train(*, run: TrainingRun, worker: str) -> dict[str, Any]:
    # Imported here: torch and transformers load only in the worker that trains.
    from training.core.checkpoint import find_resumable

    out = run_folder(run) / "model"
    for leftover in (STOP_FILE, PAUSE_FILE):  # requests meant for an earlier attempt
        (out / leftover).unlink(missing_ok=True)
    config, trainer = _core_config(run, out)
    total = _total_steps(config, run.dataset_pairs) if run.kind != RunKind.EVAL else 1
    resume_from = find_resumable(out)
    note = (
        f"attempt {run.attempts}: resuming from checkpoint step {int(resume_from.name[5:])}"
        if resume_from is not None
        else f"attempt {run.attempts}: {run.kind} training from step 0"
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
    processes = int(run.config.get("processes", settings.TRAINING_PROCESSES))
    with _heartbeat_running(run, worker, out / "metrics.jsonl", total):
        if processes > 1 and run.kind in _CLI_COMMANDS:
            metrics = _launch(run, config, processes)
        else:
            metrics = trainer(config)
    eval_path = out / "eval.json"
    if eval_path.is_file():
        metrics = json.loads(eval_path.read_text(encoding="utf-8"))
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | str | None)}
