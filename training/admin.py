"""Training runs, their metrics and the model registry in the Django admin: read-only, since a
run's row is the state machine the workers drive (runs are started through the service)."""

from __future__ import annotations

from django.contrib import admin

from annotation.admin import ReadOnlyAdmin
from training.models import ModelVersion, RunMetric, TrainingRun


@admin.register(TrainingRun)
class TrainingRunAdmin(ReadOnlyAdmin):
    list_display = ("id", "kind", "campaign", "status", "step", "attempts", "created_at")
    list_filter = ("kind", "status")
    search_fields = ("campaign__name", "error")


@admin.register(RunMetric)
class RunMetricAdmin(ReadOnlyAdmin):
    list_display = ("run", "step", "name", "value")
    list_filter = ("name",)


@admin.register(ModelVersion)
class ModelVersionAdmin(ReadOnlyAdmin):
    list_display = ("id", "kind", "name", "base_model", "parent", "run", "created_at")
    list_filter = ("kind",)
    search_fields = ("name", "base_model")
