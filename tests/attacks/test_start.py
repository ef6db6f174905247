"""Attack: start a governed pool's run without the governed worker's decision (issue 14, 1).

A deployment author (or any holder of the Prefect API credentials) sets job
variables that change what the run's process loads: ``env.PYTHONPATH`` to a
directory with a fake ``prefect_governance/gate.py`` that hands straight to
Prefect's engine (also as the dotted key ``"env.PYTHONPATH"``), a ``working_dir``
holding such a package, or ``LD_PRELOAD`` with a real library (built here with
``cc``) whose constructor records every process it enters and points
``PYTHONPATH`` at the fake package. Against a real Prefect server:

- under Prefect's stock process worker nothing starts at all (the pool's command
  names an interpreter no process can start from), the marker stays absent, and
  the governed worker restates each such run's state and records it in the
  agent's chain;
- under the governed worker a job that sets those variables is refused before
  anything starts, unless the pool allows them; where the pool does, the gate
  still runs hermetically (the preloaded library never enters the gate's
  process, the fake gate never runs) and the run executes only as decided.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect import get_client

from prefect_governance.cli.automations import FOREIGN_WORKER, apply_guards, remove_guards
from prefect_governance.testing import create_pool, deploy_example, wait_final
from prefect_governance.worker.blocks import GovernanceAgent
from tests.agents import harness
from tests.attacks.support import home_lineage_url

pytestmark = pytest.mark.e2e

VENV_BIN = str(Path(sys.executable).parent)
POOL, OPEN_POOL = "attack-start", "attack-start-open"
AGENT = "start-attacker"
HERMETIC = "start-hermetic"  # its runs are allowed: the refusals above cost AGENT trust

FAKE_GATE = """\
import os, runpy, sys
with open(os.environ["FAKE_GATE_MARKER"], "a") as out:
    out.write("the fake gate ran\\n")
sys.argv = [sys.argv[0]]
runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)
"""

PRELOAD_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

__attribute__((constructor)) static void attack(void) {
    const char *marker = getenv("PRELOAD_MARKER");
    const char *fake = getenv("FAKE_DIR");
    char cmdline[4096] = {0};
    FILE *in = fopen("/proc/self/cmdline", "r");
    if (in) {
        size_t n = fread(cmdline, 1, sizeof(cmdline) - 1, in);
        for (size_t i = 0; i < n; i++) if (cmdline[i] == 0) cmdline[i] = ' ';
        fclose(in);
    }
    if (marker) {
        FILE *out = fopen(marker, "a");
        if (out) { fprintf(out, "%d %s\n", (int)getpid(), cmdline); fclose(out); }
    }
    if (fake) setenv("PYTHONPATH", fake, 1);
}
"""


def _cc() -> str:
    for name in ("cc", "gcc", "clang"):
        for directory in os.environ.get("PATH", "").split(os.pathsep):
            if Path(directory, name).exists():
                return str(Path(directory, name))
    pytest.fail("a C compiler (cc) is needed to build the LD_PRELOAD library")


@pytest.fixture(scope="module")
def kit(prefect_server, tmp_path_factory):
    """The attacker's materials, two governed pools (one allowing the variables), an agent."""
    tmp = tmp_path_factory.mktemp("attack-start")
    fake = tmp / "fake"
    (fake / "prefect_governance").mkdir(parents=True)
    (fake / "prefect_governance" / "__init__.py").write_text("")
    (fake / "prefect_governance" / "gate.py").write_text(FAKE_GATE)
    source = tmp / "preload.c"
    source.write_text(PRELOAD_C)
    library = tmp / "preload.so"
    subprocess.run(
        [_cc(), "-shared", "-fPIC", "-o", str(library), str(source)],
        check=True,
        capture_output=True,
    )
    # The pools name no store: the workers keep the default one in the home.
    gov = harness(prefect_server, tmp, lineage_url=home_lineage_url(prefect_server.home))

    async def pools():
        for name in (AGENT, HERMETIC):
            await gov.save_agent(
                GovernanceAgent(
                    id=name,
                    owner="sec@example.com",
                    trust_scope=[POOL, OPEN_POOL],
                    capabilities=["read:warehouse"],
                ),
                name,
            )
        await create_pool(POOL)
        await create_pool(OPEN_POOL, env_allow=["PYTHONPATH", "LD_PRELOAD"])
        async with get_client() as client:
            await apply_guards(client)  # as `prefect-governance apply` does, pools known

    async def remove():
        async with get_client() as client:
            await remove_guards(client)

    with gov:
        asyncio.run(pools())
        yield {"tmp": tmp, "fake": fake, "library": library, "gov": gov}
        asyncio.run(remove())


