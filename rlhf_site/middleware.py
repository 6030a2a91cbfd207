"""Health check answered before host validation and the HTTPS redirect.

Container health checks call http://127.0.0.1:8000/healthz from inside the container: that
host is not in ALLOWED_HOSTS and the request is plain HTTP, so it must be answered before
SecurityMiddleware and CommonMiddleware look at it. It reveals nothing but "ok".
"""

from __future__ import annotations

from collections.abc import Callable

from django.db import connection
from django.http import HttpRequest, HttpResponse


class HealthCheckMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path == "/healthz" and request.method == "GET":
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT 1")
            except Exception:  # any database failure means "not healthy"
                return HttpResponse("database unavailable", status=503, content_type="text/plain")
            return HttpResponse("ok", content_type="text/plain")
        return self.get_response(request)
