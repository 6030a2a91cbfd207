"""Celery tasks of the training domain: take ids, call one service.

Routing (settings ``CELERY_TASK_ROUTES``): ``run_training`` goes to the ``training`` queue,
served by workers with concurrency 1 (one run per GPU box); advancing rounds and the beat tick
are light and go to ``default``.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task
from django.conf import settings
from django.db import close_old_connections

from training.services import rounds, runs


@shared_task(
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    queue="training",
    max_retries=None,
)
def run_training(self: Any, run_id: int) -> str:
    """Drive one TrainingRun (``runs.run_execute``). A duplicate delivery that finds another
    live worker on the run asks again later instead of dropping the message: if that worker
    dies, this message is what resumes the run. What follows a finished run (the next stage
    of its round, critiques of fresh candidates) is ``rounds.run_finished``."""
    close_old_connections()
    try:
        outcome = runs.run_execute(run_id=run_id, worker=runs.worker_name())
        if outcome in (*runs.FINISHED_OUTCOMES, runs.Outcome.TERMINAL):
            rounds.run_finished(run_id=run_id, enqueue_run=enqueue_run, enqueue_round=enqueue_round)
    finally:
        close_old_connections()
    if outcome == runs.Outcome.DUPLICATE:
        raise self.retry(countdown=settings.TRAINING_HEARTBEAT_STALE_SECONDS)
    if outcome == runs.Outcome.REQUEUE:
        raise self.retry(countdown=1)
    return str(outcome)


@shared_task(acks_late=True, reject_on_worker_lost=True, queue="default")
def advance_round(round_id: int) -> str:
    """Move a round to its next stage (``rounds.round_advance``; idempotent)."""
    return str(rounds.round_advance(round_id=round_id, enqueue_run=enqueue_run).stage)


@shared_task(queue="default", ignore_result=True)
def loop_tick() -> list[str]:
    """Beat, every ``LOOP_TICK_SECONDS``: the watchdog and the loop schedules."""
    return rounds.loop_tick(enqueue_run=enqueue_run, enqueue_round=enqueue_round)


def enqueue_run(run_id: int) -> None:
    """What callers of ``runs.run_create`` pass as ``enqueue``."""
    run_training.delay(run_id)


def enqueue_round(round_id: int) -> None:
    """What callers of ``rounds.round_create`` pass as ``enqueue``."""
    advance_round.delay(round_id)
