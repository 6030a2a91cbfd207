"""Celery tasks of the training domain: take ids, call one service.

Routing (settings ``CELERY_TASK_ROUTES``): ``run_training`` goes to the ``training`` queue,
served by workers with concurrency 1 (one run per GPU box).
"""

from __future__ import annotations

from typing import Any

from celery import shared_task
from django.conf import settings
from django.db import close_old_connections

from training.services import runs


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
    dies, this message is what resumes the run."""
    close_old_connections()
    try:
        outcome = runs.run_execute(run_id=run_id, worker=runs.worker_name())
    finally:
        close_old_connections()
    if outcome == runs.Outcome.DUPLICATE:
        raise self.retry(countdown=settings.TRAINING_HEARTBEAT_STALE_SECONDS)
    return str(outcome)


def enqueue_run(run_id: int) -> None:
    """What callers of ``runs.run_create`` pass as ``enqueue``."""
    run_training.delay(run_id)
