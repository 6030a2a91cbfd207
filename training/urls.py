"""The training app's routes: the ML staff pages under /training/ and the REST API under
/api/training/ (names ``training:*`` and ``training:api-*``). Mounted at the site root by
rlhf_site/urls.py, beside annotation's routes."""

from django.urls import URLPattern, URLResolver, include, path

from training import api
from training.views import rounds, runs, versions

app_name = "training"

page_urlpatterns: list[URLPattern | URLResolver] = [
    path("", runs.index, name="index"),
    path("campaigns/<slug:slug>/", rounds.campaign_training, name="campaign"),
    path("campaigns/<slug:slug>/rounds/new/", rounds.round_new, name="round_new"),
    path("campaigns/<slug:slug>/schedule/", rounds.schedule_update, name="schedule"),
    path("runs/<int:run_id>/", runs.run_detail, name="run"),
    path("runs/<int:run_id>/live/", runs.run_live, name="run_live"),
    path("runs/<int:run_id>/cancel/", runs.run_cancel, name="run_cancel"),
    path("rounds/<int:round_id>/", rounds.round_detail, name="round"),
    path("rounds/<int:round_id>/live/", rounds.round_live, name="round_live"),
    path("rounds/<int:round_id>/cancel/", rounds.round_cancel, name="round_cancel"),
    path("models/", versions.versions_list, name="versions"),
    path("models/compare/", versions.versions_compare, name="versions_compare"),
    path("models/<int:version_id>/", versions.version_detail, name="version"),
]

api_urlpatterns: list[URLPattern | URLResolver] = [
    path("campaigns/<slug:slug>/rounds/", api.RoundsApi.as_view(), name="api-rounds"),
    path("campaigns/<slug:slug>/schedule/", api.ScheduleApi.as_view(), name="api-schedule"),
    path("rounds/<int:round_id>/", api.RoundDetailApi.as_view(), name="api-round"),
    path("rounds/<int:round_id>/cancel/", api.RoundCancelApi.as_view(), name="api-round-cancel"),
    path("runs/", api.RunListApi.as_view(), name="api-runs"),
    path("runs/<int:run_id>/", api.RunDetailApi.as_view(), name="api-run"),
    path("runs/<int:run_id>/metrics/", api.RunMetricsApi.as_view(), name="api-run-metrics"),
    path("runs/<int:run_id>/cancel/", api.RunCancelApi.as_view(), name="api-run-cancel"),
    path("models/", api.VersionListApi.as_view(), name="api-versions"),
    path("models/<int:version_id>/", api.VersionDetailApi.as_view(), name="api-version"),
]

urlpatterns: list[URLPattern | URLResolver] = [
    path("training/", include(page_urlpatterns)),
    path("api/training/", include(api_urlpatterns)),
]
