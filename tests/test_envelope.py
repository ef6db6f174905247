"""The envelope names who started a run, so trigger rules have something to judge."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from prefect.client.schemas.objects import CreatedBy as PrefectCreatedBy
from prefect.client.schemas.objects import Flow, FlowRun

from prefect_governance.core.envelope import build_envelope
from prefect_governance.core.models import MemoryAccess, WorkPoolRef


def _envelope(**run_fields):
    flow = Flow(id=uuid.uuid4(), name="etl")
    flow_run = FlowRun(id=uuid.uuid4(), name="run", flow_id=flow.id, **run_fields)
    return build_envelope(
        flow_run=flow_run,
        flow=flow,
        deployment=None,
        work_pool=WorkPoolRef(name="gov", type="governed-process"),
        capabilities=[],
        memory=MemoryAccess(),
        parent_flow_run_id=None,
        issued_at=datetime.now(timezone.utc),
        ttl=timedelta(minutes=5),
        redact_patterns=["password"],
    )


def test_a_run_the_scheduler_made_is_started_by_schedule():
    created_by = _envelope(auto_scheduled=True).flow_run.created_by
    assert (created_by.type, created_by.display_value) == ("SCHEDULE", "schedule")


def test_a_recorded_creator_is_kept():
    user = PrefectCreatedBy(id=uuid.uuid4(), type="USER", display_value="alice")
    created_by = _envelope(created_by=user, auto_scheduled=True).flow_run.created_by
    assert (created_by.type, created_by.display_value) == ("USER", "alice")


def test_no_recorded_creator_is_null():
    assert _envelope().flow_run.created_by is None
