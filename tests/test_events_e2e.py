"""The governed worker's Prefect events and a shipped notification, on a real server.

A real refusal by the real governed worker (its flow's marker stays absent) emits
``prefect-governance.decision.refused`` naming the run, deployment, flow, agent, pool,
policy and worker; a ``kind: notification`` document applied with ``prefect-governance
apply`` makes Prefect's automation send it through a Custom Webhook block to a loopback
HTTP server, with the run's id and the reasons, redacted. An allowed run's end emits
``prefect-governance.run.settled``. A forged refusal event of another pool notifies no one
(the automation's pool scope), and changes no run: events are information.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from prefect import get_client
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.events.filters import EventFilter, EventNameFilter

from prefect_governance.cli.automations import NOTIFY, remove_guards
from prefect_governance.cli.local import prefect_env
from prefect_governance.testing import deploy_example, wait_final
from prefect_governance.worker.blocks import GovernanceAgent
from tests.agents import harness

pytestmark = pytest.mark.e2e

POOL, AGENT, ENGINE, HOOK = "events-pool", "events-agent", "events-engine", "events-hook"
TOKEN = "ghp_" + "Z9y8X7w6V5u4T3s2R1q0P9o8N7m6L5k4J3i2"  # a GitHub token's shape
PLAIN_SECRET = "hunter2-plain-words"  # no secret shape: only its parameter's name says secret
CLI = [sys.executable, "-m", "prefect_governance.cli"]

# Refuses a run that has an api_token parameter or a credential-shaped tag, quoting both.
POLICY = """package prefect.governance

import rego.v1

denies contains msg if {
	token := input.envelope.parameters.api_token
	msg := sprintf("api_token %v may not be used here", [token])
}

denies contains msg if {
	some tag in input.envelope.flow_run.tags
	startswith(tag, "ghp_")
	msg := sprintf("tag %v carries a credential", [tag])
}

decision := {
	"allow": count(denies) == 0,
	"deny": [m | some m in denies],
	"warn": [],
	"annotations": {},
}
"""


class Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []
    arrived: ClassVar[threading.Event] = threading.Event()

    def do_POST(self) -> None:  # http.server's name
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        type(self).received.append(json.loads(body or b"{}"))
        type(self).arrived.set()
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def cli(server: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=prefect_env(server.home, server.api_url),
    )


async def _events(name: str, resource: str | None = None) -> list[dict[str, Any]]:
    """The server's events of this name (about this resource), newest first."""
    query = EventFilter(
        event=EventNameFilter(name=[name]),
        **({"any_resource": {"id": [resource]}} if resource else {}),
    )
    async with get_client() as client:
        response = await client._client.post(
            "/events/filter", json={"filter": query.model_dump(mode="json"), "limit": 50}
        )
        response.raise_for_status()
        return response.json()["events"]


