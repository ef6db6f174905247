"""Governed tasks and mediated capabilities inside a flow run, in this process.

Flows run here (prefect.flow_engine.run_flow) against a real Prefect server,
with a grant signed as a governed worker would sign it, and the real embedded
engine deciding. The worker's side (chaining the events) is tested end to end
in test_governed_tasks_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prefect import flow, get_client, task
from prefect.blocks.system import Secret
from prefect.flow_engine import run_flow
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Failed

from prefect_governance import CapabilityDenied, capability, govern, governed, load_block
from prefect_governance.cli.local import free_port
from prefect_governance.core.envelope import task_parameters
from prefect_governance.core.handoff import ENVELOPE_ENV, TRUSTED_KEYS_ENV
from prefect_governance.core.models import (
    EngineRef,
    Grant,
    GrantPosture,
    MemorySnapshot,
    TaskRef,
    TrustState,
)
from prefect_governance.core.posture import start_posture
from prefect_governance.core.signing import SigningKey, sign
from prefect_governance.core.trust import TrustWeights
from prefect_governance.runtime.capabilities import denial
from prefect_governance.runtime.run_log import RunLog
from prefect_governance.runtime.tasks import (
    TaskRefused,
    TaskScope,
    _admit,
    _Declared,
    _retry_condition,
)
from prefect_governance.worker.governor import read_reports
from prefect_governance.worker.run_reports import reported_events
from tests.conftest import POLICIES
from tests.grants import example_grant

KEY = SigningKey.generate("tasks-test-signer")


SCHEMA_HASH = "sha256:" + "0" * 64  # the example agent's memory schema


def rising() -> GrantPosture:
    """A run's start with trust rising (the example agent's fell at its last run): one
    costly task end does not make it fall across three."""
    start = start_posture(
        TrustState(score=0.9, window=[0.8, 0.9]), MemorySnapshot(), schema_hash=SCHEMA_HASH, k=3
    )
    return GrantPosture(start=start, weights=TrustWeights().effective())


def grant_for(
    flow_run_id: str,
    *,
    grants: list[str],
    policy_dir: Path = POLICIES,
    posture: GrantPosture | None = None,
    **agent: Any,
):
    return example_grant(
        flow_run_id,
        decision_id="flow-decision",
        constraints=agent,
        grants=grants,
        engine=EngineRef(kind="embedded", policy_dir=str(policy_dir)),
        posture=posture,
    )


@pytest.fixture
def signed_env(monkeypatch):
    monkeypatch.setenv(TRUSTED_KEYS_ENV, json.dumps({KEY.key_id: KEY.public_b64}))

    def hand_over(grant: Grant) -> None:
        monkeypatch.setenv(ENVELOPE_ENV, json.dumps(sign(grant.model_dump(mode="json"), KEY)))

    return hand_over


def run_governed(the_flow, parameters, hand_over, **grant_args):
    """Create a flow run, hand it a signed grant, run it here; its final state and reports."""

    async def create():
        async with get_client() as client:
            return await client.create_flow_run(the_flow, parameters=parameters)

    flow_run = asyncio.run(create())
    if grant_args.get("grants") is not None:
        hand_over(grant_for(str(flow_run.id), **grant_args))
    state = run_flow(the_flow, flow_run=flow_run, parameters=parameters, return_type="state")
    if inspect.isawaitable(state):  # an async flow
        state = asyncio.run(state)

    async def reports():
        async with get_client() as client:
            return await read_reports(client, flow_run.id)

    events, problems = reported_events(asyncio.run(reports()), "flow-decision")
    return state, events, problems


# --- pure parts ---------------------------------------------------------------------


def test_task_parameters_are_redacted_and_non_json_values_summarised():
    class Frame:
        pass

    values, redacted = task_parameters(
        {"rows": 3, "api_token": "t0k", "frame": Frame(), "deep": [[[[1]]]], "blob": "x" * 50},
        redact_patterns=["token"],
        max_bytes=40,
        max_depth=3,
    )
    assert values["rows"] == 3 and values["api_token"] == "***REDACTED***"
    assert redacted == ["api_token"]
    assert values["frame"] == {
        "$type": f"{Frame.__module__}.{Frame.__qualname__}",
        "$omitted": "not JSON",
    }
    assert values["deep"]["$omitted"] == "nests deeper than 3 levels"
    assert values["blob"]["$omitted"].startswith("larger than")


def test_capability_denial_needs_the_grant_and_the_tasks_declaration():
    scope = TaskScope(TaskRef(name="load", run_id="r"), ("read:warehouse",))
    assert denial("read:warehouse", ["read:warehouse"], scope) is None
    assert denial("read:warehouse", ["read:warehouse"], None) is None  # the flow body
    assert "not granted" in denial("write:warehouse", ["read:warehouse"], None)
    assert "did not declare" in denial(
        "write:warehouse", ["read:warehouse", "write:warehouse"], scope
    )


def test_reported_events_are_ordered_once_each_and_gaps_named():
    def event(seq, kind="capability_use"):
        return {"seq": seq, "kind": kind}

    batches = [
        {"decision_id": "d", "events": [event(3), event(4)]},
        {"decision_id": "d", "events": [event(1)]},
        {"decision_id": "d", "events": [event(1)]},  # a send retried after a timeout
        {"decision_id": "other", "events": [event(2)]},
        {"decision_id": "d", "events": [event(6), {"seq": 7, "kind": "rm -rf"}]},
    ]
    events, problems = reported_events(batches, "d")
    assert [e.seq for e in events] == [1, 3, 4, 6]
    assert any("another decision" in p for p in problems)
    assert any("not a governance event" in p for p in problems)
    assert any("seq 2, 5" in p for p in problems)


# --- in a real flow run ------------------------------------------------------------


def test_govern_governs_closure_tasks_and_a_refused_body_never_runs(
    prefect_server, signed_env, tmp_path
):
    @task
    def allowed_step(path: str) -> None:
        Path(path, "allowed").write_text("ran")

    @task
    def forbidden_step(path: str) -> None:
        Path(path, "forbidden").write_text("ran")

    @govern
    @flow
    def pipeline(path: str) -> str:
        allowed_step(path)
        return forbidden_step(path, return_state=True).message

    state, events, problems = run_governed(
        pipeline, {"path": str(tmp_path)}, signed_env, grants=[], tasks={"deny": ["forbidden_step"]}
    )
    assert state.is_completed(), state
    assert (tmp_path / "allowed").exists()
    assert not (tmp_path / "forbidden").exists(), "the refused task's body ran"
    assert "governance refused task 'forbidden_step'" in state.result()
    assert problems == []
    assert [(e.kind, e.task["name"]) for e in events] == [
        ("task_decision", "allowed_step"),
        ("task_end", "allowed_step"),
        ("task_decision", "forbidden_step"),
        ("task_end", "forbidden_step"),
    ]
    assert [e.decision["verdict"] for e in events if e.kind == "task_decision"] == [
        "allowed",
        "refused",
    ]
    assert [e.outcome for e in events if e.kind == "task_end"] == ["completed", "refused"]


def test_async_tasks_are_governed_alike(prefect_server, signed_env, tmp_path):
    @task
    async def fetch(path: str) -> int:
        Path(path, "fetch").write_text("ran")
        return 1

    @task
    async def forbidden_step(path: str) -> None:
        Path(path, "forbidden").write_text("ran")

    @govern
    @flow
    async def pipeline(path: str) -> str:
        await fetch(path)
        return (await forbidden_step(path, return_state=True)).message

    state, events, _ = run_governed(
        pipeline, {"path": str(tmp_path)}, signed_env, grants=[], tasks={"deny": ["forbidden_step"]}
    )
    assert state.is_completed(), state
    assert (tmp_path / "fetch").exists() and not (tmp_path / "forbidden").exists()
    assert "governance refused task 'forbidden_step'" in state.result()
    decided = [e.decision["verdict"] for e in events if e.kind == "task_decision"]
    assert decided == ["allowed", "refused"]
    assert [e.outcome for e in events if e.kind == "task_end"] == ["completed", "refused"]


def test_a_task_in_a_run_without_a_grant_is_refused(
    prefect_server, signed_env, tmp_path, monkeypatch
):
    monkeypatch.delenv(ENVELOPE_ENV, raising=False)

    @governed
    @task
    def step(path: str) -> None:
        Path(path, "ran").write_text("ran")

    @flow
    def ungranted(path: str) -> tuple[str, str]:
        task_state = step(path, return_state=True)
        return task_state.type.value, task_state.message

    state, events, _ = run_governed(ungranted, {"path": str(tmp_path)}, signed_env, grants=None)
    kind, message = state.result()
    assert kind == "FAILED" and "no governance envelope" in message
    assert not (tmp_path / "ran").exists()
    assert events == []


def test_capabilities_are_checked_before_use_and_every_use_reported(
    prefect_server, signed_env, tmp_path
):
    @governed(capabilities=["read:warehouse"])
    @task
    def reader(path: str) -> list[str]:
        outcomes = []
        for name in ("read:warehouse", "write:warehouse"):
            try:
                with capability(name):
                    Path(path, name).write_text("used")
                outcomes.append(f"{name}: used")
            except CapabilityDenied as denied:
                outcomes.append(str(denied))
        return outcomes

    @flow
    def uses(path: str) -> list[str]:
        outcomes = reader(path)
        try:
            with capability("delete:warehouse"):
                Path(path, "delete").write_text("used")
        except CapabilityDenied as denied:
            outcomes.append(str(denied))
        return outcomes

    state, events, problems = run_governed(
        uses, {"path": str(tmp_path)}, signed_env, grants=["read:warehouse", "write:warehouse"]
    )
    outcomes = state.result()
    assert outcomes[0] == "read:warehouse: used"
    assert "task 'reader' did not declare it" in outcomes[1]
    assert "not granted to this flow run" in outcomes[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["read:warehouse"], "a denied use touched"
    uses_ = [(e.capability, e.granted) for e in events if e.kind == "capability_use"]
    assert uses_ == [
        ("read:warehouse", True),
        ("write:warehouse", False),
        ("delete:warehouse", False),
    ]
    assert problems == []


def test_blocks_load_through_the_runtime_only_when_granted(prefect_server, signed_env):
    Secret(value="warehouse-password").save("warehouse-creds", overwrite=True)

    @flow
    def loads() -> list[str]:
        seen = [load_block(Secret, "warehouse-creds").get()]
        try:
            load_block("secret/other-creds")
        except CapabilityDenied as denied:
            seen.append(str(denied))
        return seen

    state, events, _ = run_governed(loads, {}, signed_env, grants=["block:secret/warehouse-creds"])
    loaded, denied = state.result()
    assert loaded == "warehouse-password"
    assert "capability 'block:secret/other-creds' denied" in denied
    assert [e.use for e in events] == [
        "load block secret/warehouse-creds",
        "load block secret/other-creds",
    ]


# --- retries ---------------------------------------------------------------------------


def test_a_refused_task_is_retried_only_when_the_policy_changes_its_answer(
    prefect_server, signed_env, tmp_path, monkeypatch
):
    """The retry condition asks the policy again: no while it still refuses, yes once it allows."""
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES / "prefect", policies / "prefect")
    run_id = str(_flow_run().id)
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", run_id)  # as in the run's process
    # Trust rising before the run: the refusal's cost alone does not make it fall three
    # times running (which would refuse the retry whatever the names rule says).
    signed_env(
        grant_for(
            run_id, grants=[], policy_dir=policies, posture=rising(), tasks={"deny": ["flaky"]}
        )
    )

    with pytest.raises(TaskRefused) as refused:
        _admit(_Declared("flaky", (), ()))
    retry = _retry_condition(None)
    failed = Failed(data=refused.value)
    assert retry(None, None, failed) is False, "retried though the policy still refuses"

    # The policy changes: nothing is denied by name any more.
    names = policies / "prefect" / "governance" / "task_rules" / "names.rego"
    names.write_text(names.read_text().replace("deny contains", "never contains"))
    deadline = time.monotonic() + 10
    while not retry(None, None, failed):  # the engine picks the change up within seconds
        assert time.monotonic() < deadline, "the changed policy was not asked"
        time.sleep(0.5)

    other = Failed(data=RuntimeError("an ordinary failure"))
    assert retry(None, None, other) is True, "ordinary failures retry as before"
    assert _retry_condition(lambda *a: False)(None, None, other) is False


# --- the run's log ---------------------------------------------------------------------


def _flow_run() -> Any:
    @flow
    def holder() -> None: ...

    async def create():
        async with get_client() as client:
            return await client.create_flow_run(holder)

    return asyncio.run(create())


class Forwarder:
    """A TCP forwarder on a port of our choosing: the Prefect API, reachable or not."""

    def __init__(self, port: int, target: tuple[str, int]):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()


def test_the_run_log_keeps_events_until_prefect_takes_them(prefect_server):
    flow_run = _flow_run()
    port = free_port()
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}):
        log = RunLog(str(flow_run.id), "d", batch=1000, interval=3600)
    log.add("capability_use", {"capability": "a", "granted": True})
    assert log.flush() is False, "nothing listens there yet: the API is down"
    log.add("capability_use", {"capability": "b", "granted": True})
    assert log.flush() is False
    forwarder = Forwarder(port, ("127.0.0.1", prefect_server.port))  # the API is back
    try:
        assert log.flush() is True
        log.close()
    finally:
        forwarder.close()

    async def reports():
        async with get_client() as client:
            return await read_reports(client, flow_run.id)

    events, problems = reported_events(asyncio.run(reports()), "d")
    assert [e.capability for e in events] == ["a", "b"] and problems == []


# --- memory per task ---------------------------------------------------------------------


def test_a_task_writing_a_field_it_did_not_declare_is_rejected_at_its_end(
    prefect_server, signed_env, tmp_path
):
    """Attack: a task declares one memory field and proposes another."""
    from prefect_governance import current_memory, propose_memory

    @governed(writes=["notes"])
    @task
    def sneaky(path: str) -> None:
        Path(path, "sneaky").write_text("ran")
        propose_memory({"owner": "me"})

    @governed(writes=["notes"])
    @task
    def honest(path: str) -> None:
        propose_memory({"notes": "checked"})

    @govern  # which sends the run's events when the body ends
    @flow
    def remembers(path: str) -> tuple[str, str, dict]:
        rejected = sneaky(path, return_state=True)
        honest(path)
        return rejected.type.value, rejected.message, current_memory()

    state, events, problems = run_governed(
        remembers, {"path": str(tmp_path)}, signed_env, grants=[], posture=rising()
    )
    kind, message, memory = state.result()
    assert kind == "FAILED" and (tmp_path / "sneaky").exists()
    assert "rejected the memory proposal of task 'sneaky'" in message
    assert 'may not write memory field "owner"' in message
    assert memory == {"notes": "checked"}, "the rejected proposal applied, or the honest one not"
    commits = [e for e in events if e.kind == "task_decision" and e.purpose == "commit"]
    assert [(e.task["name"], e.decision["verdict"]) for e in commits] == [
        ("sneaky", "refused"),
        ("honest", "allowed"),
    ]
    assert commits[0].envelope["memory"]["proposed"] == ["owner"]
    ends = [e for e in events if e.kind == "task_end"]
    assert [(e.task["name"], e.outcome, e.accepted) for e in ends] == [
        ("sneaky", "memory_rejected", False),
        ("honest", "completed", True),
    ]
    assert ends[1].posture["memory_version"] == 1 and ends[1].posture["tasks"] == 2
    assert problems == []
