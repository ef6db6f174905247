# Exceptions in the decision (decision.rego with lib/exceptions_lib.rego): each case
# changes the base input (the `allowed` example, at 2026-11-24T12:00:00Z) and names the
# deny and warn messages and the waivers the decision must give. `all_cases` sends
# every case through both engines (tests/test_engines.py).
package prefect.governance.exceptions_test

import data.prefect.governance.decision
import data.prefect.governance.testing

capability := "capability \"deploy:prod\" is not granted to agent \"etl-agent\""

capability_rule := "prefect.governance.rules.capabilities.deny"

pool := "work pool \"elsewhere\" is outside the trust scope of agent \"etl-agent\""

pool_rule := "prefect.governance.rules.scope.deny"

asks_deploy := ["read:warehouse", "deploy:prod"]

waiver := {
	"name": "deploy-waiver",
	"rules": [capability_rule],
	"message": null,
	"agents": ["etl-agent"],
	"deployments": [],
	"pools": [],
	"owner": "sec@example.com",
	"reason": "one-off release",
	"ticket": "SEC-1",
	"issued_at": "2026-11-20T00:00:00Z",
	"expires_at": "2026-11-30T00:00:00Z",
}

with_fields(fields) := object.union(waiver, fields)

expired(name, at) := sprintf("exception %q expired at %s: it no longer waives %s (SEC-1)", [name, at, capability_rule])

waived(name, rule, message) := {"exception": name, "rule": rule, "message": message}

cases := {
	"no exception: the deny stands": {
		"changes": {"/envelope/capabilities": asks_deploy},
		"deny": [capability],
	},
	"no exceptions at all: allowed as before": {"changes": {"/exceptions": []}},
	"an active exception waives the deny": {
		"changes": {"/envelope/capabilities": asks_deploy, "/exceptions": [waiver]},
		"waived": [waived("deploy-waiver", capability_rule, capability)],
	},
	"an exception with nothing to waive changes nothing": {"changes": {"/exceptions": [waiver]}},
	"a message pattern that matches waives": {
		"changes": {
			"/envelope/capabilities": asks_deploy,
			"/exceptions": [with_fields({"message": ".*\"deploy:prod\" is not granted.*"})],
		},
		"waived": [waived("deploy-waiver", capability_rule, capability)],
	},
	"a message pattern that does not match waives nothing": {
		"changes": {
			"/envelope/capabilities": asks_deploy,
			"/exceptions": [with_fields({"message": "^capability \"admin\""})],
		},
		"deny": [capability],
	},
	"a message pattern that matches only part of the message waives nothing": {
		"changes": {
			"/envelope/capabilities": asks_deploy,
			"/exceptions": [with_fields({"message": "\"deploy:prod\" is not granted"})],
		},
		"deny": [capability],
	},
	"a message pattern RE2 cannot compile waives nothing (the deny stands)": {
		"changes": {
			"/envelope/capabilities": asks_deploy,
			"/exceptions": [with_fields({"message": ".*\\Z"})],
		},
		"deny": [capability],
	},
	"an exception of another rule waives nothing": {
		"changes": {
			"/envelope/capabilities": asks_deploy,
			"/exceptions": [with_fields({"rules": [pool_rule]})],
		},
		"deny": [capability],
	},
	"only the covered deny is waived": {
		"changes": {
			"/envelope/capabilities": asks_deploy,
			"/envelope/work_pool/name": "elsewhere",
			"/exceptions": [waiver],
		},
		"deny": [pool],
		"waived": [waived("deploy-waiver", capability_rule, capability)],
	},
	"two exceptions waive two denies": {
		"changes": {
			"/envelope/capabilities": asks_deploy,
			"/envelope/work_pool/name": "elsewhere",
			"/exceptions": [waiver, with_fields({"name": "pool-waiver", "rules": [pool_rule], "agents": [], "pools": ["elsewhere"]})],
		},
		"waived": [
			waived("deploy-waiver", capability_rule, capability),
			waived("pool-waiver", pool_rule, pool),
		],
	},
	"expired at context.time: the deny stands and it warns": {
		"changes": {
			"/envelope/capabilities": asks_deploy,
			"/exceptions": [with_fields({"expires_at": "2026-11-24T12:00:00Z"})],
		},
		"deny": [capability],
		"warn": [expired("deploy-waiver", "2026-11-24T12:00:00Z")],
	},
	"active one second longer": {
		"changes": {
			"/envelope/capabilities": asks_deploy,
			"/exceptions": [with_fields({"expires_at": "2026-11-24T12:00:01Z"})],
		},
		"waived": [waived("deploy-waiver", capability_rule, capability)],
	},
	"an expired exception that covers no deny says nothing": {"changes": {"/exceptions": [with_fields({"expires_at": "2026-11-01T00:00:00Z"})]}},
	"an expired one warns, an active one waives": {
		"changes": {
			"/envelope/capabilities": asks_deploy,
			"/exceptions": [waiver, with_fields({"name": "old-waiver", "expires_at": "2026-11-01T00:00:00+01:00"})],
		},
		"warn": [expired("old-waiver", "2026-11-01T00:00:00+01:00")],
		"waived": [waived("deploy-waiver", capability_rule, capability)],
	},
	"an exception for another agent waives nothing": {
		"changes": {
			"/envelope/capabilities": asks_deploy,
			"/exceptions": [with_fields({"agents": ["other-agent"]})],
		},
		"deny": [capability],
	},
	"an exception for another pool waives nothing": {
		"changes": {
			"/envelope/capabilities": asks_deploy,
			"/exceptions": [with_fields({"agents": [], "pools": ["prod"]})],
		},
		"deny": [capability],
	},
	"an expired exception for another agent says nothing": {
		"changes": {
			"/envelope/capabilities": asks_deploy,
			"/exceptions": [with_fields({"agents": ["other-agent"], "expires_at": "2026-11-01T00:00:00Z"})],
		},
		"deny": [capability],
	},
	"an exception for this pool waives": {
		"changes": {
			"/envelope/capabilities": asks_deploy,
			"/exceptions": [with_fields({"agents": [], "pools": ["gov"]})],
		},
		"waived": [waived("deploy-waiver", capability_rule, capability)],
	},
	"a warning is never waived": {
		"changes": {
			"/agent/trust/score": 0.2,
			"/exceptions": [with_fields({"rules": ["prefect.governance.rules.trust.warn"]})],
		},
		"warn": ["trust of agent \"etl-agent\" is low: 0.2 (below 0.5)"],
	},
	"audit mode: a waived deny is no deny either": {
		"changes": {
			"/context/mode": "audit",
			"/envelope/capabilities": asks_deploy,
			"/exceptions": [waiver],
		},
		"waived": [waived("deploy-waiver", capability_rule, capability)],
	},
}

