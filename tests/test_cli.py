"""The command lines a user types: Prefect's own (pool and worker type) and ours."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate

from prefect_governance.cli.apply import DocumentError, apply_documents, load_documents
from prefect_governance.cli.automations import GUARDS, REFUSED_STAYS_REFUSED
from prefect_governance.cli.automations import remove_guards as guards_removed
from prefect_governance.cli.local import prefect_env
from prefect_governance.core.attestation import verify_agent
from prefect_governance.core.decision import worker_refusal
from prefect_governance.core.signing import SigningKey
from prefect_governance.lineage.events import decision_event
from prefect_governance.lineage.store import LineageStore
from prefect_governance.testing import create_pool, deploy_example
from prefect_governance.worker.blocks import GovernanceAgent
from tests.agents import TEST_AGENT_KEY
from tests.conftest import ROOT, missing

CLI = [sys.executable, "-m", "prefect_governance.cli"]


# How the tests' pool owner applies agents: apply --signing-key FILE, or the environment.
OWNER_ENV = {
    "PREFECT_GOVERNANCE_AGENT_SIGNING_KEY": TEST_AGENT_KEY.seed_b64,
    "PREFECT_GOVERNANCE_AGENT_SIGNING_KEY_ID": TEST_AGENT_KEY.key_id,
}


def owner_key_file(tmp_path: Path) -> list[str]:
    path = tmp_path / "owner.key"
    path.write_text(TEST_AGENT_KEY.seed_b64 + "\n")
    return ["--signing-key", str(path), "--key-id", TEST_AGENT_KEY.key_id]


def run(args, server, **env):
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=120,
        env=prefect_env(server.home, server.api_url, **env),
    )


def test_prefect_creates_a_pool_of_our_type_from_the_entry_point(prefect_server):
    created = run(
        [
            sys.executable,
            "-m",
            "prefect",
            "work-pool",
            "create",
            "cli-pool",
            "--type",
            "governed-process",
        ],
        prefect_server,
    )
    assert created.returncode == 0, created.stdout + created.stderr

    async def read():
        async with get_client() as client:
            return await client.read_work_pool("cli-pool")

    pool = asyncio.run(read())
    assert pool.type == "governed-process"
    variables = pool.base_job_template["variables"]["properties"]
    assert {
        "agent",
        "capabilities",
        "policy_path",
        "mode",
        "fail_mode",
        "engine",
        "lineage_store",
    } <= set(variables)
    assert pool.base_job_template["job_configuration"]["agent"] == "{{ agent }}"


def test_apply_is_idempotent_and_reports_changes(prefect_server, tmp_path, monkeypatch):
    try:
        _apply_twice_and_edit(prefect_server, tmp_path, monkeypatch)
    finally:
        asyncio.run(remove_guards())  # other tests' runs are not to meet the guard


def _apply_twice_and_edit(prefect_server, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_GOVERNANCE_LINEAGE_URL", f"sqlite:///{tmp_path / 'l.db'}")
    first = run(
        [*CLI, "apply", str(ROOT / "blocks"), *owner_key_file(tmp_path)],
        prefect_server,
        PREFECT_GOVERNANCE_LINEAGE_URL=f"sqlite:///{tmp_path / 'l.db'}",
    )
    assert first.returncode == 0, first.stderr
    second = run(
        [*CLI, "apply", str(ROOT / "blocks"), *owner_key_file(tmp_path)],
        prefect_server,
        PREFECT_GOVERNANCE_LINEAGE_URL=f"sqlite:///{tmp_path / 'l.db'}",
    )
    assert second.returncode == 0, second.stderr
    documents = len(load_documents(ROOT / "blocks"))
    guards = len(GUARDS)  # the server-side guards (automations) are applied too
    assert [line.split()[0] for line in second.stdout.splitlines()] == ["unchanged"] * (
        documents + guards
    ), second.stdout
    assert "etl-agent" in first.stdout
    assert re.search(
        rf"(created|updated|unchanged) +automation +{REFUSED_STAYS_REFUSED}", first.stdout
    )

    edited = tmp_path / "etl.yaml"
    text = (ROOT / "blocks" / "agents" / "etl-agent.yaml").read_text()
    edited.write_text(text.replace("version: 1", "version: 2"))
    third = run([*CLI, "apply", str(edited)], prefect_server, **OWNER_ENV)
    assert third.stdout.split()[0] == "updated"
    agent = asyncio.run(GovernanceAgent.aload("etl-agent"))
    assert agent.version == 2
    # what was saved is signed, for this block name, with the owner's key, as it reads now
    verify_agent("etl-agent", agent, {TEST_AGENT_KEY.key_id: TEST_AGENT_KEY.public_b64})
    assert agent.attestation["kid"] == TEST_AGENT_KEY.key_id
    # another key signs it otherwise: the block is updated, not left as it was
    other = SigningKey.generate("other-owner")
    fourth = run(
        [*CLI, "apply", str(edited)],
        prefect_server,
        PREFECT_GOVERNANCE_AGENT_SIGNING_KEY=other.seed_b64,
        PREFECT_GOVERNANCE_AGENT_SIGNING_KEY_ID=other.key_id,
    )
    assert fourth.stdout.split()[0] == "updated", fourth.stdout + fourth.stderr
    assert asyncio.run(GovernanceAgent.aload("etl-agent")).attestation["kid"] == "other-owner"


def test_apply_without_a_key_applies_the_rest_but_no_agent(prefect_server, tmp_path):
    path = tmp_path / "mixed.yaml"
    path.write_text(
        "kind: agent\nname: keyless-agent\nspec: {id: keyless-agent, owner: o, trust_scope: [p]}\n"
        "---\nkind: lineage-store\nname: keyless-lineage\nspec: {url: 'sqlite:///x.db'}\n"
    )
    env = {**prefect_env(prefect_server.home, prefect_server.api_url)}
    env.pop("PREFECT_GOVERNANCE_AGENT_SIGNING_KEY", None)
    result = subprocess.run(
        [*CLI, "apply", str(path)], capture_output=True, text=True, timeout=120, env=env
    )
    try:
        assert result.returncode == 1, result.stdout + result.stderr
        assert re.search(r"skipped +agent +keyless-agent", result.stdout)
        assert re.search(r"created +lineage-store +keyless-lineage", result.stdout)
        assert "error: agent keyless-agent: not applied" in result.stderr
        assert "--signing-key" in result.stderr and "keygen" in result.stderr
        with pytest.raises(ValueError):
            asyncio.run(GovernanceAgent.aload("keyless-agent"))
    finally:
        asyncio.run(remove_guards())


def test_an_agent_document_cannot_carry_its_own_attestation(tmp_path):
    path = tmp_path / "forged.yaml"
    path.write_text(
        "kind: agent\nname: a\nspec: {id: a, owner: o, trust_scope: [p], "
        "attestation: {kid: pool-owner, alg: Ed25519, signature: x}}\n"
    )
    with pytest.raises(DocumentError, match=r"spec\.attestation: is written by apply"):
        load_documents(path)


def test_keygen_writes_a_private_seed_and_prints_the_pin(tmp_path):
    path = tmp_path / "owner.key"
    made = subprocess.run(
        [*CLI, "keygen", str(path), "--key-id", "team-a"], capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    key = SigningKey.from_seed("team-a", path.read_text())
    assert made.stdout.strip() == key.trusted_key  # KID=PUBLIC
    assert json.dumps({"team-a": key.public_b64}) in made.stderr  # the worker's setting
    again = subprocess.run([*CLI, "keygen", str(path)], capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr
    assert SigningKey.from_seed("team-a", path.read_text()).public_b64 == key.public_b64


async def remove_guards() -> None:
    async with get_client() as client:
        await guards_removed(client)


@pytest.mark.parametrize(
    ("document", "field", "reason"),
    [
        (
            "kind: agent\nname: a\nspec: {id: a, owner: o, trust_scope: x}\n",
            "spec.trust_scope",
            "valid list",
        ),
        ("kind: robot\nname: a\nspec: {}\n", "kind", "must be one of"),
        ("kind: agent\nname: Bad_Name\nspec: {}\n", "name", "lowercase"),
        ("kind: agent\nname: a\n", "spec", "mapping"),
        (
            "kind: agent\nname: a\nspec: {id: 'has space', owner: o, trust_scope: []}\n",
            "spec.id",
            "pattern",
        ),
        (
            "kind: lineage-store\nname: a\nspec: {url: '${NOT_SET_ANYWHERE_42}'}\n",
            "spec.url",
            "NOT_SET_ANYWHERE_42",
        ),
        ("kind: agent\nname: a\nspec: [\n", "(yaml)", ""),
    ],
)
def test_a_malformed_document_is_rejected_with_file_field_and_reason(
    tmp_path, document, field, reason
):
    path = tmp_path / "doc.yaml"
    path.write_text(document)
    with pytest.raises(DocumentError) as caught:
        load_documents(path)
    assert (caught.value.path, caught.value.field) == (path, field)
    assert reason in caught.value.reason


def test_apply_command_exits_2_with_the_file_and_field(prefect_server, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("kind: agent\nname: a\nspec: {id: a, owner: o, trust_scope: 3}\n")
    result = run([*CLI, "apply", str(path)], prefect_server)
    assert result.returncode == 2
    assert f"{path}: spec.trust_scope:" in result.stderr


def test_decide_prints_the_decision_and_the_input_without_running(prefect_server, tmp_path):
    lineage = f"sqlite:///{tmp_path / 'decide.db'}"

    async def setup():
        await apply_documents(load_documents(ROOT / "blocks" / "agents"), agent_key=TEST_AGENT_KEY)
        # An agent any API client saved itself, unsigned.
        await GovernanceAgent(
            id="self-made", owner="o", trust_scope=["governed"], deployments=["*"]
        ).asave("self-made", overwrite=True)
        await create_pool("governed")
        await deploy_example(
            "nightly-load", "governed", {"agent": "etl-agent", "capabilities": ["write:warehouse"]}
        )
        await deploy_example("decide-unsigned", "governed", {"agent": "self-made"})
        await deploy_example("decide-unbound", "governed", {"agent": "etl-agent"})

    asyncio.run(setup())
    allowed = run(
        [*CLI, "decide", "load-warehouse/nightly-load", "-p", "rows=10"],
        prefect_server,
        PREFECT_GOVERNANCE_LINEAGE_URL=lineage,
    )
    assert allowed.returncode == 0, allowed.stderr
    out = json.loads(allowed.stdout)
    assert out["decision"]["verdict"] == "allowed"
    assert out["input"]["envelope"]["parameters"] == {"rows": 10}
    assert out["input"]["envelope"]["capabilities"] == ["write:warehouse"]
    assert out["input"]["agent"]["id"] == "etl-agent"
    # what the run would start: the pool's process, through the gate
    assert out["infrastructure"]["kind"] == "process"
    assert out["infrastructure"]["command"].endswith(" -m prefect_governance.gate")
    assert out["input"]["envelope"]["infrastructure"] == out["infrastructure"]

    refused = run(
        [
            *CLI,
            "decide",
            "load-warehouse/nightly-load",
            "-p",
            "rows=5000",
            "-p",
            "db_password=hunter2",
        ],
        prefect_server,
        PREFECT_GOVERNANCE_LINEAGE_URL=lineage,
    )
    assert refused.returncode == 1
    out = json.loads(refused.stdout)
    assert out["decision"]["deny"] == ['parameter "rows" is 5000, above the maximum 1000']
    assert "hunter2" not in refused.stdout
    assert out["input"]["envelope"]["redacted"] == ["db_password"]
    # decide verifies the agent as the worker does: unsigned, or not bound to the deployment
    for deployment, reason in (
        ("decide-unsigned", "agent block 'self-made' is not signed by the pool owner"),
        ("decide-unbound", "deployment load-warehouse/decide-unbound may not act as agent"),
    ):
        refused = run(
            [*CLI, "decide", f"load-warehouse/{deployment}", "-p", "rows=10"],
            prefect_server,
            PREFECT_GOVERNANCE_LINEAGE_URL=lineage,
        )
        assert refused.returncode == 1, refused.stderr
        assert reason in json.loads(refused.stdout)["decision"]["deny"][0]
    # no key pinned: even the pool owner's agent is refused, saying what to set
    unpinned = run(
        [*CLI, "decide", "load-warehouse/nightly-load", "-p", "rows=10"],
        prefect_server,
        PREFECT_GOVERNANCE_LINEAGE_URL=lineage,
        PREFECT_GOVERNANCE_AGENT_KEYS="{}",
    )
    assert unpinned.returncode == 1, unpinned.stderr
    assert "set PREFECT_GOVERNANCE_AGENT_KEYS" in json.loads(unpinned.stdout)["decision"]["deny"][0]
    # decide records nothing: it only asks
    assert LineageStore(lineage).recent(10) == []


INFRA_AGENT = """
kind: agent
name: infra-agent
spec:
  id: infra-agent
  version: 1
  owner: platform@example.com
  trust_scope: [decide-docker]
  capabilities: []
  deployments: [load-warehouse/decide-docker]
  memory_schema: {type: object}
  constraints:
    infrastructure:
      registries: [docker.io]
      host_network: true
