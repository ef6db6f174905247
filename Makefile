# The two commands (see README): `make demo` runs the product, `make test` runs the tests.
# Everything they need is installed here: a virtualenv with the package (pip builds
# its embedded engine, OPA's Go SDK, with Go), and OPA built from its Go module.

PYTHON ?= python3
OPA_VERSION ?= v1.22.2
VENV := .venv
BIN := $(VENV)/bin
OPA := .tools/bin/opa
# The Prefect versions tested (README, "Versions"): the newest supported in the main venv
# (the whole suite; `make demo`), the oldest in a second one (the end-to-end tests again).
PREFECT_NEWEST ?= prefect>=3.9,<3.10
PREFECT_OLDEST ?= prefect==3.8.8
VENV_OLDEST := .venv-prefect38
ENGINE := prefect_governance/core/engines/libgovrego.so
# What runs again on the oldest Prefect: the end-to-end tests of what leans on Prefect's worker
# and engine internals (the worker's run and labels, the gate's start of the engine, governed
# tasks, reconciling, the attacks on the start, the metrics on Prefect's worker webserver and
# the approval wait in Prefect's Scheduled state).
OLDEST_E2E := tests/test_worker_e2e.py tests/test_gate.py tests/test_governed_tasks_e2e.py \
	tests/test_reconcile.py tests/attacks/test_start.py tests/test_metrics_e2e.py \
	tests/test_approval_wait.py

.PHONY: demo test install opa docker kube lint bench clean

demo: install
	$(BIN)/prefect-governance demo

# The whole suite on the newest Prefect (the unit tests, then the end-to-end ones), then the
# end-to-end tests of Prefect's worker internals on the oldest.
test: lint opa docker kube $(VENV_OLDEST)/.installed
	bash scripts/postgres.sh
	OPA_BIN=$(abspath $(OPA)) $(BIN)/pytest -m "not e2e"
	OPA_BIN=$(abspath $(OPA)) $(BIN)/pytest -m e2e --durations=25
	OPA_BIN=$(abspath $(OPA)) $(VENV_OLDEST)/bin/pytest -m e2e $(OLDEST_E2E)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py native/go.mod native/go.sum native/main.go native/build.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]' '$(PREFECT_NEWEST)'
	touch $@

# The same package on the oldest Prefect, with the engine the main venv built in place (no
# second Go build: setup.py takes PREFECT_GOVERNANCE_PREBUILT_ENGINE).
$(VENV_OLDEST)/.installed: $(VENV)/.installed
	$(PYTHON) -m venv $(VENV_OLDEST)
	$(VENV_OLDEST)/bin/pip install --quiet --upgrade pip
	PREFECT_GOVERNANCE_PREBUILT_ENGINE=$(abspath $(ENGINE)) \
		$(VENV_OLDEST)/bin/pip install --quiet -e '.[test]' '$(PREFECT_OLDEST)'
	touch $@

opa: $(OPA)

# The Docker engine (one for the machine, reused) and the images the container tests run:
# a local bookworm base (debootstrap, cached in ~/.cache/prefect-governance) and the
# project's image built on it from a wheelhouse (scripts/docker.sh); Compose v2 from its Go
# module and local stand-ins for the stack's registry images (scripts/compose.sh).
docker: install
	bash scripts/docker.sh image
	bash scripts/compose.sh

# A single-node Kubernetes v1.37.2 built from its Go modules into ~/.cache/prefect-governance
# (once; the tests start and stop the cluster: scripts/kubernetes/README.md).
kube:
	bash scripts/kubernetes/build.sh

$(OPA):
	mkdir -p .tools/bin
	GOBIN=$(abspath .tools/bin) go install github.com/open-policy-agent/opa@$(OPA_VERSION)
	$(OPA) version

# The linter, the formatter, the type checker and the rooms' import contract (pyproject.toml).
lint: install
	$(BIN)/ruff check --quiet .
	$(BIN)/ruff format --check --quiet prefect_governance tests benchmarks scripts setup.py
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache --no-logo

bench: install opa docker kube
	$(BIN)/pip install --quiet -e '.[test,bench]'
	bash scripts/postgres.sh
	OPA_BIN=$(abspath $(OPA)) $(BIN)/python benchmarks/decision_latency.py
	OPA_BIN=$(abspath $(OPA)) $(BIN)/python benchmarks/worker_ab.py
	OPA_BIN=$(abspath $(OPA)) $(BIN)/python benchmarks/tasks.py
	OPA_BIN=$(abspath $(OPA)) $(BIN)/python benchmarks/infrastructure_ab.py
	$(BIN)/python benchmarks/lineage.py
	$(BIN)/python benchmarks/scale.py
	$(BIN)/python benchmarks/imports.py
	$(BIN)/python benchmarks/report.py --readme

clean:
	rm -rf $(VENV) $(VENV_OLDEST) .tools .pytest_cache
