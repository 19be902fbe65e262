# authnotify developer commands. `make dev` runs the whole pipeline locally; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Tests talk to real services. These defaults are the local ones; override them to use others.
export AUTHNOTIFY_TEST_RABBITMQ_URL ?= amqp://guest:guest@127.0.0.1:5672/
export AUTHNOTIFY_TEST_DATABASE_URL ?= postgresql+asyncpg://postgres:postgres@127.0.0.1:5432/test

.PHONY: dev test typecheck bench bench-ingress bench-workers venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

dev: $(STAMP)
	bash scripts/ensure-rabbitmq.sh
	$(VENV)/bin/authnotify dev

test: typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

# mypy cannot follow the editable install's mapping of ingress/, workers/ and shared/ into the authnotify
# package, so it checks a plain installed copy of the package instead (about a second to build).
typecheck: $(STAMP)
	rm -rf build .typecheck
	$(PY) -m pip install --quiet --no-deps --no-build-isolation --target .typecheck .
	cd .typecheck && ../$(VENV)/bin/mypy --config-file ../pyproject.toml -p authnotify

bench-ingress: $(STAMP)
	$(PY) -m tests.bench.ingress_bench $(BENCH_ARGS)

bench-workers: $(STAMP)
	$(PY) -m tests.bench.workers_bench $(BENCH_ARGS)

bench: bench-ingress bench-workers

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