def _attacker_env(kit, name: str) -> dict[str, str]:
    """Where the attacker's code leaves its traces for this case."""
    return {
        "FAKE_GATE_MARKER": str(kit["tmp"] / f"{name}.fake-gate"),
        "PRELOAD_MARKER": str(kit["tmp"] / f"{name}.preload"),
        "FAKE_DIR": str(kit["fake"]),
    }


ATTACKS = {
    "pythonpath": lambda kit: {"env": {"PYTHONPATH": str(kit["fake"])}},
    "dotted env key": lambda kit: {"env.PYTHONPATH": str(kit["fake"])},
    "working_dir": lambda kit: {"working_dir": str(kit["fake"])},
    "ld_preload": lambda kit: {"env": {"LD_PRELOAD": str(kit["library"])}},
    # The run's own verification, told the grant was checked long ago (so an expired
    # grant would still count), and a logging configuration Prefect would load at start.
    "governance variable": lambda kit: {
        "env": {"PREFECT_GOVERNANCE_STARTED_AT": "2020-01-01T00:00:00+00:00"}
    },
    "logging config": lambda kit: {
        "env": {"PREFECT_LOGGING_SETTINGS_PATH": str(kit["tmp"] / "logging.yml")}
    },
}
REFUSED_KEY = {
    "pythonpath": "PYTHONPATH",
    "dotted env key": "PYTHONPATH",
    "ld_preload": "LD_PRELOAD",
    "governance variable": "PREFECT_GOVERNANCE_STARTED_AT",
    "logging config": "PREFECT_LOGGING_SETTINGS_PATH",
}


def _deploy_and_run(kit, pool: str, name: str, attack: dict, agent: str = AGENT) -> tuple:
    traces = _attacker_env(kit, name)
    variables = {"agent": agent, **attack}
    env = {**variables.pop("env", {}), **traces}
    marker = kit["tmp"] / f"{name}.ran"

    async def go():
        deployment = await deploy_example(
            f"{pool}-{name}".replace(" ", "-").replace("_", "-"),
            pool,
            {**variables, "env": env},
        )
        async with get_client() as client:
            run = await client.create_flow_run_from_deployment(
                deployment, parameters={"marker": str(marker)}
            )
        return run.id

    return asyncio.run(go()), marker, traces


def _read(run_id):
    async def read():
        async with get_client() as client:
            return await client.read_flow_run(run_id)

    return asyncio.run(read())


def _messages(run_id) -> list[str]:
    async def read():
        async with get_client() as client:
            return [state.message or "" for state in await client.read_flow_run_states(run_id)]

    return asyncio.run(read())


def _no_attacker_code_ran(name: str, traces: dict[str, str], *, gate_only: bool = False):
    fake_gate = Path(traces["FAKE_GATE_MARKER"])
    assert not fake_gate.exists(), f"{name}: the fake gate ran"
    preload = Path(traces["PRELOAD_MARKER"])
    if not preload.exists():
        return
    entered = preload.read_text().splitlines()
    if not gate_only:
        pytest.fail(f"{name}: the preloaded library entered {entered}")
    assert not [p for p in entered if "prefect_governance.gate" in p], (
        f"{name}: the preloaded library entered the gate's process: {entered}"
    )


