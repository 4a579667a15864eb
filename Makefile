# trace-loader: every target runs from a clean checkout with only pytest
# (and ruff + mypy for `lint`) installed.

PYTHON ?= python3
PYTEST ?= $(PYTHON) -m pytest
PYTEST_FLAGS ?= -q
RUFF_RULES = --select E,F,W,B,UP,RUF,BLE,EXE --ignore UP031,RUF005,RUF023 --target-version py38 --line-length 120

.PHONY: test test-all lint demo bench version

## test: the suite on $(PYTHON)
test:
	$(PYTEST) $(PYTEST_FLAGS) test_trace_loader.py

## test-all: the suite on every CPython >= 3.8 on this machine (.ci/find-pythons)
test-all:
	@status=0; count=0; \
	for py in $$(.ci/find-pythons | sort -V); do \
	  count=$$((count + 1)); \
	  echo "== $$py ($$($$py -c 'import platform; print(platform.python_version())'))"; \
	  $$py -m pytest $(PYTEST_FLAGS) -p no:cacheprovider test_trace_loader.py || status=1; \
	done; \
	[ $$count -gt 0 ] || { echo "no CPython >= 3.8 found"; exit 1; }; \
	exit $$status

## lint: ruff and mypy --strict
lint:
	$(PYTHON) -m ruff check $(RUFF_RULES) trace_loader.py test_trace_loader.py examples bench
	$(PYTHON) -m mypy --strict trace_loader.py examples/demo_agent.py examples/demo.py bench/bench.py

## demo: the loader on 127.0.0.1:8126 in front of the demo agent; ends by itself
demo:
	$(PYTHON) examples/demo.py

## bench: footprint and speed, side by side with a bare interpreter and systemd-socket-activate
bench:
	$(PYTHON) bench/bench.py

## version: the loader's version
version:
	@$(PYTHON) trace_loader.py --version