"""


def test_decide_shows_what_a_docker_run_would_start(prefect_server, tmp_path):
    """A stock Docker pool's job, resolved from its template and the deployment's job
    variables as the worker would, is what the policy is shown and what decide prints."""
    try:
        from prefect_docker.worker import DockerWorker
    except ImportError:
        missing("prefect-docker (pip install 'prefect-governance[docker]')")
    lineage = f"sqlite:///{tmp_path / 'decide.db'}"
    (tmp_path / "agents").mkdir()
    (tmp_path / "agents" / "infra-agent.yaml").write_text(INFRA_AGENT)

    async def setup(job_variables):
        await apply_documents(load_documents(tmp_path / "agents"), agent_key=TEST_AGENT_KEY)
        async with get_client() as client:
            await client.create_work_pool(
                WorkPoolCreate(
                    name="decide-docker",
                    type="docker",
                    base_job_template=DockerWorker.get_default_base_job_template(),
                ),
                overwrite=True,
            )
        await deploy_example("decide-docker", "decide-docker", job_variables)

    def decide():
        result = run(
            [*CLI, "decide", "load-warehouse/decide-docker", "-p", "rows=10"],
            prefect_server,
            PREFECT_GOVERNANCE_LINEAGE_URL=lineage,
        )
        return result.returncode, json.loads(result.stdout)

    asyncio.run(
        setup(
            {
                "agent": "infra-agent",
                "image": "python:3.11",
                "network_mode": "host",
                "env": {"WAREHOUSE_TOKEN": "hunter2-token"},
            }
        )
    )
    code, out = decide()
    assert code == 0, out["decision"]
    infrastructure = out["infrastructure"]
    assert infrastructure["kind"] == "docker" and infrastructure["host_network"]
    (container,) = infrastructure["containers"]
    assert container["image"]["registry"] == "docker.io" and not container["privileged"]
    assert "WAREHOUSE_TOKEN" in infrastructure["env_names"]
    assert "hunter2-token" not in json.dumps(out), "variable names only, never values"
    assert out["input"]["envelope"]["infrastructure"] == infrastructure

    asyncio.run(
        setup(
            {
                "agent": "infra-agent",
                "image": "quay.io/x/y:1",
                "network_mode": "host",
                "container_create_kwargs": {"privileged": True},
            }
        )
    )
    code, out = decide()
    assert code == 1
    assert out["infrastructure"]["containers"][0]["privileged"]
    assert sorted(out["decision"]["deny"]) == [
        'container "decide-dry-run" is privileged: agent "infra-agent" may not run privileged '
        "containers",
        'image "quay.io/x/y:1" of container "decide-dry-run" is not from a registry agent '
        '"infra-agent" may use ["docker.io"]',
    ]


def test_lineage_lists_recent_events(tmp_path):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    store = LineageStore(url)
    decision = worker_refusal("no agent", policy_path="p", mode="enforce", fail_mode="closed")
    store.append(decision_event(decision, agent_id="a-1", flow_run_id="fr-1", envelope=None))
    result = subprocess.run(
        [*CLI, "lineage", "list", "--url", url, "--json"],
        capture_output=True,
        text=True,
        env=os.environ,
    )
    assert result.returncode == 0, result.stderr
    event = json.loads(result.stdout.splitlines()[0])
    assert (event["agent_id"], event["verdict"], event["reasons"]) == (
        "a-1",
        "refused",
        ["no agent"],
    )


def test_lineage_on_postgresql(postgres):
    store = LineageStore(postgres.url)
    decision = worker_refusal("no agent", policy_path="p", mode="enforce", fail_mode="closed")
    store.append(
        decision_event(decision, agent_id="pg-agent", flow_run_id="fr-pg", envelope={"id": "e"})
    )
    [event] = store.recent(5, agent_id="pg-agent")
    assert (event.verdict, event.envelope_id, event.reasons) == ("refused", "e", ["no agent"])
    assert store.decision_counts("pg-agent") == (1, 1)
    store.dispose()


@pytest.mark.e2e  # the demo starts a Prefect server and workers of its own
def test_the_demo_runs_end_to_end(tmp_path):
    """The README's main command: one allowed, one refused, one warned, one audited run."""
    result = subprocess.run(
        [*CLI, "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PREFECT_HOME": str(tmp_path / "user-home")},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = result.stdout
    for line in ("nightly-load", "purge-warehouse", "probation-report", "shadow-backfill"):
        assert line in table
    assert "CANCELLED/Refused    no" in table
    assert "[prefect.governance.rules.capabilities.deny]" in table  # the rule that refused
    assert "[prefect.governance.rules.trust.deny]" in table  # part 2's refusal, too
    assert "fell across its last three runs" in table  # part 2: the learner is stopped
    assert "part 3: pipeline-agent" in table  # governance inside one run:
    assert re.search(r"task drop_tables +refused +no .*drop_tables", table)  # refused, never ran
    assert re.search(r"write:warehouse in summarize +blocked +no", table)  # blocked capability
    assert re.search(r"task report +allowed +yes", table)  # the rest of the flow ran
    assert "memory     version 1" in table  # agent show
    assert "chains intact" in table  # lineage verify
    home = re.search(r"local Prefect server \(SQLite\) in (\S+)", table).group(1)
    assert not Path(home).exists(), "the demo's temporary home is removed"
    assert _processes_with_home(home) == [], "the demo left processes behind"


def _processes_with_home(home: str) -> list[int]:
    """PIDs whose environment has PREFECT_HOME=home."""
    needle = f"PREFECT_HOME={home}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def test_lineage_upgrade_migrates_once_then_reports_up_to_date(tmp_path):
    url = f"sqlite:///{tmp_path / 'lineage.db'}"
    first = subprocess.run(
        [*CLI, "lineage", "upgrade", "--url", url], capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr
    assert "lineage schema: none -> 0004" in first.stdout
    again = subprocess.run(
        [*CLI, "lineage", "upgrade", "--url", url], capture_output=True, text=True
    )
    assert "lineage schema: 0004, up to date" in again.stdout


def _inside_run_store(tmp_path):
    """An allowed run's chain with what happened inside it: task decisions (one refused),
    capability uses (one blocked) and a problem with the run's report."""
    from prefect_governance.core.models import Decision
    from prefect_governance.lineage.events import (
        capability_use_event,
        report_problem_event,
        task_decision_event,
    )

    url = f"sqlite:///{tmp_path / 'inside.db'}"
    store = LineageStore(url)
    flow_run, load_run, shell_run = (
        "0b6f1a2e-0000-4000-8000-000000000001",
        "0b6f1a2e-0000-4000-8000-000000000002",
        "0b6f1a2e-0000-4000-8000-000000000003",
    )
    allowed = Decision(
        id="dec-flow", verdict="allowed", allow=True, engine="embedded", policy_path="p"
    )
    common = {"agent_id": "a-in", "flow_run_id": flow_run, "parent_decision_id": "dec-flow"}

    def task(seq, name, run, verdict, deny=(), purpose="admit", attempt=1):
        decision = Decision(
            id=f"tdec-{seq}",
            verdict=verdict,
            allow=verdict != "refused",
            deny=list(deny),
            engine="embedded",
            policy_path="prefect/governance/task",
        )
        ref = {"name": name, "run_id": run, "key": name, "attempt": attempt}
        reported = {
            "seq": seq,
            "time": "2025-06-01T12:00:01+00:00",
            "purpose": purpose,
            "task": ref,
            "envelope": {"id": f"tenv-{seq}", "task": ref},
            "context": {"time": "2025-06-01T12:00:01+00:00", "mode": "enforce"},
            "decision": decision.model_dump(mode="json"),
        }
        return task_decision_event(reported, check={"verified": True}, **common)

    store.append(
        decision_event(allowed, agent_id="a-in", flow_run_id=flow_run, envelope=None),
        task(1, "load_rows", load_run, "allowed"),
        capability_use_event(
            {
                "seq": 2,
                "capability": "warehouse:write",
                "granted": True,
                "use": "insert 10 rows",
                "task": {"name": "load_rows", "run_id": load_run, "key": "l", "attempt": 1},
            },
            **common,
        ),
        task(3, "run_shell", shell_run, "refused", deny=["capability shell is not granted"]),
        task(4, "run_shell", shell_run, "refused", deny=["still frozen"], purpose="retry"),
        capability_use_event(
            {"seq": 5, "capability": "shell", "granted": False, "reason": "not declared"},
            **common,
        ),
        report_problem_event(["events missing from the run's report: seq 6"], **common),
    )
    store.dispose()
    return url, flow_run, shell_run


def test_lineage_show_and_list_print_governance_inside_a_run(tmp_path):
    url, _, _ = _inside_run_store(tmp_path)
    shown = subprocess.run(
        [*CLI, "lineage", "show", "--agent", "a-in", "--url", url],
        capture_output=True,
        text=True,
        env=os.environ,
    )
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split() == [
        "seq",
        "time",
        "kind",
        "flow",
        "run",
        "what",
        "hash",
        "prev",
        "details",
    ]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == {"1", "2", "3", "4", "5", "6", "7"}
    assert rows["2"].split()[3:5] == ["task_decision", "0b6f1a2e"]
    assert " allowed " in rows["2"]
    assert rows["2"].endswith("task load_rows (attempt 1)")
    assert " used " in rows["3"]
    assert rows["3"].endswith("warehouse:write by task load_rows (insert 10 rows)")
    assert " refused " in rows["4"]
    assert rows["4"].endswith("task run_shell (attempt 1): capability shell is not granted")
    assert rows["5"].endswith("task run_shell (attempt 1, retry re-ask): still frozen")
    assert " blocked " in rows["6"]
    assert rows["6"].endswith("shell by the flow body: not declared")
    assert "report_problem" in rows["7"] and " 1 report problem " in rows["7"]
    assert rows["7"].endswith("events missing from the run's report: seq 6")

    listed = subprocess.run(
        [*CLI, "lineage", "list", "--url", url, "--agent", "a-in"],
        capture_output=True,
        text=True,
        env=os.environ,
    )
    assert listed.returncode == 0, listed.stderr
    body = listed.stdout.splitlines()[2:]
    assert [line.split()[1] for line in body] == [
        "decision",
        "task_decision",
        "capability_use",
        "task_decision",
        "task_decision",
        "capability_use",
        "report_problem",
    ]
    assert [line.split()[4] for line in body[:6]] == [
        "allowed",
        "allowed",
        "used",
        "refused",
        "refused",
        "blocked",
    ]
    assert body[3].endswith("task run_shell (attempt 1): capability shell is not granted")
    assert body[5].endswith("shell by the flow body: not declared")
    assert body[6].endswith("events missing from the run's report: seq 6")


def test_lineage_export_has_task_runs_under_their_flow_run(tmp_path):
    url, flow_run, shell_run = _inside_run_store(tmp_path)
    out = tmp_path / "events.jsonl"
    result = subprocess.run(
        [*CLI, "lineage", "export", "--url", url, "--agent", "a-in", "-o", str(out)],
        capture_output=True,
        text=True,
        env=os.environ,
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in out.read_text().splitlines()]
    shell = [e for e in events if e["run"]["runId"] == shell_run]
    assert [e["eventType"] for e in shell] == ["START", "ABORT"]
    assert {e["run"]["facets"]["parent"]["run"]["runId"] for e in shell} == {flow_run}
    assert shell[1]["run"]["facets"]["governance"]["deny"] == ["still frozen"]
    assert shell[1]["job"]["name"] == "unknown.run_shell"
    flow = [e for e in events if e["run"]["runId"] == flow_run]
    assert [e["eventType"] for e in flow] == ["START"]  # no outcome yet: uses wait for it


def test_lineage_export_and_verify_leave_out_what_no_pinned_key_vouches_for(tmp_path):
    """A decision written into the database by someone without the lineage key is named by
    `lineage verify` and not exported as a governed run."""
    url, flow_run, _ = _inside_run_store(tmp_path)
    forger = LineageStore(url, signer=None)
    planted = worker_refusal("planted", policy_path="p", mode="enforce", fail_mode="closed")
    forger.append(
        decision_event(planted, agent_id="a-in", flow_run_id="planted-run", envelope=None)
    )
    forger.dispose()
    out = tmp_path / "events.jsonl"
    export = subprocess.run(
        [*CLI, "lineage", "export", "--url", url, "-o", str(out)],
        capture_output=True,
        text=True,
        env=os.environ,
    )
    assert export.returncode == 0, export.stderr
    runs = {json.loads(line)["run"]["runId"] for line in out.read_text().splitlines()}
    assert flow_run in runs and "planted-run" not in runs
    verify = subprocess.run(
        [*CLI, "lineage", "verify", "--url", url], capture_output=True, text=True, env=os.environ
    )
    assert verify.returncode == 1, verify.stdout
    assert "NOT VOUCHED FOR (ignored): records" in verify.stdout
    assert "1 records not vouched for by a pinned key (pinned: test-lineage)" in verify.stdout
