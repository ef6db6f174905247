"""Faults of the policy engine: a faulty OPA, a stopped OPA, an OPA killed mid-request.

Every fault is produced for real: a real HTTP server on a loopback port plays
the faulty OPA (tests/faults_support.py) and counts the requests that reach it;
stopped and killed OPAs are real OPA processes. Each fault is a refusal that
names it (fail closed), or an ungoverned run that records it (fail open). The
circuit breaker and the retries are proven by counting requests at the server.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import pytest
from prefect import get_client

from prefect_governance.cli.local import free_port, stop
from prefect_governance.core.decision import decide
from prefect_governance.core.engines.breaker import Breaker
from prefect_governance.core.engines.opa import OpaEngine
from prefect_governance.core.models import DEFAULT_POLICY_PATH, Decision
from prefect_governance.testing import create_pool, deploy_example, wait_final
from prefect_governance.worker.blocks import GovernanceAgent
from tests.agents import harness
from tests.conftest import POLICIES, OpaServer
from tests.faults_support import ALLOW, FAULTS, FaultyOpa, start_opa

PATH = "prefect/governance/decision"


@pytest.fixture(scope="module")
def faulty():
    with FaultyOpa() as server:
        yield server


@pytest.fixture
def server(faulty: FaultyOpa) -> FaultyOpa:
    """The module's faulty OPA, answering well and with its count at zero."""
    faulty.fault, faulty.requests = ALLOW, 0
    return faulty


def _decide(engine: OpaEngine, *, deadline: float = 5.0, fail_mode: str = "closed") -> Decision:
    return _decide_all(engine, 1, deadline=deadline, fail_mode=fail_mode)[0]


def _decide_all(
    engine: OpaEngine, count: int, *, deadline: float = 5.0, fail_mode: str = "closed"
) -> list[Decision]:
    """Decisions by one engine, one after another in one event loop (as in a worker)."""

    async def go() -> list[Decision]:
        try:
            return [
                await decide(engine, PATH, {}, fail_mode=fail_mode, deadline=deadline)
                for _ in range(count)
            ]
        finally:
            await engine.aclose()

    return asyncio.run(go())


def _assert_names_fault(decision: Decision, fail_mode: str, kind: str, words: str) -> str:
    """Refused (closed) or ungoverned (open), with a reason naming the fault; the reason."""
    reason = decision.error
    assert reason is not None and reason.startswith(f"policy engine failed ({kind}):"), reason
    assert words in reason, reason
    assert decision.allow is False
    if fail_mode == "closed":
        assert decision.verdict == "refused" and decision.deny == [reason]
    else:
        assert decision.verdict == "ungoverned" and decision.deny == []
        assert decision.warn == [
            f"{reason}; the pool is fail-open, so the run goes ahead ungoverned"
        ]
    return reason


# --- each fault, through decide() ------------------------------------------------

FAULT_CASES = [  # fault, the kind it is, words the reason must contain
    ("slow", "timeout", "did not answer in 0.5s"),
    ("http-500", "http", "OPA answered HTTP 500: upstream exploded"),
    ("http-503", "http", "OPA answered HTTP 503: <html>Service Unavailable</html>"),
    ("http-400", "http", "HTTP 400: invalid_parameter error(s) occurred while parsing query"),
    ("internal-error", "evaluation", "HTTP 500: internal_error eval_builtin_error"),
    ("result-string", "shape", "the policy result is a str, not an object"),
    ("allow-string", "shape", "allow: Input should be a valid boolean"),
    ("undefined", "undefined", "the policy result is undefined"),
    ("not-json", "shape", "not a JSON object"),
    ("cut", "http", "broke off its answer"),
]


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
@pytest.mark.parametrize(("fault", "kind", "words"), FAULT_CASES, ids=[c[0] for c in FAULT_CASES])
def test_a_faulty_opa_is_a_refusal_that_names_the_fault(server, fault, kind, words, fail_mode):
    server.fault = FAULTS[fault]
    engine = OpaEngine(server.url, timeout=0.5, retries=0)
    decision = _decide(engine, fail_mode=fail_mode)
    _assert_names_fault(decision, fail_mode, kind, words)
    assert server.requests == 1


def test_the_faulty_server_answers_well_when_told_to(server):
    """The control: the same server and engine, a good answer, an allowed run."""
    decision = _decide(OpaEngine(server.url, retries=0))
    assert decision.verdict == "allowed" and decision.error is None
    assert server.requests == 1


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
def test_a_stopped_opa_is_unreachable(opa_bin, tmp_path, fail_mode):
    opa = OpaServer(opa_bin, tmp_path)
    assert _decide(OpaEngine(opa.url, retries=0)).error is None, "it answers while it runs"
    opa.stop()
    decision = _decide(OpaEngine(opa.url, retries=0), fail_mode=fail_mode)
    _assert_names_fault(decision, fail_mode, "unreachable", "Cannot connect to host")


