# Helpers of the task policy's rule modules (task_rules/*.rego).
package prefect.governance.lib.task

# The task ended with a memory proposal that is about to apply (context.purpose
# "commit"). Any other purpose is read as "admit", the default: the task's body
# has not run yet.
commit if input.context.purpose == "commit"

admit if not commit
