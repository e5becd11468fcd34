# The two commands of the README's quick start. Both install what is missing.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install doctor clean

$(STAMP): scripts/install.sh pyproject.toml
	bash scripts/install.sh
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/agent-tracer run $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -ra $(PYTEST_ARGS)

doctor: $(STAMP)
	$(VENV)/bin/agent-tracer doctor

clean:
	rm -rf $(VENV) build *.egg-info
