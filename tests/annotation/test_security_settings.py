"""Production settings, headers, sessions and login lockout (R5, R6, R7, R9).

The settings checks run Django in a subprocess with a clean environment, because the test
settings (tests/settings.py) set a key and switch transport security off for the test client.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.sessions.models import Session
from django.core.cache import cache
from django.test import Client, override_settings
from rest_framework.test import APIClient

import rlhf_site.settings as production
from annotation.services.tokens import token_issue
from tests.factories import UserFactory

PASSWORD = "correct-horse-battery"  # tests.factories.UserFactory's
ROOT = Path(__file__).resolve().parents[2]


def django_env(tmp_path: Path, **variables: str) -> dict[str, str]:
    """A clean environment: nothing inherited but what finds Python, plus ``variables``."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "VAR_DIR": str(tmp_path / "var"),
        "DJANGO_SETTINGS_MODULE": "rlhf_site.settings",
        "PYTHONPATH": str(ROOT),
    }
    env.update(variables)
    return env


def run_django(tmp_path: Path, code: str, **variables: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=django_env(tmp_path, **variables),
        capture_output=True,
        text=True,
        timeout=120,
    )


def real_key() -> str:
    return secrets.token_urlsafe(64)


@pytest.fixture(autouse=True)
def _fresh_throttles():
    cache.clear()
    yield
    cache.clear()


# -- production settings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "key"),
    [
        ("missing", None),
        ("empty", ""),
        ("short", "s3cret-but-short"),
        ("Django's insecure default", "django-insecure-" + "x1y2z3" * 10),
        ("too little variety", "ab" * 40),
    ],
)
def test_production_refuses_to_start_without_a_real_secret_key(tmp_path, label, key):
    variables = {} if key is None else {"SECRET_KEY": key}
    result = run_django(tmp_path, "import django; django.setup()", **variables)
    assert result.returncode != 0, label
    assert "ImproperlyConfigured" in result.stderr
    assert "SECRET_KEY" in result.stderr


def test_production_starts_with_a_real_secret_key(tmp_path):
    result = run_django(
        tmp_path,
        "import django; django.setup(); from django.conf import settings; print(settings.DEBUG)",
        SECRET_KEY=real_key(),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("setting", "expected"),
    [(None, "{'server_side_binding': True, 'prepare_threshold': 5}"), ("0", "{}")],
)
def test_postgres_uses_prepared_statements_unless_switched_off(tmp_path, setting, expected):
    variables = {"SECRET_KEY": real_key(), "DATABASE_URL": "postgres://u@db.invalid:5432/x"}
    if setting is not None:
        variables["DATABASE_PREPARED_STATEMENTS"] = setting
    code = (
        "import django; django.setup(); from django.conf import settings;"
        " print(settings.DATABASES['default'].get('OPTIONS', {}))"
    )
    result = run_django(tmp_path, code, **variables)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_a_key_file_is_read_like_a_docker_secret(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(real_key() + "\n")
    ok = run_django(tmp_path, "import django; django.setup()", SECRET_KEY_FILE=str(key_file))
    assert ok.returncode == 0, ok.stderr
    key_file.write_text("short")
    refused = run_django(tmp_path, "import django; django.setup()", SECRET_KEY_FILE=str(key_file))
    assert "ImproperlyConfigured" in refused.stderr


def check_deploy(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=django_env(
            tmp_path, SECRET_KEY=real_key(), ALLOWED_HOSTS="rlhf.example.org", **variables
        ),
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_check_deploy_passes_on_production_settings(tmp_path):
    result = check_deploy(tmp_path)  # SECURE_TRANSPORT defaults to on outside DEBUG
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_check_deploy_fails_when_transport_security_is_switched_off(tmp_path):
    """The check above has teeth: the same run without HTTPS settings is refused."""
    result = check_deploy(tmp_path, SECURE_TRANSPORT="0")
    assert result.returncode != 0
    for warning in ("security.W008", "security.W012", "security.W016"):
        assert warning in result.stdout + result.stderr


def test_production_cookies_are_secure_httponly_and_samesite(tmp_path):
    code = (
        "import django; django.setup(); from django.conf import settings as s;"
        "print(s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SESSION_COOKIE_HTTPONLY,"
        " s.SESSION_COOKIE_SAMESITE, s.SECURE_SSL_REDIRECT, s.SECURE_HSTS_SECONDS > 0)"
    )
    result = run_django(tmp_path, code, SECRET_KEY=real_key())
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "True", "Lax", "True", "True"]


# -- passwords ----------------------------------------------------------------------------------


def test_argon2_is_the_first_password_hasher(db):
    assert production.PASSWORD_HASHERS[0].endswith("Argon2PasswordHasher")
    with override_settings(PASSWORD_HASHERS=production.PASSWORD_HASHERS):
        user = UserFactory()
        user.set_password("a long passphrase for argon")
        user.save()
        user.refresh_from_db()
        assert user.password.startswith("argon2$")
        assert user.check_password("a long passphrase for argon")


# -- headers ------------------------------------------------------------------------------------


def csp_directives(header: str) -> dict[str, list[str]]:
    directives = {}
    for part in header.split(";"):
        words = part.split()
        if words:
            directives[words[0]] = words[1:]
    return directives


def assert_strict_csp(response) -> dict[str, list[str]]:
    assert "Content-Security-Policy-Report-Only" not in response
    directives = csp_directives(response["Content-Security-Policy"])
    assert directives["object-src"] == ["'none'"]
    assert directives["base-uri"] == ["'none'"]
    assert directives["frame-ancestors"] == ["'none'"]
    assert "'unsafe-inline'" not in directives["script-src"]
    assert "'unsafe-eval'" not in directives["script-src"]
    assert "'unsafe-inline'" not in directives.get("style-src", [])
    return directives


def test_html_pages_send_a_strict_csp_whose_nonce_matches_the_scripts(db):
    response = Client().get("/accounts/login/")
    assert response.status_code == 200
    directives = assert_strict_csp(response)
    [nonce] = [s for s in directives["script-src"] if s.startswith("'nonce-")]
    html = response.content.decode()
    for tag in re.findall(r"<script\b[^>]*>", html):
        assert f'nonce="{nonce[7:-1]}"' in tag
    assert response["X-Frame-Options"] == "DENY"
    assert response["X-Content-Type-Options"] == "nosniff"


def test_api_responses_send_the_csp_too(db):
    user = UserFactory()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token_issue(user=user).key}")
    response = client.get("/api/campaigns/")
    assert response.status_code == 200
    assert_strict_csp(response)
    assert response["X-Content-Type-Options"] == "nosniff"


