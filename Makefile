# The two commands of the README's quick start. Both install what is missing.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
DISTRO ?= $(shell . /etc/os-release 2>/dev/null; echo $${VERSION_CODENAME})

.PHONY: run test install doctor clean bench bundle wheel

$(STAMP): scripts/install.sh pyproject.toml
	bash scripts/install.sh
	@touch $(STAMP)

# the test tools on top of the production install
$(TEST_STAMP): scripts/install.sh pyproject.toml
	bash scripts/install.sh --test
	@touch $(STAMP) $(TEST_STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/agent-tracer run $(ARGS)

test: $(TEST_STAMP)
	$(PY) -m pytest -ra $(PYTEST_ARGS)

# full-size benchmark (about 15 minutes): out/bench.json, docs/benchmarks.md, docs/img/
bench: $(TEST_STAMP)
	$(VENV)/bin/agent-tracer bench --json out/bench.json --markdown docs/benchmarks.md \
		--plot docs/img/loss-vs-rate.png $(ARGS)

doctor: $(STAMP)
	$(VENV)/bin/agent-tracer doctor

# the wheel (package data: BPF sources, policy packs, unit, default config)
wheel: $(STAMP)
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w out/dist .

# one tarball for air-gapped nodes of DISTRO (default: this machine's release):
# the distro's .debs the tracer needs, the Python dependencies as wheels, the installer
bundle: $(STAMP)
	bash scripts/bundle.sh $(DISTRO) out

clean:
	rm -rf $(VENV) build *.egg-info out/dist
