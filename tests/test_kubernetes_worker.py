"""The governed-kubernetes worker's template and hand-over, without a cluster (fast).

The end-to-end tests (tests/test_kubernetes_e2e.py) run it against a real one.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import uuid
from typing import Any

import pytest

pytest.importorskip("prefect_kubernetes")

from prefect_governance.core.decision import worker_refusal
from prefect_governance.core.handoff import (
    DECISION_ENV,
    ENVELOPE_ENV,
    GATE_COMMAND,
    GATE_MODULE,
    REPORT_SECRET_ENV,
)
from prefect_governance.core.models import Decision
from prefect_governance.core.settings import WORKER_SECRETS
from prefect_governance.worker.governor import Admission, Assessment
from prefect_governance.worker.kubernetes import (
    FLOW_RUN_LABEL,
    GovernedKubernetesJobConfiguration,
    GovernedKubernetesWorker,
)


def _container(template_or_manifest: dict[str, Any]) -> dict[str, Any]:
    manifest = template_or_manifest.get("job_configuration", {}).get(
        "job_manifest", template_or_manifest
    )
    return manifest["spec"]["template"]["spec"]["containers"][0]


def test_the_template_fixes_the_containers_command_to_the_gate():
    template = GovernedKubernetesWorker.get_default_base_job_template()
    container = _container(template)
    assert shlex.join(container["command"]) == GATE_COMMAND
    assert container["args"] == []  # Prefect fills in `args` only where there are none
    assert "command" not in template["variables"]["properties"]
    assert template["job_configuration"]["command"] == GATE_COMMAND
    # The governed variables are the pool's too.
    assert {"agent", "capabilities", "lineage_store"} <= set(template["variables"]["properties"])


def _configuration(env: dict[str, Any]) -> GovernedKubernetesJobConfiguration:
    template = GovernedKubernetesWorker.get_default_base_job_template()
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    pod = {k: v for k, v in pod.items() if k in ("parallelism", "completions", "restartPolicy")}
    container = {
        **_container(template),
        "image": "flows:1",
        "env": [{"name": k, **v} for k, v in env.items()],
    }
    container.pop("resources")
    manifest = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"namespace": "default", "labels": {}, "annotations": {}},
        "spec": {"template": {"spec": {**pod, "containers": [container]}}},
    }
    return GovernedKubernetesJobConfiguration(
        job_manifest=manifest, labels={FLOW_RUN_LABEL: str(uuid.uuid4())}
    )


def _admission(runs: bool = True) -> Admission:
    if not runs:
        decision = worker_refusal("no", policy_path="p", mode="enforce", fail_mode="closed")
        return Admission(Assessment(decision))
    decision = Decision(
        id=str(uuid.uuid4()), verdict="allowed", allow=True, engine="embedded", policy_path="p"
    )
    return Admission(
        Assessment(decision),
        grant=json.dumps({"signed": "grant"}),
        trusted_key="worker-key=PUBLIC",
        report_secret="report-secret",
    )


@pytest.fixture
def worker():
    return GovernedKubernetesWorker(work_pool_name="unit")


def test_an_allowed_job_starts_the_gate_with_its_grant_and_none_of_the_workers_secrets(worker):
    secrets = {name: {"value": "the worker's"} for name in WORKER_SECRETS}
    forged = {ENVELOPE_ENV: {"value": "a deployment's own grant"}}
    configuration = _configuration(
        {"PREFECT_API_URL": {"value": "http://127.0.0.1:4200/api"}, **secrets, **forged}
    )
    admission = _admission()
    worker._hand_over(configuration, admission, worker._logger)
    container = _container(configuration.job_manifest)
    assert container["command"] == [
        "python",
        "-I",
        "-m",
        GATE_MODULE,
        "--trusted-key",
        "worker-key=PUBLIC",
    ]
    assert container["args"] == []
    env = {entry["name"]: entry.get("value") for entry in container["env"]}
    assert env[ENVELOPE_ENV] == admission.grant
    assert env[DECISION_ENV] == admission.decision.id
    assert env[REPORT_SECRET_ENV] == "report-secret"
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    assert set(env).isdisjoint(WORKER_SECRETS)
    assert [entry["name"] for entry in container["env"]].count(ENVELOPE_ENV) == 1
    # The worker watches the run it handed over until its outcome is recorded.
    assert configuration.labels[FLOW_RUN_LABEL] in worker._handed_over


def test_a_template_without_the_gate_is_not_given_one(worker):
    configuration = _configuration({})
    container = _container(configuration.job_manifest)
    container["command"] = ["prefect", "flow-run", "execute"]
    worker._hand_over(configuration, _admission(), worker._logger)
    assert container["command"] == ["prefect", "flow-run", "execute"]  # warned, not rewritten


def test_the_worker_package_imports_without_prefect_kubernetes():
    code = (
        "import sys\n"
        "class Uninstalled:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'prefect_kubernetes':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Uninstalled())\n"
        "import prefect_governance.worker as w\n"
        "assert 'GovernedKubernetesWorker' not in w.__all__\n"
        "assert w.GovernedProcessWorker.type == 'governed-process'\n"
        "assert not [m for m in sys.modules if m.startswith('prefect_kubernetes')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_kubernetes_env_list_is_seen_by_name_and_valuefrom_counts_as_set():
    from prefect_governance.worker.base import UNSEEN_VALUE, job_env
    from prefect_governance.worker.launch import unsafe_env

    listed = [
        {"name": "PYTHONPATH", "value": "/elsewhere"},
        {"name": "LD_PRELOAD", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
        {"name": "ROWS", "value": "10"},
    ]
    seen = job_env(listed)
    assert seen == {"PYTHONPATH": "/elsewhere", "LD_PRELOAD": UNSEEN_VALUE, "ROWS": "10"}
    assert unsafe_env(seen, {}, []) == ["LD_PRELOAD", "PYTHONPATH"]
    assert job_env({"A": 1, "B": None}) == {"A": "1", "B": None}
    assert job_env(None) == {}
