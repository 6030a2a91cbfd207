"""All of annotation's routes: rater pages, campaign-admin pages and the REST API."""

from django.urls import include, path

from annotation import admin_urls, api_urls, rater_urls

app_name = "annotation"
urlpatterns = [
    *rater_urls.urlpatterns,
    *admin_urls.urlpatterns,
    path("api/", include(api_urls.urlpatterns)),
]
