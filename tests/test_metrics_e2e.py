"""The governed worker's metrics end to end: a real Prefect server, the real governed
worker started by ``prefect worker start --with-healthcheck``, scraped over HTTP.

One allowed run and one refused run (proven not to have run: its marker file stays
absent) move the counters by exactly themselves, on Prefect's worker webserver
(``/metrics`` beside ``/health``) and on the worker's own metrics port alike. Then a
deployment author's invented agents add no label values; a start the gate refused
under Prefect's stock worker is counted once the governed worker's reconciler finds it;
and an OPA that is gone shows as engine failures and an open circuit breaker.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prefect import get_client
from prometheus_client.parser import text_string_to_metric_families

from prefect_governance.cli.local import free_port, prefect_env, spawn, wait_http
from prefect_governance.core.attestation import KEYS_ENV
from prefect_governance.testing import Harness, deploy_example, wait_final, wait_outcomes
from prefect_governance.worker.blocks import GovernanceAgent
from tests.agents import harness
from tests.conftest import OpaServer

pytestmark = pytest.mark.e2e

POOL = "gov-metrics"
GATE_POOL = "gov-metrics-gate"
DOWN_POOL = "gov-metrics-down"
AGENT = "metrics-etl"
PATH = "prefect/governance/decision"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def get(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for a labelled series not there yet (none counted)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


async def _runs(tmp: Path) -> dict[str, tuple[Any, Path]]:
    allowed = await deploy_example(
        f"{POOL}-allowed", POOL, {"agent": AGENT, "capabilities": ["read:warehouse"]}
    )
    refused = await deploy_example(
        f"{POOL}-refused", POOL, {"agent": AGENT, "capabilities": ["delete:warehouse"]}
    )
    runs = {}
    async with get_client() as client:
        for name, deployment in (("allowed", allowed), ("refused", refused)):
            marker = tmp / f"marker-{name}"
            run = await client.create_flow_run_from_deployment(
                deployment, parameters={"rows": 10, "marker": str(marker)}
            )
            runs[name] = (run.id, marker)
    return runs


INVENTED = ("nobody-4f2a", "nobody-9c1e")


async def _invented_agents(tmp: Path) -> list[tuple[Any, Path]]:
    """Runs of deployments whose job variables name agents no pool owner signed, and a
    policy path of their own: refused, each with a marker that must stay absent."""
    runs = []
    async with get_client() as client:
        for name in INVENTED:
            deployment = await deploy_example(
                f"{POOL}-{name}", POOL, {"agent": name, "policy_path": f"invented/{name}"}
            )
            marker = tmp / f"marker-{name}"
            run = await client.create_flow_run_from_deployment(
                deployment, parameters={"rows": 10, "marker": str(marker)}
            )
            runs.append((run.id, marker))
    return runs


def _governed_worker(gov: Harness, server: Any, pool: str, tmp: Path) -> dict[str, str]:
    """The governed worker on ``pool``, with Prefect's webserver and a metrics port of its
    own (stopped with the harness); the URLs of its ``/metrics``."""
    webserver, own = free_port(), free_port()
    env = prefect_env(
        server.home,
        server.api_url,
        **{
            KEYS_ENV: json.dumps({gov.owner.key_id: gov.owner.public_b64}),
            "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1",
            "PREFECT_WORKER_WEBSERVER_PORT": str(webserver),
            "PREFECT_GOVERNANCE_METRICS_HOST": "127.0.0.1",
            "PREFECT_GOVERNANCE_METRICS_PORT": str(own),
        },
    )
    args = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool]
    worker = spawn([*args, "--with-healthcheck"], env, tmp / f"worker-{pool}.log")
    gov.workers.append(worker)  # stopped with the harness
    urls = {
        "webserver": f"http://127.0.0.1:{webserver}/metrics",
        "own port": f"http://127.0.0.1:{own}/metrics",
    }
    for url in urls.values():
        wait_http(url, 60, worker)
    return urls


@pytest.fixture(scope="module")
def scraped(prefect_server, tmp_path_factory):
    """Scrapes before and after one allowed and one refused run, from both ports."""
    tmp = tmp_path_factory.mktemp("metrics")
    with harness(prefect_server, tmp, lineage_block="metrics-lineage") as gov:
        agent = GovernanceAgent(
            id=AGENT,
            owner="data@example.com",
            trust_scope=[POOL],
            capabilities=["read:warehouse", "write:warehouse"],
        )
        asyncio.run(gov.governed_pool(POOL, agent, deployment=f"{POOL}-setup"))
        urls = _governed_worker(gov, prefect_server, POOL, tmp)
        before = {where: scrape(url) for where, url in urls.items()}
        runs = asyncio.run(_runs(tmp))
        final = asyncio.run(wait_final([run_id for run_id, _ in runs.values()], timeout=120))
        asyncio.run(wait_outcomes(gov.store, [runs["allowed"][0]], timeout=60))
        # The worker leaves a run (in-flight) just after recording its outcome.
        deadline = time.monotonic() + 30
        while True:
            after = {where: scrape(url) for where, url in urls.items()}
            settled = all(
                get(s, "prefect_governance_runs_in_flight") == 0
                and total(s, "prefect_governance_outcomes_total") >= 1
                for s in after.values()
            )
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        with urllib.request.urlopen(urls["webserver"], timeout=5) as last:  # for the reader
            (tmp / "metrics.txt").write_bytes(last.read())
        health_url = urls["webserver"].replace("/metrics", "/health")
        with urllib.request.urlopen(health_url, timeout=5) as health:
            health_status = health.status
        # A deployment author names agents that do not exist, and a policy path.
        invented = asyncio.run(_invented_agents(tmp))
        attacked_final = asyncio.run(wait_final([i for i, _ in invented], timeout=120))
        deadline = time.monotonic() + 30
        while True:
            attacked = scrape(urls["own port"])
            done = total(attacked, "prefect_governance_decisions_total") >= 4
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        yield {
            "attacked": attacked,
            "invented": [(attacked_final[i], marker) for i, marker in invented],
            "before": before,
            "after": after,
            "runs": {name: (final[run_id], marker) for name, (run_id, marker) in runs.items()},
            "health": health_status,
        }


WHERE = pytest.mark.parametrize("where", ["webserver", "own port"])


def test_the_runs_went_as_decided(scraped):
    allowed, allowed_marker = scraped["runs"]["allowed"]
    refused, refused_marker = scraped["runs"]["refused"]
    assert allowed.state.is_completed() and allowed_marker.exists()
    assert refused.state.name == "Refused" and not refused_marker.exists(), "refused, never ran"
    assert scraped["health"] == 200, "Prefect's /health still answers beside /metrics"


@WHERE
def test_nothing_was_decided_before_the_runs(scraped, where):
    before = scraped["before"][where]
    assert total(before, "prefect_governance_decisions_total") == 0
    assert get(before, "prefect_governance_runs_in_flight") == 0
    info = [dict(k[1]) for k in before if k[0] == "prefect_governance_worker_info"]
    assert len(info) == 1 and info[0]["pool"] == POOL and info[0]["type"] == "governed-process"


@WHERE
def test_each_run_moved_the_decision_counters_by_one(scraped, where):
    after = scraped["after"][where]
    labels = dict(pool=POOL, policy_path=PATH, engine="embedded", agent=AGENT)
    assert get(after, "prefect_governance_decisions_total", verdict="allowed", **labels) == 1
    assert get(after, "prefect_governance_decisions_total", verdict="refused", **labels) == 1
    assert total(after, "prefect_governance_decisions_total") == 2, "nothing else was counted"
    count = "prefect_governance_decision_duration_seconds_count"
    assert get(after, count, engine="embedded") == 2
    assert get(after, "prefect_governance_decision_duration_seconds_sum", engine="embedded") > 0
    assert total(after, "prefect_governance_engine_failures_total") == 0


@WHERE
def test_the_outcome_and_the_lineage_appends_are_counted(scraped, where):
    after = scraped["after"][where]
    outcomes = "prefect_governance_outcomes_total"
    labels = dict(pool=POOL, agent=AGENT, settled_by="worker")
    assert get(after, outcomes, state="COMPLETED", **labels) == 1
    assert total(after, outcomes) == 1, "a refused run has no outcome"
    appended = "prefect_governance_lineage_append_duration_seconds_count"
    assert get(after, appended, record="decision") == 2
    assert get(after, appended, record="outcome") == 1
    assert total(after, "prefect_governance_lineage_append_failures_total") == 0
    assert get(after, "prefect_governance_runs_in_flight") == 0
    assert total(after, "prefect_governance_reconciled_runs_total") == 0
    assert get(after, "prefect_governance_gate_refusals_total") == 0
    # The embedded engine has no circuit breaker to show.
    assert not [k for k in after if k[0] == "prefect_governance_engine_breaker_state"]


def test_a_deployment_author_cannot_mint_label_values(scraped):
    """Agents nobody signed and a policy path of the deployment's own are refused by the
    worker and counted in one series: no label carries what the author wrote."""
    for run, marker in scraped["invented"]:
        assert run.state.name == "Refused" and not marker.exists()
    attacked, after = scraped["attacked"], scraped["after"]["own port"]
    labels = dict(pool=POOL, policy_path=PATH, engine="worker", agent="", verdict="refused")
    assert get(attacked, "prefect_governance_decisions_total", **labels) == 2
    new = {k for k in attacked if k[0] == "prefect_governance_decisions_total"} - set(after)
    assert len(new) == 1, new
    values = {v for _, labelset in attacked for _, v in labelset}
    assert not [v for v in values if "nobody" in v or "invented" in v], values
    count = "prefect_governance_decision_duration_seconds_count"
    assert get(attacked, count, engine="embedded") == 2, "no engine was asked"


@pytest.fixture(scope="module")
def gate_refusal(prefect_server, tmp_path_factory):
    """A run that Prefect's stock process worker took from a governed pool (the gate
    refused it), then the governed worker's scrape once its reconciler found it."""
    tmp = tmp_path_factory.mktemp("metrics-gate")
    with harness(prefect_server, tmp, lineage_block="metrics-gate-lineage") as gov:
        agent = GovernanceAgent(
            id="metrics-gated",
            owner="data@example.com",
            trust_scope=[GATE_POOL],
            capabilities=["read:warehouse"],
        )
        deployment = asyncio.run(
            gov.governed_pool(GATE_POOL, agent, job_variables={"capabilities": ["read:warehouse"]})
        )
        marker = tmp / "marker-stock"
        run = asyncio.run(_run_once(deployment, marker))
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        stock = gov.start_worker(GATE_POOL, worker_type="process", extra_env={"PATH": path})
        final = asyncio.run(wait_final([run], timeout=120))[run]
        gov.stop_worker(stock)
        urls = _governed_worker(gov, prefect_server, GATE_POOL, tmp)
        deadline = time.monotonic() + 60
        while True:
            after = scrape(urls["own port"])
            if get(after, "prefect_governance_gate_refusals_total") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        yield final, marker, after


