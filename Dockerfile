# Production image: the web app (gunicorn + whitenoise). Workers use the same image.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 VAR_DIR=/var/lib/rlhf
RUN apt-get update && apt-get install -y --no-install-recommends npm && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md package.json package-lock.json ./
COPY annotation annotation
COPY training training
COPY rlhf_site rlhf_site
COPY templates templates
COPY static static
COPY manage.py ./
# torch is pinned in pyproject.toml; on a CPU-only host point PIP_EXTRA_INDEX_URL at the
# PyTorch CPU wheel index to avoid the large CUDA build.
RUN pip install --no-cache-dir . && npm ci --no-audit --no-fund --loglevel=error
# collectstatic needs settings: a throwaway key used only for this build step.
RUN SECRET_KEY=build-only-$(python -c 'import secrets; print(secrets.token_urlsafe(64))') \
    python manage.py collectstatic --no-input
RUN useradd --system --home /var/lib/rlhf rlhf && mkdir -p /var/lib/rlhf && chown rlhf /var/lib/rlhf
USER rlhf
EXPOSE 8000
CMD ["gunicorn", "rlhf_site.wsgi", "--bind", "0.0.0.0:8000", "--worker-class", "gthread", "--workers", "4", "--threads", "4", "--access-logfile", "-"]
