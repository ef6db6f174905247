# Helpers of decision.rego: which exceptions waive which deny.
#
# input.exceptions holds the signed exceptions the worker verified and found in scope for
# this run (its agent, deployment and pool), expired ones included: whether one is active
# is decided here, at context.time.
package prefect.governance.lib.exceptions

now := time.parse_rfc3339_ns(input.context.time)

# The exceptions that waive at context.time, and those that expired by then.
active contains exception if {
	some exception in input.exceptions
	in_scope(exception)
	now < time.parse_rfc3339_ns(exception.expires_at)
}

expired contains exception if {
	some exception in input.exceptions
	in_scope(exception)
	time.parse_rfc3339_ns(exception.expires_at) <= now
}

# The worker matched the scope; the agents and pools it names are checked again here.
in_scope(exception) if {
	named_or_any(exception, "agents", input.agent.id)
	named_or_any(exception, "pools", input.envelope.work_pool.name)
}

named_or_any(exception, scope, _) if count(object.get(exception, scope, [])) == 0

named_or_any(exception, scope, value) if value in exception[scope]

# Whether an exception covers a deny reason: its rule is named, and the whole message
# matches the exception's pattern when it has one (anchored: `is 500` is not `is 5000`).
# A pattern RE2 cannot compile matches nothing, so the deny stands.
covers(exception, reason) if {
	reason.rule in exception.rules
	not reason.rule in unwaivable
	message_matches(exception, reason.message)
}

# A person's rejection, or their not answering in time, is theirs: no exception stands in
# for an approver (an agent's longer timeout does).
unwaivable := {"prefect.governance.rules.approval.deny"}

message_matches(exception, _) if object.get(exception, "message", null) == null

message_matches(exception, message) if {
	regex.is_valid(exception.message)
	regex.match(sprintf("^(?:%s)$", [exception.message]), message)
}