async def _run_once(deployment: Any, marker: Path) -> Any:
    async with get_client() as client:
        run = await client.create_flow_run_from_deployment(
            deployment, parameters={"rows": 10, "marker": str(marker)}
        )
    return run.id


def test_a_start_the_gate_refused_is_counted_once_found(gate_refusal):
    final, marker, after = gate_refusal
    assert final.state.is_crashed() and not marker.exists(), "the stock worker ran nothing"
    assert get(after, "prefect_governance_gate_refusals_total") == 1
    assert total(after, "prefect_governance_decisions_total") == 0, "nothing was decided"
    assert total(after, "prefect_governance_outcomes_total") == 0
    assert get(after, "prefect_governance_reconcile_failures_total") == 0


@pytest.fixture(scope="module")
def opa_down(prefect_server, opa_bin, tmp_path_factory):
    """Three runs on a pool whose OPA is gone (a real OPA, stopped: its port refuses),
    its engine's breaker opening after two failures; the scrape once all are decided."""
    tmp = tmp_path_factory.mktemp("metrics-down")
    down = OpaServer(opa_bin, tmp)
    down.stop()
    with harness(prefect_server, tmp, lineage_block="metrics-down-lineage") as gov:
        engine = asyncio.run(
            gov.save_engine(
                "metrics-down",
                kind="opa",
                opa_url=down.url,
                retries=0,
                breaker_failures=2,
                breaker_reset_seconds=600,
            )
        )
        agent = GovernanceAgent(
            id="metrics-down-etl",
            owner="data@example.com",
            trust_scope=[DOWN_POOL],
            capabilities=["read:warehouse"],
        )
        deployment = asyncio.run(
            gov.governed_pool(
                DOWN_POOL,
                agent,
                job_variables={"capabilities": ["read:warehouse"]},
                engine=engine,
            )
        )
        markers = [tmp / f"marker-{i}" for i in range(3)]
        runs = [asyncio.run(_run_once(deployment, marker)) for marker in markers]
        urls = _governed_worker(gov, prefect_server, DOWN_POOL, tmp)
        final = asyncio.run(wait_final(runs, timeout=120))
        deadline = time.monotonic() + 30
        while True:
            after = scrape(urls["webserver"])
            done = total(after, "prefect_governance_decisions_total") >= 3
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        yield [(final[run], marker) for run, marker in zip(runs, markers, strict=True)], after


def test_an_engine_that_is_down_shows_its_failures_and_its_open_breaker(opa_down):
    runs, after = opa_down
    for run, marker in runs:
        assert run.state.name == "Refused" and "unreachable" in run.state.message
        assert not marker.exists()
    failures = "prefect_governance_engine_failures_total"
    assert get(after, failures, engine="opa", kind="unreachable") == 3
    assert total(after, failures) == 3
    labels = dict(pool=DOWN_POOL, policy_path=PATH, engine="opa", agent="metrics-down-etl")
    assert get(after, "prefect_governance_decisions_total", verdict="refused", **labels) == 3
    breaker = dict(engine="opa", block="metrics-down")
    state = "prefect_governance_engine_breaker_state"
    assert get(after, state, state="open", **breaker) == 1
    assert get(after, state, state="closed", **breaker) == 0
    consecutive = "prefect_governance_engine_breaker_consecutive_failures"
    assert get(after, consecutive, **breaker) >= 2
    assert get(after, "prefect_governance_decision_duration_seconds_count", engine="opa") == 3
