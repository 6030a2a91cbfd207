"""The Celery app. Configuration comes from Django settings (the ``CELERY_`` names).

Tasks take ids and call one service; the database is the source of truth, so there is no
result backend. Every task opens and closes its database connections around itself (R17): a
worker that lived through a database restart never reuses a dead connection.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import task_postrun, task_prerun

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "rlhf_site.settings")

app = Celery("rlhf_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@task_prerun.connect
def _close_connections_before(**_: Any) -> None:
    from django.db import close_old_connections

    close_old_connections()


@task_postrun.connect
def _close_connections_after(**_: Any) -> None:
    from django.db import close_old_connections

    close_old_connections()
