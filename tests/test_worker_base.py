"""What every governed worker type shares (worker/base.py), without a server."""

from __future__ import annotations

import uuid

from prefect.client.schemas.objects import FlowRun, WorkPool

from prefect_governance.worker.process import (
    GovernedProcessJobConfiguration,
    GovernedProcessWorker,
)


class _Unreadable(GovernedProcessWorker):
    type = "governed-process-unreadable-test"

    def _infrastructure(self, configuration):
        raise ValueError("a job manifest of an unknown shape")


def _request(worker_class):
    worker = worker_class(work_pool_name="pool")
    template = worker_class.get_default_base_job_template()
    worker._work_pool = WorkPool(
        id=uuid.uuid4(), name="pool", type=worker_class.type, base_job_template=template
    )
    configuration = GovernedProcessJobConfiguration(command="python -m flow", env={"A": "1"})
    flow_run = FlowRun(id=uuid.uuid4(), name="r", flow_id=uuid.uuid4())
    return worker._request(flow_run, configuration)


def test_the_process_worker_shows_the_policy_what_it_would_start():
    request = _request(GovernedProcessWorker)
    assert request.infrastructure is not None
    assert request.infrastructure.kind == "process"
    assert request.infrastructure.command == "python -m flow"
    assert request.infrastructure.env_names == ["A"]
    assert request.infrastructure_error is None


def test_infrastructure_the_worker_cannot_read_is_carried_as_the_reason_to_refuse():
    request = _request(_Unreadable)
    assert request.infrastructure is None
    assert request.infrastructure_error == "ValueError: a job manifest of an unknown shape"
