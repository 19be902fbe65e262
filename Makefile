# authnotify developer commands. `make dev` runs the whole pipeline locally; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Python's byte-code caches are kept (some machines turn them off): without them every run compiles the package
# and re-writes the tests' assertions again, seconds of every test run.
unexport PYTHONDONTWRITEBYTECODE

# Tests talk to real services. These defaults are the local ones; override them to use others.
export AUTHNOTIFY_TEST_RABBITMQ_URL ?= amqp://guest:guest@127.0.0.1:5672/
export AUTHNOTIFY_TEST_DATABASE_URL ?= postgresql+asyncpg://postgres:postgres@127.0.0.1:5432/test

.PHONY: dev test test-fast check typecheck bench bench-ingress bench-workers bench-slowloris bench-lifecycle lock venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

dev: $(STAMP)
	bash scripts/ensure-rabbitmq.sh
	$(VENV)/bin/authnotify dev

# Everything: types and import rules, then every test (real RabbitMQ, PostgreSQL and SQLite included).
test: check
	$(PY) -m pytest $(PYTEST_ARGS)

# The inner loop: the tests that need no broker, no PostgreSQL and start no process (in-memory publisher and
# store, SQLite, the sandbox fakes): a few seconds.
test-fast: $(STAMP)
	$(PY) -m pytest -n auto -m "not services and not slow" $(PYTEST_ARGS)

# mypy and import-linter cannot follow the editable install's mapping of ingress/, workers/ and shared/ into
# the authnotify package, so they check a plain installed copy of it instead (about a second to build).
check: $(STAMP)
	$(VENV)/bin/ruff check .
	rm -rf build .typecheck
	$(PY) -m pip install --quiet --no-deps --no-build-isolation --target .typecheck .
	cd .typecheck && ../$(VENV)/bin/mypy --config-file ../pyproject.toml -p authnotify
	cd .typecheck && ../$(VENV)/bin/lint-imports --no-cache ../pyproject.toml

typecheck: check

bench-ingress: $(STAMP)
	$(PY) -m tests.bench.ingress_bench $(BENCH_ARGS)

bench-workers: $(STAMP)
	$(PY) -m tests.bench.workers_bench $(BENCH_ARGS)

# 4,000 connections trickling 64 KiB bodies at a real ingress: its peak RSS, and how fast correctly signed
# notifications on fresh connections are answered meanwhile (figures printed, nothing asserted).
bench-slowloris: $(STAMP)
	$(PY) -m tests.bench.slowloris_bench $(BENCH_ARGS)

bench-lifecycle: $(STAMP)
	$(PY) -m tests.bench.lifecycle_bench $(BENCH_ARGS)

bench: bench-ingress bench-workers bench-lifecycle

# The image installs exactly these (pip --require-hashes): rerun after changing dependencies in pyproject.toml.
# Resolved against PyPI alone, whatever index this machine's pip is configured with. The otel extra is in the
# image, so tracing is a matter of setting OTEL_EXPORTER_OTLP_ENDPOINT.
lock: $(STAMP)
	$(PY) -m pip install --quiet "pip-tools>=7.4,<8"
	PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= $(VENV)/bin/pip-compile --quiet --generate-hashes --strip-extras \
	  --allow-unsafe --all-build-deps --no-emit-index-url --no-emit-find-links --extra otel \
	  --output-file deploy/requirements.lock pyproject.toml

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