SLOW_POLICY = """package slow

result := {"allow": n > 0} if {
	n := count({x |
		some i in numbers.range(1, 3000)
		some j in numbers.range(1, 3000)
		x := (i * j) % 7
	})
}
"""


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
def test_an_opa_killed_mid_request_is_unreachable(opa_bin, tmp_path, fail_mode):
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "slow.rego").write_text(SLOW_POLICY)
    opa = OpaServer(opa_bin, tmp_path, "--log-level", "debug", paths=(tmp_path / "policy",))

    async def kill_while_in_flight() -> Decision:
        engine = OpaEngine(opa.url, timeout=60, retries=0)
        try:
            asking = asyncio.create_task(
                decide(engine, "slow/result", {}, fail_mode=fail_mode, deadline=60)
            )
            await _until_logged(opa.log, '"req_path":"/v1/data/slow/result"')
            assert not asking.done(), "the policy is slow: OPA is still evaluating"
            os.kill(opa.process.pid, signal.SIGKILL)
            return await asking
        finally:
            await engine.aclose()

    try:
        decision = asyncio.run(kill_while_in_flight())
    finally:
        opa.stop()
    assert opa.process.returncode == -signal.SIGKILL
    _assert_names_fault(decision, fail_mode, "unreachable", "Server disconnected")


