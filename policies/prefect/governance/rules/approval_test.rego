package prefect.governance.rules_test.approval

import data.prefect.governance.testing

cases := {
	"no approval needed": {"changes": {}},
	"approved by label": {"changes": {
		"/agent/constraints/approval": {"approvers": ["alice", "bob"], "label": "governance.approved_by", "parameter": null},
		"/envelope/flow_run/labels": {"governance.approved_by": "bob"},
	}},
	"not approved": {
		"changes": {"/agent/constraints/approval": {"approvers": ["alice"], "label": "governance.approved_by", "parameter": null}},
		"deny": ["run of agent \"etl-agent\" needs approval by one of [\"alice\"] (label \"governance.approved_by\")"],
	},
	"approved by someone else": {
		"changes": {
			"/agent/constraints/approval": {"approvers": ["alice"], "label": "change", "parameter": null},
			"/envelope/flow_run/labels": {"change": "mallory"},
		},
		"deny": ["mallory is not an approver for agent \"etl-agent\" (approvers: [\"alice\"])"],
	},
	"approved by parameter": {"changes": {
		"/agent/constraints/approval": {"approvers": ["alice"], "label": "governance.approved_by", "parameter": "approved_by"},
		"/envelope/parameters/approved_by": "alice",
	}},
	"a parameter approval ignores the label": {
		"changes": {
			"/agent/constraints/approval": {"approvers": ["alice"], "label": "governance.approved_by", "parameter": "approved_by"},
			"/envelope/flow_run/labels": {"governance.approved_by": "alice"},
		},
		"deny": ["run of agent \"etl-agent\" needs approval by one of [\"alice\"] (parameter \"approved_by\")"],
	},
}

failures := testing.failures("approval", cases)

test_cases if count(failures) == 0
