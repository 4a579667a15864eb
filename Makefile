# trace-loader: every target runs from a clean checkout with only python3 (and ruff + mypy for `lint`).
# `test` and `test-all` run pytest from each interpreter that has it, and otherwise from a venv of that
# interpreter in $(TEST_VENV), made on first use with pytest from the package index (.ci/pytest);
# `interop` installs its servers in a venv.

PYTHON ?= python3
TEST_VENV ?= .venv-test
PYTEST ?= .ci/pytest $(PYTHON) $(TEST_VENV)
PYTEST_FLAGS ?= -q
RUFF_RULES = --select E,F,W,B,UP,RUF,BLE,EXE --ignore UP031,RUF005,RUF023 --target-version py38 --line-length 120
INTEROP_VENV ?= .venv-interop
# What test_interop.py runs, at the versions it was checked with (the first three read LISTEN_FDS or fd 3).
INTEROP_PACKAGES = gunicorn==27.0.1 uvicorn==0.54.0 hypercorn==0.18.0 twisted==26.10.0 waitress==3.0.2 ddtrace==4.16.0 \
	"pytest>=7,<10"

.PHONY: test test-all lint interop demo bench version

## test: the suite on $(PYTHON)
test:
	$(PYTEST) $(PYTEST_FLAGS) test_trace_loader.py

## test-all: the suite on every CPython >= 3.8 on this machine (.ci/find-pythons), TEST_ALL_JOBS at once;
## TEST_ALL_SKIP: an interpreter's real path to leave out (.ci/run: the one `make test` just used)
TEST_ALL_SKIP ?=
TEST_ALL_JOBS ?= 2
test-all:
	.ci/test-all $(TEST_ALL_JOBS) "$(TEST_ALL_SKIP)" $(TEST_VENV) $(PYTEST_FLAGS) -p no:cacheprovider test_trace_loader.py

## lint: ruff and mypy --strict
lint:
	$(PYTHON) -m ruff check $(RUFF_RULES) trace_loader.py test_trace_loader.py test_interop.py conftest.py examples bench
	$(PYTHON) -m mypy --strict trace_loader.py examples/demo_agent.py examples/demo.py bench/bench.py

## interop: real servers (gunicorn, uvicorn, hypercorn, waitress, twistd mail) behind the loader
# From a venv of $(PYTHON) in $(INTEROP_VENV), made again when $(PYTHON) changes; pip fetches the servers.
# TRACE_LOADER_INTEROP=1: a server missing there fails its tests instead of skipping them.
interop:
	@want=$$($(PYTHON) -c 'import sys; print(sys.version, sys.base_prefix)') || exit 1; \
	have=$$($(INTEROP_VENV)/bin/python -c 'import sys; print(sys.version, sys.base_prefix)' 2>/dev/null); \
	if [ "$$want" != "$$have" ]; then \
	  echo "$(PYTHON) -m venv --clear $(INTEROP_VENV)"; $(PYTHON) -m venv --clear $(INTEROP_VENV) || exit 1; \
	fi
	$(INTEROP_VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(INTEROP_PACKAGES)
	TRACE_LOADER_INTEROP=1 $(INTEROP_VENV)/bin/python -m pytest $(PYTEST_FLAGS) -p no:cacheprovider test_interop.py

## demo: the loader on 127.0.0.1:8126 in front of the demo agent; ends by itself
demo:
	$(PYTHON) examples/demo.py

## bench: footprint and speed, side by side with a bare interpreter, systemd-socket-activate and
## the loader at each revision in $(BENCH_BASELINE)
# BENCH_BASELINE: git revisions to compare against (spaces or commas between; empty: none). By default
# 9aa27d9, the loader without the relay and the hold timeout, and 0fbce05, the loader without back to
# sleep, readiness and the threaded relay. BENCH_ARGS: e.g. --only relay (bench/bench.py --help).
BENCH_BASELINE ?= 9aa27d9 0fbce05
BENCH_ARGS ?=
bench:
	BENCH_BASELINE='$(BENCH_BASELINE)' $(PYTHON) bench/bench.py $(BENCH_ARGS)

## version: the loader's version
version:
	@$(PYTHON) trace_loader.py --version
