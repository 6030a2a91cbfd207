"""The training REST API, mounted under ``/api/training/``: one DRF class per operation,
thin, with the HTML pages' access rules (``training.access``) and the same services.

Authentication as in ``annotation.api``: ``Authorization: Token <key>`` for machines, the
session (with CSRF) for the browser.
"""

from annotation.api.base import name_nested_serializers
from training.api.rounds import (
    RoundCancelApi,
    RoundCreateApi,
    RoundDetailApi,
    RoundListApi,
    RoundsApi,
    ScheduleApi,
    ScheduleGetApi,
    ScheduleSetApi,
)
from training.api.runs import RunCancelApi, RunDetailApi, RunListApi, RunMetricsApi
from training.api.versions import VersionDetailApi, VersionListApi

# Every API class is defined now: name their nested serializers for the OpenAPI schema
# (annotation.api did the same for its own when it was imported; naming twice is harmless).
name_nested_serializers()

__all__ = [
    "RoundCancelApi",
    "RoundCreateApi",
    "RoundDetailApi",
    "RoundListApi",
    "RoundsApi",
    "RunCancelApi",
    "RunDetailApi",
    "RunListApi",
    "RunMetricsApi",
    "ScheduleApi",
    "ScheduleGetApi",
    "ScheduleSetApi",
    "VersionDetailApi",
    "VersionListApi",
]
