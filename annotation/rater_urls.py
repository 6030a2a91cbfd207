"""Rater routes (namespaced ``annotation:`` by annotation/urls.py) and the log-in routes.

``auth_urlpatterns`` are mounted at ``accounts/`` by rlhf_site/urls.py outside the namespace,
because Django's ``LOGIN_URL = "login"`` and ``LOGOUT_REDIRECT_URL`` name them unqualified.
"""

from django.urls import URLPattern, URLResolver, path

from annotation.views import auth, ranking, rater

urlpatterns: list[URLPattern | URLResolver] = [
    path("", rater.home, name="home"),
    path("rate/<slug:slug>/", rater.rate, name="rate"),
    path("rate/<slug:slug>/submit/", rater.rate_submit, name="rate_submit"),
    path("rate/<slug:slug>/skip/", rater.rate_skip, name="rate_skip"),
    path("rate/<slug:slug>/rank/", ranking.rank, name="rank"),
    path("rate/<slug:slug>/rank/submit/", ranking.rank_submit, name="rank_submit"),
]

auth_urlpatterns: list[URLPattern | URLResolver] = [
    path("login/", auth.login_view, name="login"),
    path("logout/", auth.logout_view, name="logout"),
]
