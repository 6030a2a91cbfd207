"""Test settings: the one real settings module, with the environment a test run needs.

Values already in the environment win (CI sets DATABASE_URL to PostgreSQL).
"""

import os

os.environ.setdefault("SECRET_KEY", "test-only-" + "k" * 60)
os.environ.setdefault("DEBUG", "0")
os.environ.setdefault("SECURE_TRANSPORT", "0")
os.environ.setdefault("STATIC_MANIFEST", "0")
os.environ.setdefault("ALLOWED_HOSTS", "testserver,127.0.0.1,localhost")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from rlhf_site.settings import *  # noqa: F403
from rlhf_site.settings import STATIC_ROOT

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast in tests only

# whitenoise warns on every request when STATIC_ROOT is missing; tests serve from finders.
STATIC_ROOT.mkdir(parents=True, exist_ok=True)

# Each test process gets its own in-memory cache (cleared before every test in conftest): the
# login throttle counts requests in the cache, and a cache shared between pytest-xdist workers
# (Redis in CI) would carry counts from one test into another.
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
