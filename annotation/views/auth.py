"""Log in and log out, on Django's own views.

Django's ``login()`` rotates the session key (no session fixation) and the CSRF token;
``LogoutView`` is POST-only and flushes the session on the server. Failed logins are counted
by django-axes (``AxesStandaloneBackend`` first in ``AUTHENTICATION_BACKENDS``); once locked
out, ``AxesMiddleware`` replaces the response with :func:`lockout`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.views import LoginView, LogoutView
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render


class RaterLoginView(LoginView):
    template_name = "registration/login.html"
    redirect_authenticated_user = True
    # Where to go without a ``next``; settings.LOGIN_REDIRECT_URL names the route unqualified.
    next_page = "annotation:home"


login_view = RaterLoginView.as_view()
logout_view = LogoutView.as_view()


def lockout(
    request: HttpRequest,
    original_response: HttpResponse | None = None,
    credentials: dict[str, Any] | None = None,
) -> HttpResponse:
    """The page shown while a username/address is locked out (``AXES_LOCKOUT_CALLABLE``).

    429 Too Many Requests, with how long to wait; it says nothing about whether the username
    exists or the password was right.
    """
    cooloff = getattr(settings, "AXES_COOLOFF_TIME", None)
    minutes = None
    if isinstance(cooloff, int | float):
        minutes = max(1, round(cooloff * 60))
    elif isinstance(cooloff, timedelta):
        minutes = max(1, round(cooloff.total_seconds() / 60))
    return render(
        request,
        "registration/lockout.html",
        {"minutes": minutes, "failure_limit": getattr(settings, "AXES_FAILURE_LIMIT", None)},
        status=429,
    )