def test_a_stock_worker_starts_nothing_whatever_the_job_variables(kit, prefect_server):
    runs = {
        name: _deploy_and_run(kit, POOL, f"stock-{name}", a(kit)) for name, a in ATTACKS.items()
    }
    path = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"  # `python` is this venv's
    gov = kit["gov"]
    worker = gov.start_worker(
        POOL, log=kit["tmp"] / "stock.log", worker_type="process", extra_env={"PATH": path}
    )
    try:
        finals = asyncio.run(wait_final([r[0] for r in runs.values()], timeout=120))
    finally:
        gov.stop_worker(worker)
    for name, (run_id, marker, traces) in runs.items():
        state = finals[run_id].state
        assert state is not None and state.is_crashed(), (name, state)
        assert not marker.exists(), f"{name}: the run executed under a stock worker"
        _no_attacker_code_ran(name, traces)
    # The server's guard, with no governed worker running, says why on each run (in its
    # history: the stock worker's own report of the failed start may land after it).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        said = {name: FOREIGN_WORKER in _messages(r[0]) for name, r in runs.items()}
        if all(said.values()):
            break
        time.sleep(1)
    assert all(said.values()), said

    # The governed worker finds each attempt: the run's state says why, the lineage keeps it.
    governed = gov.start_worker(POOL, log=kit["tmp"] / "g.log")
    store = gov.store
    wanted = {str(r[0]) for r in runs.values()}
    try:
        deadline = time.monotonic() + 90
        while True:
            found = {e.flow_run_id: e for e in store.recent(1000) if e.kind == "gate_refusal"}
            if wanted <= set(found) or time.monotonic() > deadline:
                break
            time.sleep(1)
    finally:
        gov.stop_worker(governed)
    for name, (run_id, marker, _) in runs.items():
        event = found.get(str(run_id))
        assert event is not None, f"{name}: the attempt is not in the lineage"
        assert event.agent_id == AGENT and "start only through a governed" in event.reasons[0]
        state = _read(run_id).state
        assert state.is_crashed() and "start only through a governed" in state.message
        assert not marker.exists()
    assert store.verify() == []


@pytest.fixture(scope="module")
def governed_worker(kit):
    gov = kit["gov"]
    workers = [gov.start_worker(pool, log=kit["tmp"] / f"{pool}.log") for pool in (POOL, OPEN_POOL)]
    yield
    for worker in workers:
        gov.stop_worker(worker)


@pytest.mark.parametrize("name", sorted(REFUSED_KEY))
def test_the_governed_worker_refuses_a_job_that_changes_what_starts(
    kit, prefect_server, governed_worker, name
):
    run_id, marker, traces = _deploy_and_run(kit, POOL, f"governed-{name}", ATTACKS[name](kit))
    final = asyncio.run(wait_final([run_id], timeout=120))[run_id]
    assert final.state.name == "Refused", final.state
    key = REFUSED_KEY[name]
    assert f"the job sets {key}" in final.state.message and "env_allow" in final.state.message
    assert not marker.exists(), f"{name}: a refused run executed"
    _no_attacker_code_ran(name, traces)
    store = kit["gov"].store
    decisions = [e for e in store.recent(200, flow_run_id=str(run_id)) if e.kind == "decision"]
    assert [e.verdict for e in decisions] == ["refused"] and decisions[0].agent_id == AGENT
    assert any(f"the job sets {key}" in r for r in decisions[0].reasons)


@pytest.mark.parametrize("name", ["working_dir", "pythonpath", "ld_preload"])
def test_what_a_job_may_set_never_reaches_the_gate(kit, prefect_server, governed_worker, name):
    """The run executes as decided; the attacker's code never runs before the gate's checks.

    ``working_dir`` is not a refusal (the gate starts in a fresh directory, isolated, and
    Prefect's engine starts with nothing of the working directory on sys.path, so the
    run completes with the real package); PYTHONPATH and LD_PRELOAD are allowed by this
    pool, and still reach only the flow's process.
    """
    pool = POOL if name == "working_dir" else OPEN_POOL
    run_id, marker, traces = _deploy_and_run(
        kit, pool, f"hermetic-{name}", ATTACKS[name](kit), agent=HERMETIC
    )
    final = asyncio.run(wait_final([run_id], timeout=120))[run_id]
    assert final.labels["governance.decision"] == "allowed", final.state
    _no_attacker_code_ran(name, traces, gate_only=True)
    if name == "working_dir":
        assert final.state.is_completed(), final.state
        assert marker.read_text().count("loaded") == 1
        return
    # The pool allows the variable, so the fake (empty) package (PYTHONPATH, or set by the
    # preloaded library) shadows the governance runtime in the flow's own process, whose
    # import of it fails: the author's run, broken by the author's environment, after the
    # decision; the gate itself was the real one.
    assert final.state.is_final(), final.state
    if name == "ld_preload":  # it reached the flow's process, as the pool allows
        entered = Path(traces["PRELOAD_MARKER"]).read_text()
        assert "prefect.engine" in entered, entered
