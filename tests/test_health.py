from django.test import Client


def test_healthz_answers_ok_for_any_host_over_plain_http(db, settings):
    settings.SECURE_SSL_REDIRECT = True
    settings.ALLOWED_HOSTS = ["rlhf.example.org"]
    response = Client(HTTP_HOST="127.0.0.1:8000").get("/healthz")
    assert response.status_code == 200
    assert response.content == b"ok"


def test_other_paths_still_validate_the_host(db, settings):
    settings.ALLOWED_HOSTS = ["rlhf.example.org"]
    response = Client(HTTP_HOST="evil.example.com").get("/")
    assert response.status_code == 400
