package prefect.governance.rules_test.approval

import data.prefect.governance.testing

alice := {
	"id": "a11ce000000000000000000000000001", "approver": "alice", "binding": "deployment",
	"issued_at": "2026-11-24T11:30:00Z", "expires_at": "2026-11-24T12:30:00Z",
}

bob := object.union(alice, {"id": "b0b00000000000000000000000000001", "approver": "bob", "binding": "flow_run"})

carol := object.union(alice, {"id": "ca201000000000000000000000000001", "approver": "carol"})

reject(approval) := object.union(approval, {"decision": "reject"})

# Waiting for one of these approvers: the approval request.
waits(approvers, found) := [{
	"approvers": approvers, "timeout_seconds": 3600,
	"reason": sprintf("run of agent \"etl-agent\" needs a signed approval by one of %v (%s)", [approvers, found]),
}]

cases := {
	"no approval needed": {"changes": {}},
	"an approval is ignored when none is needed": {"changes": {"/envelope/approvals": [bob]}},
	"a rejection is ignored when none is needed": {"changes": {"/envelope/rejections": [reject(bob)]}},
	"approved": {"changes": {
		"/agent/constraints/approval": {"approvers": ["alice", "bob"]},
		"/envelope/approvals": [bob],
	}},
	"approved among others": {"changes": {
		"/agent/constraints/approval": {"approvers": ["alice"]},
		"/envelope/approvals": [carol, alice],
	}},
	"not approved: it waits": {
		"changes": {"/agent/constraints/approval": {"approvers": ["alice"]}},
		"approval": waits(["alice"], "no verified approval"),
	},
	"no timeout set (null): it waits for the default hour": {
		"changes": {"/agent/constraints/approval": {"approvers": ["alice"], "timeout_seconds": null}},
		"approval": waits(["alice"], "no verified approval"),
	},
	"approved by someone else: it still waits": {
		"changes": {
			"/agent/constraints/approval": {"approvers": ["alice"]},
			"/envelope/approvals": [carol, bob],
		},
		"approval": waits(["alice"], "verified approvals only by [\"bob\", \"carol\"], who are not approvers"),
	},
	"rejected by someone else: it still waits": {
		"changes": {
			"/agent/constraints/approval": {"approvers": ["alice"]},
			"/envelope/rejections": [reject(carol)],
		},
		"approval": waits(["alice"], "no verified approval"),
	},
	"a label approves nothing": {
		"changes": {
			"/agent/constraints/approval": {"approvers": ["alice"]},
			"/envelope/flow_run/labels": {"governance.approved_by": "alice"},
		},
		"approval": waits(["alice"], "no verified approval"),
	},
	"a parameter approves nothing": {
		"changes": {
			"/agent/constraints/approval": {"approvers": ["alice"]},
			"/envelope/parameters/approved_by": "alice",
		},
		"approval": waits(["alice"], "no verified approval"),
	},
	"waiting within the timeout": {
		"changes": {
			"/agent/constraints/approval": {"approvers": ["alice"], "timeout_seconds": 600},
			"/envelope/approval_requested_at": "2026-11-24T11:50:00.5Z",
		},
		"approval": [{
			"approvers": ["alice"], "timeout_seconds": 600,
			"reason": "run of agent \"etl-agent\" needs a signed approval by one of [\"alice\"] (no verified approval)",
		}],
	},
	"timed out": {
		"changes": {
			"/agent/constraints/approval": {"approvers": ["alice"], "timeout_seconds": 600},
			"/envelope/approval_requested_at": "2026-11-24T11:50:00Z",
		},
		"deny": ["run of agent \"etl-agent\": approval timed out (awaiting since 2026-11-24T11:50:00Z, 600 s allowed; no verified approval)"],
	},
	"timed out on the default hour": {
		"changes": {
			"/agent/constraints/approval": {"approvers": ["alice"]},
			"/envelope/approval_requested_at": "2026-11-24T11:00:00Z",
		},
		"deny": ["run of agent \"etl-agent\": approval timed out (awaiting since 2026-11-24T11:00:00Z, 3600 s allowed; no verified approval)"],
	},
	"approved after waiting past the timeout: still approved": {
		"changes": {
			"/agent/constraints/approval": {"approvers": ["alice"], "timeout_seconds": 60},
			"/envelope/approval_requested_at": "2026-11-24T11:00:00Z",
			"/envelope/approvals": [alice],
		},
	},
	"rejected": {
		"changes": {
			"/agent/constraints/approval": {"approvers": ["alice", "bob"]},
			"/envelope/rejections": [reject(bob)],
		},
		"deny": ["run of agent \"etl-agent\" was rejected by [\"bob\"]"],
	},
	"a rejection outweighs an approval": {
		"changes": {
			"/agent/constraints/approval": {"approvers": ["alice", "bob"]},
			"/envelope/approvals": [alice],
			"/envelope/rejections": [reject(bob)],
		},
		"deny": ["run of agent \"etl-agent\" was rejected by [\"bob\"]"],
	},
	"no approvers: nobody can approve": {
		"changes": {
			"/agent/constraints/approval": {"approvers": []},
			"/envelope/approvals": [alice],
		},
		"deny": ["run of agent \"etl-agent\" needs a signed approval, but it names no approvers"],
	},
}

failures := testing.failures("approval", cases)

test_cases if count(failures) == 0