# What a case expects (empty sets where it names none).
expected(case) := {kind: {item | some item in object.get(case, kind, [])} | some kind in ["deny", "warn", "waived"]}

outcome := {"deny": decision.deny, "warn": decision.warn, "waived": decision.waived}

failures := {name |
	some name, case in cases
	got := outcome with input as testing.with_values(case.changes)
	got != expected(case)
}

test_cases if count(failures) == 0

# Every case as a full input, for the engine parity suite.
all_cases[name] := testing.with_values(case.changes) if some name, case in cases

# An allowed decision says so, with the waiver in the result.
test_a_waived_deny_allows if {
	decision.allow with input as testing.with_values(cases["an active exception waives the deny"].changes)
	not decision.allow with input as testing.with_values(cases["no exception: the deny stands"].changes)
	count(decision.reasons) == 0 with input as testing.with_values(cases["an active exception waives the deny"].changes)
}

# The aggregator's own deny (a malformed input) is never waived, even by an exception
# naming it (`apply` refuses to sign one; the policy does not honour it either).
test_the_malformed_input_deny_is_never_waived if {
	malformed := object.union(object.remove(testing.base, ["envelope"]), {"exceptions": [with_fields({
		"rules": ["prefect.governance.decision.deny"],
		"agents": [],
	})]})
	not decision.allow with input as malformed
	decision.deny == {"the input has no envelope object: it is not a governance input"} with input as malformed
	count(decision.waived) == 0 with input as malformed
}

test_every_case_reaches_the_parity_suite if count(all_cases) == count(cases)
