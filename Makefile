# Two set-up commands for a fresh machine: `make demo` and `make test`.
# Both create (or reuse) a local virtual environment in .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BACKENDS ?= jax tensorflow torch
PYTEST_ARGS ?=

.PHONY: install demo test test-jax test-tensorflow test-torch bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The demo runs on JAX unless KERAS_BACKEND says otherwise.
demo: install
	KERAS_BACKEND=$${KERAS_BACKEND:-jax} $(PY) examples/quickstart.py

# Each backend in its own pytest process (KERAS_BACKEND is read once, at
# import), the three side by side: most of a test's time is single-threaded
# (tracing, compiling, Python), so they overlap well even on 2 cores; torch
# runs its ops on one thread, leaving the cores to the two XLA backends.
# Each log is printed when all are done; TEST_JOBS=1 runs them in turn.
# Each backend run gets its own --basetemp (mktemp -d, removed after), so
# two checkouts on one machine can run `make test` at once.
TEST_JOBS ?= 3
test: install
	@mkdir -p .test-logs; \
	run() { one=; [ "$$1" = torch ] && one=OMP_NUM_THREADS=1; \
	  tmp=$$(mktemp -d $${TMPDIR:-/tmp}/keras-ginger-tests-$$1.XXXXXX); \
	  env $$one KERAS_BACKEND=$$1 $(PY) -m pytest -q -p no:cacheprovider \
	  --basetemp=$$tmp --durations=10 \
	  $(PYTEST_ARGS) tests > .test-logs/$$1.log 2>&1; \
	  echo $$? > .test-logs/$$1.rc; rm -rf $$tmp; \
	  echo "--- $$1 done (rc $$(cat .test-logs/$$1.rc))"; }; \
	if [ "$(TEST_JOBS)" = 1 ]; then for b in $(BACKENDS); do run $$b; done; \
	else for b in $(BACKENDS); do run $$b & done; wait; fi; \
	status=0; for b in $(BACKENDS); do \
	  echo "=== KERAS_BACKEND=$$b ==="; \
	  if [ "$$(cat .test-logs/$$b.rc)" = 0 ]; then tail -n 20 .test-logs/$$b.log; \
	  else cat .test-logs/$$b.log; status=1; fi; \
	done; exit $$status

test-%: install
	KERAS_BACKEND=$* $(PY) -m pytest -q $(PYTEST_ARGS) tests

bench: install
	for b in $(BACKENDS); do KERAS_BACKEND=$$b $(PY) benchmarks/optimizer_speed.py; done

clean:
	rm -rf $(VENV) .pytest_cache .test-logs
