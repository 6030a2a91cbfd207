"""REST API routes, mounted under /api/ (names: ``annotation:api-*``)."""

from django.urls import URLPattern, URLResolver, path

from annotation import api

urlpatterns: list[URLPattern | URLResolver] = [
    path("auth/token/", api.AuthTokenApi.as_view(), name="api-token"),
    path("campaigns/", api.CampaignsApi.as_view(), name="api-campaigns"),
    path("campaigns/<slug:slug>/", api.CampaignDetailApi.as_view(), name="api-campaign"),
    path("campaigns/<slug:slug>/members/", api.MembershipAddApi.as_view(), name="api-members"),
    path(
        "campaigns/<slug:slug>/import/", api.CampaignImportApi.as_view(), name="api-campaign-import"
    ),
    path(
        "campaigns/<slug:slug>/comparisons/build/",
        api.ComparisonsBuildApi.as_view(),
        name="api-comparisons-build",
    ),
    path("campaigns/<slug:slug>/gold/", api.GoldGenerateApi.as_view(), name="api-gold"),
    path(
        "campaigns/<slug:slug>/comparisons/<int:comparison_id>/gold/",
        api.ComparisonGoldSetApi.as_view(),
        name="api-comparison-gold",
    ),
    path("campaigns/<slug:slug>/next/", api.SlotLeaseApi.as_view(), name="api-next"),
    path("campaigns/<slug:slug>/judgments/", api.JudgmentSubmitApi.as_view(), name="api-judgments"),
    path(
        "campaigns/<slug:slug>/slots/<int:slot_id>/release/",
        api.SlotReleaseApi.as_view(),
        name="api-slot-release",
    ),
    path(
        "campaigns/<slug:slug>/rank/next/",
        api.RankingLeaseApi.as_view(),
        name="api-rank-next",
    ),
    path(
        "campaigns/<slug:slug>/rankings/",
        api.RankingSubmitApi.as_view(),
        name="api-rankings",
    ),
    path(
        "campaigns/<slug:slug>/ranking-tasks/build/",
        api.RankingTasksBuildApi.as_view(),
        name="api-ranking-tasks-build",
    ),
    path("campaigns/<slug:slug>/progress/", api.CampaignProgressApi.as_view(), name="api-progress"),
    path("campaigns/<slug:slug>/export/", api.JudgmentExportApi.as_view(), name="api-export"),
    path(
        "campaigns/<slug:slug>/quality/",
        api.CampaignQualityApi.as_view(),
        name="api-quality",
    ),
]