async def _wait_events(name: str, resource: str, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while not (found := await _events(name, resource)) and time.monotonic() < deadline:
        await asyncio.sleep(1)
    return found


def _roles(event: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {r["prefect.resource.role"]: r for r in event["related"]}


def test_a_refusal_is_an_event_and_notifies_through_a_block(prefect_server, tmp_path):
    http = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        _refuse_and_notify(prefect_server, tmp_path, http.server_address[1])
    finally:
        http.shutdown()
        cli(prefect_server, "notification", "remove", "events-refusals")
        asyncio.run(_remove_guards())


async def _remove_guards() -> None:
    async with get_client() as client:
        await remove_guards(client)


def _refuse_and_notify(prefect_server, tmp_path: Path, port: int) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "decision.rego").write_text(POLICY)
    markers = tmp_path / "markers"
    markers.mkdir()
    gov = harness(prefect_server, tmp_path)
    agent = GovernanceAgent(
        id=AGENT, owner="sec@example.com", trust_scope=[POOL], capabilities=["read:warehouse"]
    )

    async def setup() -> tuple[uuid.UUID, uuid.UUID]:
        await CustomWebhookNotificationBlock(
            name="events-test",
            url=f"http://127.0.0.1:{port}/hook",
            json_data={"subject": "{{subject}}", "body": "{{body}}"},
        ).asave(HOOK, overwrite=True)
        await gov.save_engine(ENGINE, kind="embedded", policy_dir=str(policies))
        refused = await gov.governed_pool(
            POOL, agent, flow_name="governed_pipeline", deployment="events-refused", engine=ENGINE
        )
        allowed = await deploy_example("events-allowed", POOL, {"agent": AGENT})
        return refused, allowed

    with gov:
        refused_deployment, allowed_deployment = asyncio.run(setup())
        documents = tmp_path / "blocks"
        documents.mkdir()
        (documents / "notify.yaml").write_text(
            "kind: notification\nname: events-refusals\n"
            f"spec:\n  block: custom-webhook/{HOOK}\n  pools: [{POOL}]\n"
        )
        first, again = (
            cli(prefect_server, "apply", str(documents)),
            cli(prefect_server, "apply", str(documents)),
        )
        assert first.returncode == 0, first.stderr[-2000:]
        assert "created    notification   events-refusals" in first.stdout, first.stdout
        assert "unchanged  notification   events-refusals" in again.stdout, again.stdout

        async def runs() -> tuple[uuid.UUID, uuid.UUID]:
            # A forged refusal of another pool first: the automation is scoped to POOL.
            async with get_client() as client:
                forged = {
                    "id": str(uuid.uuid4()),
                    "occurred": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "event": "prefect-governance.decision.refused",
                    "resource": {"prefect.resource.id": "prefect-governance.decision.forged"},
                    "related": [
                        {
                            "prefect.resource.id": "prefect.work-pool.other",
                            "prefect.resource.role": "work-pool",
                            "prefect.resource.name": "another-pool",
                        }
                    ],
                    "payload": {"flow_run_id": "forged-run"},
                }
                (await client._client.post("/events", json=[forged])).raise_for_status()
                refused = await client.create_flow_run_from_deployment(
                    refused_deployment,
                    parameters={"marker_dir": str(markers), "api_token": PLAIN_SECRET},
                    tags=[TOKEN],
                )
                allowed = await client.create_flow_run_from_deployment(
                    allowed_deployment, parameters={"marker": str(markers / "allowed")}
                )
            return refused.id, allowed.id

        refused_id, allowed_id = asyncio.run(runs())
        gov.start_worker(POOL)
        finals = asyncio.run(wait_final([refused_id, allowed_id], timeout=120))
        assert finals[refused_id].state.name == "Refused", finals[refused_id].state
        assert finals[allowed_id].state.name == "Completed", finals[allowed_id].state
        assert Hook.arrived.wait(90), "the automation did not notify"
        time.sleep(3)  # any other notification (the forged one's) would have come by now
        decided = asyncio.run(
            _wait_events("prefect-governance.decision.refused", f"prefect.flow-run.{refused_id}")
        )
        settled = asyncio.run(
            _wait_events("prefect-governance.run.settled", f"prefect.flow-run.{allowed_id}")
        )
        allowed_events = asyncio.run(
            _events("prefect-governance.decision.allowed", f"prefect.flow-run.{allowed_id}")
        )
        gov.stop_workers()

    assert sorted(p.name for p in markers.iterdir()) == ["allowed"], "the refused run executed"
    assert len(Hook.received) == 1, Hook.received
    notice = json.dumps(Hook.received[0])
    assert str(refused_id) in notice
    assert "api_token ***REDACTED*** may not be used here" in notice
    assert "- deny: ***REDACTED***" in notice  # the message that quoted the tag
    assert PLAIN_SECRET not in notice and TOKEN not in notice

    assert len(decided) == 1, decided
    event = decided[0]
    decision_id = finals[refused_id].labels["governance.decision_id"]
    assert event["resource"]["prefect.resource.id"] == f"prefect-governance.decision.{decision_id}"
    roles = _roles(event)
    assert roles["flow-run"]["prefect.resource.id"] == f"prefect.flow-run.{refused_id}"
    assert roles["deployment"]["prefect.resource.id"] == f"prefect.deployment.{refused_deployment}"
    assert roles["flow"]["prefect.resource.name"] == "governed-pipeline"
    assert roles["agent"]["prefect.resource.name"] == AGENT
    assert roles["agent"]["prefect.resource.id"].startswith("prefect.block-document.")
    assert roles["work-pool"]["prefect.resource.name"] == POOL
    assert roles["policy"]["prefect.resource.name"] == "prefect/governance/decision"
    assert roles["worker"]["prefect.worker-type"] == "governed-process"
    payload = event["payload"]
    assert payload["verdict"] == "refused" and payload["decision_id"] == decision_id
    assert sorted(r["message"] for r in payload["reasons"]) == [
        "***REDACTED***",
        "api_token ***REDACTED*** may not be used here",
    ]
    assert payload["lineage"]["recorded"] is True
    assert PLAIN_SECRET not in json.dumps(event) and TOKEN not in json.dumps(event)

    assert [e["payload"]["verdict"] for e in allowed_events] == ["allowed"]
    assert len(settled) == 1, settled
    assert settled[0]["payload"]["state"] == "COMPLETED"
    assert settled[0]["payload"]["recorded"] is True

    removed, absent = (
        cli(prefect_server, "notification", "remove", "events-refusals"),
        cli(prefect_server, "notification", "remove", "events-refusals"),
    )
    assert (removed.returncode, absent.returncode) == (0, 1), removed.stdout + absent.stdout
    assert f"removed    automation     {NOTIFY}events-refusals" in removed.stdout


def test_a_notification_whose_block_is_missing_is_skipped(prefect_server, tmp_path):
    from prefect_governance.cli.apply import apply_documents, parse_document

    document = parse_document(
        {"kind": "notification", "name": "nowhere", "spec": {"block": "custom-webhook/absent"}},
        tmp_path / "n.yaml",
    )
    (change,) = asyncio.run(apply_documents([document]))
    assert change.action == "skipped"
    assert "notification block 'custom-webhook/absent' does not exist" in (change.reason or "")
