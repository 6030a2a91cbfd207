from django.contrib import admin
from django.contrib.auth.decorators import login_required
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView
from rest_framework.permissions import IsAuthenticated

from annotation.rater_urls import auth_urlpatterns

urlpatterns = [
    path("admin/", admin.site.urls),
    # Outside annotation's namespace: Django's auth settings name these routes unqualified.
    path("accounts/", include(auth_urlpatterns)),
    # OpenAPI schema and its docs page, for signed-in users (token or session). The docs
    # page is the split Swagger view: its init script is a separate same-origin file, so it
    # runs under our CSP with no inline script; assets come from drf-spectacular-sidecar.
    path(
        "api/schema/",
        SpectacularAPIView.as_view(permission_classes=[IsAuthenticated]),
        name="schema",
    ),
    path(
        "api/docs/",
        login_required(
            SpectacularSwaggerSplitView.as_view(
                url_name="schema",
                template_name="annotation/api_docs.html",
                permission_classes=[IsAuthenticated],
            )
        ),
        name="api-docs",
    ),
    # The ML staff pages (/training/) and their API (/api/training/).
    path("", include("training.urls")),
    path("", include("annotation.urls")),
]
