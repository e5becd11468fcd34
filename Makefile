# The two commands of the README's quick start. Both install what is missing.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install doctor clean bench

$(STAMP): scripts/install.sh pyproject.toml
	bash scripts/install.sh
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/agent-tracer run $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -ra $(PYTEST_ARGS)

# full-size benchmark (about 15 minutes): out/bench.json, docs/benchmarks.md, docs/img/
bench: $(STAMP)
	$(VENV)/bin/agent-tracer bench --json out/bench.json --markdown docs/benchmarks.md \
		--plot docs/img/loss-vs-rate.png $(ARGS)

doctor: $(STAMP)
	$(VENV)/bin/agent-tracer doctor

clean:
	rm -rf $(VENV) build *.egg-info
