"""Campaign-admin routes (namespaced ``annotation:`` by annotation/urls.py)."""

from django.urls import URLPattern, URLResolver, path

from annotation.views import campaigns, gold, quality

urlpatterns: list[URLPattern | URLResolver] = [
    path("campaigns/", campaigns.campaign_list, name="campaign_list"),
    path("campaigns/new/", campaigns.campaign_create, name="campaign_create"),
    path("campaigns/<slug:slug>/", campaigns.campaign_detail, name="campaign_detail"),
    path("campaigns/<slug:slug>/edit/", campaigns.campaign_edit, name="campaign_edit"),
    path("campaigns/<slug:slug>/members/", campaigns.campaign_members, name="campaign_members"),
    path("campaigns/<slug:slug>/status/", campaigns.campaign_status, name="campaign_status"),
    path("campaigns/<slug:slug>/import/", campaigns.campaign_import, name="campaign_import"),
    path("campaigns/<slug:slug>/build/", campaigns.campaign_build, name="campaign_build"),
    path(
        "campaigns/<slug:slug>/build/rankings/",
        campaigns.campaign_rank_build,
        name="campaign_rank_build",
    ),
    path("campaigns/<slug:slug>/gold/", gold.campaign_gold, name="campaign_gold"),
    path("campaigns/<slug:slug>/export.jsonl", campaigns.campaign_export, name="campaign_export"),
    path("campaigns/<slug:slug>/quality/", quality.campaign_quality, name="campaign_quality"),
]