# -- sessions -----------------------------------------------------------------------------------


def log_in(client: Client, username: str, password: str = PASSWORD):
    return client.post("/accounts/login/", {"username": username, "password": password})


def test_login_rotates_the_session_key_and_sets_a_httponly_samesite_cookie(db):
    user = UserFactory()
    client = Client()
    session = client.session
    session["before_login"] = True
    session.save()
    before = session.session_key
    client.cookies["sessionid"] = before
    response = log_in(client, user.username)
    assert response.status_code == 302
    cookie = response.cookies["sessionid"]
    assert cookie.value != before
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Lax"
    # The pre-login session is gone on the server: fixing a victim's key gains nothing.
    assert not Session.objects.filter(session_key=before).exists()


def test_logout_ends_the_session_on_the_server(db):
    user = UserFactory()
    client = Client()
    log_in(client, user.username)
    stolen = client.cookies["sessionid"].value
    assert client.post("/accounts/logout/").status_code == 302
    replay = Client()
    replay.cookies["sessionid"] = stolen
    response = replay.get("/")
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_a_deactivated_user_is_signed_out_on_the_next_request(db):
    user = UserFactory()
    client = Client()
    log_in(client, user.username)
    assert client.get("/").status_code == 200
    user.is_active = False
    user.save()
    assert client.get("/").status_code == 302


# -- lockout and throttling ---------------------------------------------------------------------


def test_repeated_bad_logins_lock_the_account_out_of_the_login_page(db):
    user = UserFactory()
    client = Client()
    statuses = [log_in(client, user.username, "wrong password").status_code for _ in range(10)]
    assert statuses[0] == 200  # the form again, with an error
    assert statuses[-1] == 429
    # Locked out: even the right password is refused, and no session is made.
    response = log_in(client, user.username)
    assert response.status_code == 429
    assert "_auth_user_id" not in client.session


def test_repeated_bad_token_requests_lock_the_account_out_of_the_api(db):
    from axes.models import AccessAttempt

    user = UserFactory()
    body = {"username": user.username, "password": "wrong password"}
    statuses = [
        APIClient().post("/api/auth/token/", body, format="json").status_code for _ in range(10)
    ]
    # The failure that reaches AXES_FAILURE_LIMIT is already answered with the lockout.
    limit = settings.AXES_FAILURE_LIMIT
    assert statuses[: limit - 1] == [400] * (limit - 1)
    assert set(statuses[limit - 1 :]) <= {403, 429}
    right = APIClient().post(
        "/api/auth/token/", {"username": user.username, "password": PASSWORD}, format="json"
    )
    assert right.status_code in (403, 429)
    assert "token" not in right.content.decode()
    assert AccessAttempt.objects.filter(username=user.username).exists()


def test_the_token_endpoint_is_throttled_per_client(db):
    # Different usernames, so the lockout (per username and address) is not what answers.
    client = APIClient()
    statuses = [
        client.post(
            "/api/auth/token/", {"username": f"nobody{i}", "password": "x"}, format="json"
        ).status_code
        for i in range(11)
    ]
    assert statuses[:10] == [400] * 10
    assert statuses[10] == 429
    throttled = client.post(
        "/api/auth/token/", {"username": "nobody-else", "password": "x"}, format="json"
    )
    assert throttled.status_code == 429
    assert "throttled" in throttled.json()["detail"]
    assert int(throttled["Retry-After"]) > 0
