"""The Django project. The Celery app is loaded here so ``shared_task`` binds to it."""

from rlhf_site.celery import app as celery_app

__all__ = ("celery_app",)
