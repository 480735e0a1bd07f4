# The two commands a newcomer needs:  make demo   and   make test
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test lint clean
setup:
	@scripts/setup_env.sh $(VENV)

demo: setup
	$(PY) -m vggt4d_ros.tools.demo --out out/demo

test: setup
	@scripts/run_tests.sh $(VENV) $(PYTEST_ARGS)

clean:
	rm -rf build out .pytest_cache
