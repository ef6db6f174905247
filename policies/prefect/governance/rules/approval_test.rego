package prefect.governance.rules_test.approval

import data.prefect.governance.testing

alice := {
	"id": "a11ce000000000000000000000000001", "approver": "alice", "binding": "deployment",
	"issued_at": "2026-11-24T11:30:00Z", "expires_at": "2026-11-24T12:30:00Z",
}

bob := object.union(alice, {"id": "b0b00000000000000000000000000001", "approver": "bob", "binding": "flow_run"})

carol := object.union(alice, {"id": "ca201000000000000000000000000001", "approver": "carol"})

cases := {
	"no approval needed": {"changes": {}},
	"an approval is ignored when none is needed": {"changes": {"/envelope/approvals": [bob]}},
	"approved": {"changes": {
		"/agent/constraints/approval": {"approvers": ["alice", "bob"]},
		"/envelope/approvals": [bob],
	}},
	"approved among others": {"changes": {
		"/agent/constraints/approval": {"approvers": ["alice"]},
		"/envelope/approvals": [carol, alice],
	}},
	"not approved": {
		"changes": {"/agent/constraints/approval": {"approvers": ["alice"]}},
		"deny": ["run of agent \"etl-agent\" needs a signed approval by one of [\"alice\"] (no verified approval)"],
	},
	"approved by someone else": {
		"changes": {
			"/agent/constraints/approval": {"approvers": ["alice"]},
			"/envelope/approvals": [carol, bob],
		},
		"deny": ["run of agent \"etl-agent\" needs a signed approval by one of [\"alice\"] (verified approvals only by [\"bob\", \"carol\"], who are not approvers)"],
	},
	"a label approves nothing": {
		"changes": {
			"/agent/constraints/approval": {"approvers": ["alice"]},
			"/envelope/flow_run/labels": {"governance.approved_by": "alice"},
		},
		"deny": ["run of agent \"etl-agent\" needs a signed approval by one of [\"alice\"] (no verified approval)"],
	},
	"a parameter approves nothing": {
		"changes": {
			"/agent/constraints/approval": {"approvers": ["alice"]},
			"/envelope/parameters/approved_by": "alice",
		},
		"deny": ["run of agent \"etl-agent\" needs a signed approval by one of [\"alice\"] (no verified approval)"],
	},
	"no approvers: nobody can approve": {
		"changes": {
			"/agent/constraints/approval": {"approvers": []},
			"/envelope/approvals": [alice],
		},
		"deny": ["run of agent \"etl-agent\" needs a signed approval by one of [] (verified approvals only by [\"alice\"], who are not approvers)"],
	},
}

failures := testing.failures("approval", cases)

test_cases if count(failures) == 0
