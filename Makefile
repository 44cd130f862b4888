# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint screenshots load bench chaos aging stack-start stack-stop clean

# Bytecode is compiled here: where PYTHONDONTWRITEBYTECODE is set, every process (worker runs, the server, CLI calls)
# would otherwise compile Prefect's source again, about 1.2 s of the 2.4 s `import prefect` takes.
install: $(BIN)/dcm-flows

$(BIN)/dcm-flows: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(BIN)/python -m uv pip install --quiet --compile-bytecode --python $(BIN)/python -e '.[embedded,demo,test]'
	$(BIN)/python -m compileall -q flows blocks ops
	touch $@

demo: install
	$(BIN)/dcm-flows demo

lint: install
	$(BIN)/ruff check flows blocks ops tests examples docs bench

test: lint
	$(BIN)/pytest -q -ra --durations=25

# Pictures of the demo's Prefect UI for the docs (headless Chromium; installs Debian's chromium as root).
screenshots: install
	command -v chromium >/dev/null || apt-get install -y chromium
	$(BIN)/python docs/screenshots.py

# 5 patients of 50 series, all sessions at once, on the embedded stack and on a scaled one (PostgreSQL, Redis, two
# API servers; as root: two worker hosts in network namespaces), then 10 patients whose jobs are spread over both
# hosts; figures into docs/benchmarks.md.
load: install
	bash .ci/scaled-services.sh
	$(BIN)/python -m bench.load

# Per-job overhead, trigger to start, session makespans, venv installs (pip, uv), a session on stock Prefect and on
# the embedded stack beside the seed's runtime, side by side with their baselines; into docs/benchmarks.md.
bench: install
	$(BIN)/python -m bench.overhead

# 3 sessions of 20 jobs while the pool worker, the warm engine, sessions' processes, callbacks, SecantusDB and the
# Prefect server are killed or stopped at random moments; the count of what went wrong into docs/benchmarks.md.
chaos: install
	$(BIN)/python -m bench.chaos

# 5,000 jobs on one embedded stack, then a month's retention pass: speed and Prefect's database size at each step.
aging: install
	$(BIN)/python -m bench.aging

stack-start: install
	$(BIN)/dcm-flows stack start

stack-stop: install
	$(BIN)/dcm-flows stack stop

clean: stack-stop
	rm -rf $(VENV)