async def _until_logged(log: Path, text: str, timeout: float = 20.0) -> None:
    """Wait until OPA's (debug) log shows it received the request."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"OPA never logged {text}"
        await asyncio.sleep(0.05)


# --- the circuit breaker, pure -----------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_opens_after_n_consecutive_failures():
    clock = FakeClock()
    breaker = Breaker(3, 30, clock=clock)
    for n in range(3):
        assert breaker.admit() is None and breaker.state == "closed"
        breaker.failure(f"timeout: try {n + 1}")
    assert breaker.state == "open"
    clock.now += 10
    assert breaker.admit() == (
        "policy engine unavailable (circuit open for 30s after 3 failures, "
        "next trial in 20.0s: timeout: try 3)"
    )


def test_an_answer_resets_the_count_of_failures():
    breaker = Breaker(3, 30, clock=FakeClock())
    breaker.failure("a")
    breaker.failure("b")
    breaker.success()
    breaker.failure("c")
    breaker.failure("d")
    assert breaker.state == "closed" and breaker.admit() is None
    breaker.failure("e")
    assert breaker.state == "open"


def test_after_the_interval_one_trial_goes_through_and_its_success_closes():
    clock = FakeClock()
    breaker = Breaker(2, 30, clock=clock)
    breaker.failure("x")
    breaker.failure("x")
    clock.now += 29.9
    assert breaker.admit() is not None
    clock.now += 0.1
    assert breaker.admit() is None and breaker.state == "half-open"
    assert "a trial request is in flight" in breaker.admit(), "only one trial at a time"
    breaker.success()
    assert breaker.state == "closed" and breaker.admit() is None
    assert breaker.consecutive_failures == 0


def test_a_failed_trial_opens_the_circuit_for_another_interval():
    clock = FakeClock()
    breaker = Breaker(2, 30, clock=clock)
    breaker.failure("x")
    breaker.failure("x")
    clock.now += 30
    assert breaker.admit() is None
    breaker.failure("still down")
    assert breaker.state == "open"
    clock.now += 29
    assert "after 3 failures" in breaker.admit() and "still down" in breaker.admit()
    clock.now += 1
    assert breaker.admit() is None


def test_an_abandoned_trial_lets_the_next_caller_try():
    clock = FakeClock()
    breaker = Breaker(1, 30, clock=clock)
    breaker.failure("x")
    clock.now += 30
    assert breaker.admit() is None
    breaker.abandon()
    assert breaker.admit() is None and breaker.state == "half-open"


def test_a_breaker_of_zero_failures_never_opens():
    breaker = Breaker(0, 30, clock=FakeClock())
    for _ in range(100):
        breaker.failure("x")
    assert breaker.state == "closed" and breaker.admit() is None


def test_the_breaker_rejects_negative_settings():
    with pytest.raises(ValueError):
        Breaker(-1, 30)
    with pytest.raises(ValueError):
        Breaker(3, -1)


# --- the circuit breaker, in the engine, against the faulty server ---------------


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
def test_an_open_circuit_fails_decisions_without_asking_opa(server, fail_mode):
    server.fault = FAULTS["slow"]
    clock = FakeClock()
    engine = OpaEngine(
        server.url,
        timeout=0.3,
        retries=0,
        breaker_failures=3,
        breaker_reset_seconds=10,
        clock=clock,
    )

    async def go() -> None:
        async def one() -> Decision:
            return await decide(engine, PATH, {}, fail_mode=fail_mode)

        try:
            for n in range(1, 4):  # each costs a timeout, and reaches the server
                _assert_names_fault(await one(), fail_mode, "timeout", "did not answer")
                assert server.requests == n
            for _ in range(2):  # the circuit is open: no request
                _assert_names_fault(
                    await one(),
                    fail_mode,
                    "unreachable",
                    "policy engine unavailable (circuit open for 10s after 3 failures",
                )
                assert server.requests == 3
            clock.now += 10  # the trial goes out, and fails again
            _assert_names_fault(await one(), fail_mode, "timeout", "did not answer")
            assert server.requests == 4
            _assert_names_fault(await one(), fail_mode, "unreachable", "after 4 failures")
            assert server.requests == 4
            server.fault = ALLOW  # OPA is fixed, but the circuit is still open
            _assert_names_fault(await one(), fail_mode, "unreachable", "circuit open")
            assert server.requests == 4
            clock.now += 10  # the trial succeeds and closes the circuit
            assert (await one()).verdict == "allowed"
            assert (await one()).verdict == "allowed"
            assert server.requests == 6
        finally:
            await engine.aclose()

    asyncio.run(go())


@pytest.mark.parametrize(
    ("fault", "trips"),
    [("http-503", True), ("http-500", True), ("http-400", False), ("result-string", False)],
)
def test_only_unavailability_trips_the_breaker(server, fault, trips):
    server.fault = FAULTS[fault]
    engine = OpaEngine(server.url, retries=0, breaker_failures=2, clock=FakeClock())
    decisions = _decide_all(engine, 4)
    assert server.requests == (2 if trips else 4)
    assert ("circuit open" in decisions[-1].error) is trips


def test_a_tls_mismatch_is_neither_retried_nor_tripping_the_breaker(server):
    """https to a plain-HTTP port: a lasting misconfiguration, not an outage."""
    engine = OpaEngine(server.url.replace("http:", "https:"), retries=2, breaker_failures=1)
    decisions = _decide_all(engine, 2)
    for decision in decisions:
        assert decision.error.startswith("policy engine failed (unreachable):")
        assert "SSL" in decision.error and "attempts" not in decision.error, decision.error
    assert engine.breaker.state == "closed"


def test_a_decision_cut_by_its_deadline_counts_as_a_failure(server):
    server.fault = FAULTS["slow"]
    engine = OpaEngine(server.url, timeout=5, retries=0, breaker_failures=1, clock=FakeClock())

    async def go() -> tuple[Decision, int, Decision]:
        try:
            first = await decide(engine, PATH, {}, deadline=0.05)  # shorter than one attempt
            reached = server.requests
            return first, reached, await decide(engine, PATH, {})
        finally:
            await engine.aclose()

    first, reached, second = asyncio.run(go())
    assert "(timeout): no decision within 0.05s" in first.error
    assert engine.breaker.state == "open"
    assert "circuit open" in second.error and server.requests == reached


# --- retries stop at the decision deadline ------------------------------------------


def test_retries_stop_at_the_decision_deadline(server):
    """503 at once; backoff 0.3s, 0.6s, 1.2s: by 1.5s only three attempts fit."""
    server.fault = FAULTS["http-503"]
    engine = OpaEngine(server.url, retries=5, breaker_failures=0)
    decision = _decide(engine, deadline=1.5)
    assert server.requests == 3
    assert decision.verdict == "refused"
    assert decision.error.endswith(
        "Unavailable</html> (3 attempts; no time left for a retry before the decision deadline)"
    ), "the engine stopped itself; the deadline did not have to cut it"


def test_a_timeout_is_cut_to_the_time_left_and_not_retried_past_the_deadline(server):
    """Attempts of 1s, deadline 2s: the second (after a 0.3s pause) gets what is left."""
    server.fault = FAULTS["slow"]
    engine = OpaEngine(server.url, timeout=1.0, retries=5, breaker_failures=0)
    decision = _decide(engine, deadline=2.0)
    assert server.requests == 2
    assert decision.error.startswith("policy engine failed (timeout): OPA at ")
    assert re.search(
        r"did not answer in 0\.\d+s \(2 attempts; no time left for a retry before the "
        r"decision deadline\)$",
        decision.error,
    ), decision.error


def test_retries_go_on_while_there_is_time(server):
    server.fault = FAULTS["http-503"]
    decision = _decide(OpaEngine(server.url, retries=2, breaker_failures=0), deadline=30)
    assert server.requests == 3 and decision.error.endswith("Unavailable</html> (3 attempts)")


def test_a_lasting_failure_is_not_retried(server):
    server.fault = FAULTS["http-400"]
    decision = _decide(OpaEngine(server.url, retries=5, breaker_failures=0), deadline=30)
    assert server.requests == 1 and "invalid_parameter" in decision.error


def test_a_retry_that_succeeds_is_an_answer(server):
    """Down for one request, then back: the retry gets the decision."""
    server.fault = FAULTS["http-503"]
    engine = OpaEngine(server.url, retries=1, breaker_failures=0)

    async def go() -> Decision:
        try:
            asking = asyncio.create_task(decide(engine, PATH, {}))
            while server.requests < 1:
                await asyncio.sleep(0.01)
            server.fault = ALLOW
            return await asking
        finally:
            await engine.aclose()

    decision = asyncio.run(go())
    assert decision.verdict == "allowed" and server.requests == 2


# --- a governed worker while OPA is down, and after it is back --------------------


@pytest.mark.e2e
def test_a_worker_refuses_while_opa_is_down_and_runs_once_it_is_back(
    prefect_server, opa_bin, tmp_path
):
    port = free_port()
    faulty = FaultyOpa(FAULTS["http-503"], port=port)
    pool = "faults-opa"
    markers = tmp_path / "markers"
    markers.mkdir()

    async def setup() -> object:
        lineage = await gov.save_lineage()
        await gov.save_agent(
            GovernanceAgent(
                id="faults-etl",
                owner="data@example.com",
                trust_scope=[pool],
                capabilities=["read:warehouse"],
                # Default trust weights: refusals for an engine outage must not cost the agent
                # trust, or after three of them the trust rule would refuse it once OPA is back.
            )
        )
        await gov.save_engine(
            "faults-opa",
            kind="opa",
            opa_url=faulty.url,
            timeout_seconds=1,
            retries=0,
            breaker_failures=2,
            breaker_reset_seconds=8,
        )
        await create_pool(pool, engine="faults-opa", lineage_store=lineage)
        return await deploy_example(
            "faults-opa-load", pool, {"agent": "faults-etl", "capabilities": ["read:warehouse"]}
        )

    async def run(deployment_id, name: str):
        marker = markers / name
        async with get_client() as client:
            created = await client.create_flow_run_from_deployment(
                deployment_id, parameters={"rows": 10, "marker": str(marker)}
            )
        final = (await wait_final([created.id], timeout=90))[created.id]
        return final, marker

    gov = harness(prefect_server, tmp_path, lineage_block="faults-lineage")
    opa = None
    with gov:
        deployment_id = asyncio.run(setup())
        worker = gov.start_worker(pool, log=tmp_path / "w.log")
        try:
            down, down_marker = asyncio.run(run(deployment_id, "down-503"))
            faulty.stop()  # now nothing listens on the port
            gone, gone_marker = asyncio.run(run(deployment_id, "down-gone"))
            gone_at = time.monotonic()
            tripped, tripped_marker = asyncio.run(run(deployment_id, "down-circuit"))
            assert worker.poll() is None, "the worker keeps polling through the faults"

            opa = start_opa(opa_bin, port, tmp_path / "opa.log", POLICIES)  # back, same port
            time.sleep(max(0.0, 8 - (time.monotonic() - gone_at)))  # the circuit's interval
            back, back_marker = asyncio.run(run(deployment_id, "back"))
        finally:
            gov.stop_workers()
            faulty.stop()
            if opa is not None:
                stop(opa)

    for state, marker, reason in (
        (down.state, down_marker, "policy engine failed (http): OPA answered HTTP 503"),
        (gone.state, gone_marker, "policy engine failed (unreachable): OPA at"),
        (tripped.state, tripped_marker, "policy engine unavailable (circuit open for 8s"),
    ):
        assert state is not None and state.name == "Refused", state
        assert reason in state.message, state.message
        assert DEFAULT_POLICY_PATH in state.message
        assert not marker.exists(), "a refused run did not execute"
    assert back.state is not None and back.state.is_completed(), back.state
    assert back_marker.read_text() == "loaded 10 rows into orders\n"
    assert back.labels["governance.decision"] == "allowed"
