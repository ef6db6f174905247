"""The policy contract: what the policy sees (input) and what it answers (result).

These models are the single source of the JSON Schemas published in
``policies/schema/``; see ``prefect_governance.cli.schema``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_POLICY_PATH = "prefect/governance/decision"
DEFAULT_TASK_POLICY_PATH = "prefect/governance/task"

Mode = Literal["enforce", "audit"]
FailMode = Literal["closed", "open"]
# Why a policy engine gave no usable answer (``engines.base.EngineError.kind``).
EngineFailure = Literal["unreachable", "timeout", "http", "evaluation", "undefined", "shape"]


class _Contract(BaseModel):
    """Base of the input models: unknown fields are a contract violation."""

    model_config = ConfigDict(extra="forbid")


# --- agent -----------------------------------------------------------------


class TrustState(_Contract):
    """The agent's trust as the policy sees it."""

    score: float = Field(1.0, ge=0.0, le=1.0, description="Current trust score in [0, 1].")
    slope: float = Field(0.0, description="Slope of the score over the window (per run).")
    window: list[float] = Field(default_factory=list, description="Scores of the last k runs.")
    runs: int = Field(0, ge=0, description="Runs decided for this agent so far.")
    refusals: int = Field(0, ge=0, description="Runs refused for this agent so far.")


class ParameterConstraint(_Contract):
    """A constraint on one flow-run parameter, declared in the agent object."""

    type: Literal["string", "integer", "number", "boolean", "array", "object"] | None = None
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    enum: list[Any] | None = None
    pattern: str | None = Field(None, description="RE2 pattern the string value must match.")
    max_length: int | None = Field(None, ge=0, description="Maximum length of a string or array.")


class ScopeConstraint(_Contract):
    """Environments and tenants the agent may act in (from the run's ``env:``/``tenant:`` tags)."""

    environments: list[str] | None = Field(
        None, description="When set, the run must be tagged env:<name> with one of these."
    )
    tenants: list[str] | None = Field(
        None, description="When set, the run must be tagged tenant:<name> with one of these."
    )


class TriggerConstraint(_Contract):
    """Who or what may start the agent's runs (by the flow run's ``created_by``)."""

    types: list[str] | None = Field(
        None,
        description="Allowed created_by.type values, e.g. SCHEDULE, AUTOMATION, USER, or "
        "UNKNOWN when the server recorded no creator.",
    )
    users: list[str] | None = Field(
        None, description="When started by a user: allowed created_by.display_value values."
    )


Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def _every_day() -> list[Weekday]:
    return ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


class TimeWindow(_Contract):
    """A weekly window (UTC) in which runs may start."""

    days: list[Weekday] = Field(default_factory=_every_day)
    start: str = Field("00:00", pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
    end: str = Field("24:00", pattern=r"^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$")


class Freeze(_Contract):
    """A period in which no run of the agent may start (times with a zone)."""

    start: AwareDatetime
    end: AwareDatetime
    reason: str = ""


# Fields of the approval constraint that named where a requester could write an approval.
LEGACY_APPROVAL_FIELDS = ("label", "parameter")


class ApprovalConstraint(_Contract):
    """One of these approvers must have approved the run with a signed approval that the
    worker verified against the key it pins for that approver (``envelope.approvals``)."""

    approvers: list[str] = Field(
        description="Approver names: the key ids in the worker's PREFECT_GOVERNANCE_APPROVER_KEYS."
    )
    timeout_seconds: int | None = Field(
        None,
        gt=0,
        description="Seconds the run waits for an approval, from when it was first set "
        "awaiting (envelope.approval_requested_at); past them it is refused. Unset: the "
        "shipped policy waits one hour.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_requester_approvals(cls, data: Any) -> Any:
        """An agent document of an older release (``label``/``parameter``) is invalid: a
        label or a parameter is written by whoever creates the run, and approves nothing."""
        if isinstance(data, dict):
            legacy = [name for name in LEGACY_APPROVAL_FIELDS if name in data]
            if legacy:
                raise ValueError(
                    f"{' and '.join(legacy)}: a label or a parameter approves nothing (any API "
                    "client sets them); remove it, approvals are signed with "
                    "`prefect-governance approve`"
                )
        return data


class TrustThresholds(_Contract):
    """Refuse below a trust score, or when trust falls faster than a slope."""

    min_score: float | None = Field(None, ge=0.0, le=1.0)
    min_slope: float | None = None


class MemoryConstraint(_Contract):
    """May a run write memory committed under another schema than the agent's pinned one?"""

    allow_schema_change: bool = False


class TaskConstraint(_Contract):
    """Which of the agent's tasks may run inside an allowed flow run (the task policy reads it)."""

    deny: list[str] = Field(
        default_factory=list, description="Task names refused before their body runs."
    )


class InfrastructureConstraint(_Contract):
    """What the agent's runs may start (``rules/infrastructure``). Without this section the
    defaults hold: nothing privileged, no added capability, no host path, no host
    namespace, no setting the worker does not recognise; any registry, namespace and
    service account."""

    registries: list[str] | None = Field(
        None,
        description="When set, every image must come from one of these registries (as Docker "
        "normalizes them: docker.io, ghcr.io, localhost:5000); [] allows none.",
    )
    require_digest: bool = Field(
        False, description="Every image must be pinned by digest (name@sha256:...)."
    )
    allow_privileged: bool = Field(
        False,
        description="May a container be privileged, or turn confinement off (seccomp, "
        "AppArmor, SELinux, system paths, user/UTS/cgroup namespace of the host)?",
    )
    allow_privilege_escalation: bool = Field(
        False, description="May a container set allowPrivilegeEscalation: true?"
    )
    capabilities: list[str] = Field(
        default_factory=list,
        description="Linux capabilities a container may add (NET_ADMIN, ...; ALL only if listed).",
    )
    host_paths: list[str] = Field(
        default_factory=list,
        description="Host path prefixes a run may mount or use as a device (a prefix covers "
        "itself and what is below it: /data covers /data/x, not /database).",
    )
    host_network: bool = Field(False, description="May the run use the host's network?")
    host_pid: bool = Field(False, description="May the run share the host's PID namespace?")
    host_ipc: bool = Field(False, description="May the run share the host's IPC namespace?")
    require_non_root: bool = Field(
        False, description="Every container must run as a user other than root."
    )
    namespaces: list[str] | None = Field(
        None, description="Kubernetes: when set, the namespaces the run's Job may be created in."
    )
    service_accounts: list[str] | None = Field(
        None, description="Kubernetes: when set, the service accounts the run's pod may use."
    )
    settings: list[str] = Field(
        default_factory=list,
        description="Settings the worker does not recognise (envelope.infrastructure."
        "unrecognized) that the agent accepts anyway.",
    )


class Constraints(_Contract):
    """Governance constraints that travel with the agent (each rule module reads its own)."""

    parameters: dict[str, ParameterConstraint] = Field(default_factory=dict)
    scope: ScopeConstraint | None = None
    triggers: TriggerConstraint | None = None
    windows: list[TimeWindow] = Field(default_factory=list)
    freezes: list[Freeze] = Field(default_factory=list)
    approval: ApprovalConstraint | None = None
    trust: TrustThresholds | None = None
    memory: MemoryConstraint | None = None
    tasks: TaskConstraint | None = None
    infrastructure: InfrastructureConstraint | None = None
    capability_trust: dict[str, float] = Field(
        default_factory=dict,
        description="Minimum trust score per capability: below it the capability is withheld "
        "from the run's grants (the run still runs, without it).",
    )


class AgentObject(_Contract):
    """The typed identity a deployment runs as, as sent to the policy."""

    id: str
    version: int = Field(ge=1)
    owner: str
    trust_scope: list[str] = Field(description="Work pools (or scopes) the agent may act in.")
    capabilities: list[str] = Field(description="Capabilities the agent may use.")
    memory_schema_hash: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    policy_ref: str = DEFAULT_POLICY_PATH
    constraints: Constraints = Field(default_factory=Constraints)
    trust: TrustState = Field(default_factory=TrustState)


# --- envelope --------------------------------------------------------------


class CreatedBy(_Contract):
    type: str | None = None
    display_value: str | None = None
    id: str | None = None


class FlowRunRef(_Contract):
    id: str
    name: str
    tags: list[str] = Field(default_factory=list)
    labels: dict[str, Any] = Field(default_factory=dict)
    created_by: CreatedBy | None = None
    parent_flow_run_id: str | None = None


class DeploymentRef(_Contract):
    id: str
    name: str
    version: str | None = None
    tags: list[str] = Field(default_factory=list)


class FlowRef(_Contract):
    id: str
    name: str


class WorkPoolRef(_Contract):
    name: str
    type: str


class Approval(_Contract):
    """A signed approval of this run that the worker verified: signed by the key it pins for
    the approver, bound to this flow run or to its deployment and parameters, not expired."""

    id: str
    approver: str = Field(description="Who signed it (the id of the pinned key).")
    binding: Literal["flow_run", "deployment"] = Field(
        description="flow_run: this flow run (and its parameters); deployment: any run of "
        "the run's deployment with these exact parameters."
    )
    issued_at: datetime
    expires_at: datetime
    decision: Literal["approve", "reject"] = Field(
        "approve", description="approve: the run may go ahead; reject: it must not."
    )


class MemoryAccess(_Contract):
    reads: list[str] = Field(default_factory=list)
    writes: list[str] = Field(default_factory=list)
    schema_hash: str | None = Field(None, description="Hash of the agent's memory schema now.")
    previous_schema_hash: str | None = Field(
        None,
        description="Hash of the schema the committed memory was written under "
        "(differs from schema_hash when this run changes the memory schema).",
    )
    version: int = Field(
        0, ge=0, description="Version of the committed memory the run starts from."
    )


InfrastructureKind = Literal["process", "docker", "kubernetes"]
ContainerRole = Literal["container", "init", "ephemeral"]


class Image(_Contract):
    """An image reference, read the way Docker normalizes it."""

    reference: str = Field(description="As written in the job configuration.")
    registry: str = Field(
        description="docker.io for `python:3.11`, localhost:5000 for `localhost:5000/x`."
    )
    repository: str = Field(description="The path in the registry, e.g. library/python.")
    tag: str | None = None
    digest: str | None = Field(
        None, description="sha256:<hex> when the reference is pinned (`...@sha256:`)."
    )


class Mount(_Contract):
    """A volume, bind mount or device the run's containers would get."""

    type: str = Field(
        description="bind, volume, tmpfs, device (Docker); hostPath, emptyDir, secret, "
        "configMap, ... (Kubernetes: the volume's source kind)."
    )
    source: str | None = Field(None, description="Host path (bind, device, hostPath) or name.")
    target: str | None = Field(None, description="Path in the container, where known.")
    read_only: bool = False


class Container(_Contract):
    """One container the run would start, its settings as they take effect (a pod's
    security context applies where the container sets nothing)."""

    name: str | None = None
    role: ContainerRole = "container"
    image: Image | None = None
    privileged: bool = False
    allow_privilege_escalation: bool | None = Field(
        None, description="As set (None: not set; Docker's no-new-privileges is False)."
    )
    capabilities_added: list[str] = Field(
        default_factory=list, description="Upper case, without CAP_ (SYS_ADMIN, ALL)."
    )
    unconfined: list[str] = Field(
        default_factory=list,
        description="Confinement turned off: seccomp, apparmor, selinux, systempaths, and the "
        "host's user, uts or cgroup namespace (userns, uts, cgroupns).",
    )
    user: str | None = Field(None, description="Docker's user (`1000:1000`, `root`).")
    run_as_user: int | None = None
    run_as_non_root: bool | None = None
    command: list[str] | None = None
    working_dir: str | None = None
    limits: dict[str, str] = Field(
        default_factory=dict, description="Resource limits: memory, cpu, memory_swap, pids, ..."
    )
    requests: dict[str, str] = Field(default_factory=dict, description="Kubernetes requests.")


class Infrastructure(_Contract):
    """What the run would start, resolved from its job configuration (the worker builds it
    from the prepared job; environment variable names only, never values)."""

    kind: InfrastructureKind
    containers: list[Container] = Field(
        default_factory=list,
        description="Docker: the one container; Kubernetes: every container, initContainer "
        "and ephemeral container of the pod; process: none.",
    )
    mounts: list[Mount] = Field(default_factory=list)
    host_paths: list[str] = Field(
        default_factory=list,
        description="Every host path the run would see: bind and hostPath sources, devices.",
    )
    network_mode: str | None = Field(None, description="Docker's network mode (host, none, ...).")
    host_network: bool = False
    host_pid: bool = False
    host_ipc: bool = False
    namespace: str | None = Field(None, description="Kubernetes: where the Job is created.")
    service_account: str | None = Field(
        None, description="Kubernetes: the pod's service account (default when not set)."
    )
    command: str | None = Field(None, description="Process: the command the worker runs.")
    working_dir: str | None = Field(None, description="Process: where it runs.")
    env_names: list[str] = Field(
        default_factory=list, description="Environment variable names (never values), sorted."
    )
    unrecognized: list[str] = Field(
        default_factory=list,
        description="Settings the worker could not read, by name (e.g. a container_create_kwargs "
        "key, a pod spec field): they might widen privileges, so the policy sees them.",
    )


class MutationEnvelope(_Contract):
    """What one flow run proposes to do."""

    id: str
    issued_at: datetime
    expires_at: datetime
    nonce: str
    flow_run: FlowRunRef
    deployment: DeploymentRef | None = None
    flow: FlowRef
    work_pool: WorkPoolRef
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="Flow-run parameters, secrets redacted."
    )
    redacted: list[str] = Field(
        default_factory=list, description="Names of parameters whose values were redacted."
    )
    capabilities: list[str] = Field(default_factory=list)
    memory: MemoryAccess = Field(default_factory=MemoryAccess)
    approvals: list[Approval] = Field(
        default_factory=list,
        description="Approvals the worker verified for this run (labels and parameters "
        "approve nothing).",
    )
    rejections: list[Approval] = Field(
        default_factory=list,
        description="Signed rejections of this run the worker verified (as approvals are).",
    )
    approval_requested_at: datetime | None = Field(
        None,
        description="When a decision first set this run awaiting approval, as the worker's "
        "lineage holds it (None: it never waited).",
    )
    infrastructure: Infrastructure | None = Field(
        None,
        description="What the run would start (Docker, Kubernetes, process); None from a "
        "caller that does not say.",
    )


# --- exceptions ------------------------------------------------------------


class PolicyException(_Contract):
    """A signed exception the worker verified and found in scope for this run (its agent,
    deployment and pool): it waives a deny of one of ``rules`` (whose message matches
    ``message``, when set) while ``context.time`` is before ``expires_at``."""

    name: str = Field(description="The governance-exception block's name.")
    rules: list[str] = Field(description="Rule ids it waives (prefect.governance.rules.*.deny).")
    message: str | None = Field(
        None, description="RE2 pattern a deny message must match (regex.match), if set."
    )
    agents: list[str] = Field(default_factory=list)
    deployments: list[str] = Field(default_factory=list)
    pools: list[str] = Field(default_factory=list)
    owner: str
    reason: str
    ticket: str
    issued_at: datetime
    expires_at: datetime


class Waiver(BaseModel):
    """A deny an exception waived: the run is not refused for it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    exception: str = Field(description="The exception's name.")
    rule: str = Field(description="The waived deny's rule.")
    message: str = Field(description="The waived deny's message.")


# --- input and result ------------------------------------------------------


class WorkerRef(_Contract):
    name: str


class PolicyContext(_Contract):
    worker: WorkerRef
    time: datetime
    mode: Mode = "enforce"


class PolicyInput(_Contract):
    """The document sent to the policy as ``input``."""

    agent: AgentObject
    envelope: MutationEnvelope
    context: PolicyContext
    exceptions: list[PolicyException] = Field(
        default_factory=list,
        description="Signed exceptions that apply to this run, expired ones included "
        "(the policy compares expires_at with context.time).",
    )


class Reason(BaseModel):
    """Which rule produced a deny or warn message."""

    model_config = ConfigDict(extra="forbid", strict=True)

    kind: Literal["deny", "warn"]
    message: str
    rule: str = Field(
        description="Package and rule, e.g. prefect.governance.rules.capabilities.deny"
    )


class ApprovalRequest(BaseModel):
    """The policy's answer that the run waits for a signed approval."""

    model_config = ConfigDict(extra="forbid", strict=True)

    approvers: list[str] = Field(description="Who may approve (pinned approver key ids).")
    # Lax: an engine may hand a whole number back as a decimal (3600.0).
    timeout_seconds: int = Field(
        gt=0, strict=False, description="How long the run may wait, in seconds."
    )
    reason: str = ""
    rule: str | None = Field(None, description="The rule (package.rule) that asked for it.")


class PolicyResult(BaseModel):
    """The policy's answer. Other rules of the package may appear and are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)

    allow: bool
    deny: list[str] = Field(default_factory=list)
    warn: list[str] = Field(default_factory=list)
    annotations: dict[str, str] = Field(default_factory=dict)
    reasons: list[Reason] = Field(
        default_factory=list, description="Optional: the rule behind each deny and warn message."
    )
    grants: list[str] | None = Field(
        None,
        description="Optional: the capabilities the run may use. It can only narrow what the "
        "run asked for (envelope.capabilities); absent, the run may use all of those.",
    )
    approval: list[ApprovalRequest] = Field(
        default_factory=list,
        description="Optional: approvals the run waits for. With no deny and a request here "
        "the verdict is awaiting_approval: the run does not start until decided again.",
    )
    waived: list[Waiver] = Field(
        default_factory=list,
        description="Optional: the denies an active exception waived (not in deny).",
    )


# --- inside an allowed run: one task --------------------------------------


class TaskRef(_Contract):
    name: str
    run_id: str
    key: str | None = Field(None, description="Prefect's task key (the task's identity).")
    attempt: int = Field(1, ge=1, description="1 on the first run, 2 on the first retry, ...")


class ParentRun(_Contract):
    """The flow run this task belongs to: its verified, signed envelope and what it was granted."""

    envelope: MutationEnvelope
    decision_id: str
    verdict: str
    grants: list[str] = Field(description="Capabilities the flow run's decision granted.")
    kid: str = Field(description="Id of the key the worker signed the envelope with.")
    signature: str


class TaskMemory(_Contract):
    """The task's memory access: what it declared, what it sees, what it proposes."""

    writes: list[str] = Field(
        default_factory=list, description="Top-level memory fields the task declares it writes."
    )
    schema_hash: str | None = Field(None, description="Hash of the memory schema the task sees.")
    proposed: list[str] | None = Field(
        None, description="commit: the top-level fields the task's proposal writes."
    )


class TaskEnvelope(_Contract):
    """What one task run proposes to do."""

    id: str
    issued_at: datetime
    task: TaskRef
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="Task parameters, secrets redacted; a value that is not JSON (or too "
        'large) is sent as {"$type": <Python type>, "$omitted": <why>}.',
    )
    redacted: list[str] = Field(default_factory=list)
    capabilities: list[str] = Field(
        default_factory=list, description="Capabilities the task declares it will use."
    )
    memory: TaskMemory = Field(default_factory=TaskMemory)
    parent: ParentRun


class TaskContext(_Contract):
    time: datetime
    mode: Mode = "enforce"
    purpose: Literal["admit", "commit"] = Field(
        "admit",
        description="admit: before the task's body runs; commit: when it ended with a memory "
        "proposal, before the proposal applies (envelope.memory.proposed names its fields).",
    )


class TaskPosture(_Contract):
    """The agent's posture as the next governed task inherits it: trust over the last k
    tasks (continuing from the agent's history before the run) and the run's memory."""

    score: float = Field(ge=0.0, le=1.0, description="Trust now, after the run's ended tasks.")
    slope: float = Field(0.0, description="Least-squares slope of the window (per task).")
    window: list[float] = Field(
        default_factory=list,
        description="The last k scores, oldest first: the agent's history before the run, "
        "then the score after each governed task of this run that ended.",
    )
    k: int = Field(3, ge=2, description="The window's length (the agent's trust_window).")
    tasks: int = Field(0, ge=0, description="Governed task ends in this run so far.")
    memory_version: int = Field(
        0, ge=0, description="The run's memory version: granted, plus each accepted proposal."
    )
    memory_hash: str | None = Field(None, description="Hash of the run's memory content now.")
    schema_hash: str | None = Field(None, description="The memory schema the run started under.")


class TaskPolicyInput(_Contract):
    """The document sent to the task policy as ``input``."""

    agent: AgentObject
    envelope: TaskEnvelope
    context: TaskContext
    posture: TaskPosture | None = Field(
        None, description="The posture this task inherits (the task policy refuses without one)."
    )


# --- what an allowed run receives (signed) ---------------------------------


class EngineRef(BaseModel):
    """Where the worker's decisions were made, so the run's tasks are decided the same way."""

    kind: Literal["embedded", "opa"]
    policy_dir: str | None = Field(None, description="Embedded: the Rego directory.")
    url: str | None = Field(None, description="OPA: the sidecar's address.")
    ca_cert: str | None = Field(None, description="OPA over TLS: the CA bundle's path.")
    timeout: float | None = Field(None, gt=0, description="Seconds one evaluation may take.")
    retries: int | None = Field(None, ge=0, le=5, description="OPA: retries on transient errors.")


class MemorySnapshot(BaseModel):
    """The agent's committed memory at decision time."""

    version: int = 0
    content: dict[str, Any] = Field(default_factory=dict)
    content_hash: str | None = None
    schema_hash: str | None = None


class GrantPosture(BaseModel):
    """What the run needs to move the agent's posture per task: its start, the agent's
    trust weights and its memory schema."""

    start: TaskPosture
    weights: dict[str, float] = Field(
        default_factory=dict, description="The agent's trust weights (core.trust.TrustWeights)."
    )
    memory_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class Grant(BaseModel):
    """The signed payload handed to an allowed run: what was decided, for whom."""

    decision_id: str
    verdict: str
    envelope: MutationEnvelope
    agent: AgentObject
    memory: MemorySnapshot
    grants: list[str] = Field(
        default_factory=list, description="Capabilities the run may use (as decided)."
    )
    mode: Mode = "enforce"
    fail_mode: FailMode = "closed"
    engine: EngineRef | None = Field(None, description="The engine that decides the run's tasks.")
    task_policy_path: str = DEFAULT_TASK_POLICY_PATH
    posture: GrantPosture | None = Field(
        None, description="The agent's posture at the run's start (None: an ungoverned run)."
    )


# --- the worker's record of a decision ---------------------------------------

Verdict = Literal["allowed", "refused", "audited", "ungoverned", "awaiting_approval"]
# The verdicts whose runs (or tasks) go ahead: all but a refusal.
RUNNABLE: tuple[Verdict, ...] = ("allowed", "audited", "ungoverned")


class Decision(BaseModel):
    """A policy result plus what the worker knows about how it was reached."""

    id: str
    verdict: Verdict
    allow: bool
    deny: list[str] = Field(default_factory=list)
    warn: list[str] = Field(default_factory=list)
    annotations: dict[str, str] = Field(default_factory=dict)
    reasons: list[Reason] = Field(default_factory=list)
    engine: str
    policy_path: str
    policy_revision: str | None = None
    latency_ms: float = 0.0
    mode: Mode = "enforce"
    fail_mode: FailMode = "closed"
    error: str | None = Field(
        None, description="Why the engine gave no usable answer (fail closed/open), if so."
    )
    error_kind: EngineFailure | None = Field(
        None, description="The kind of that failure (the engine error's kind), if so."
    )
    grants: list[str] | None = Field(
        None, description="The policy's grants, if it narrowed the capabilities."
    )
    rejected_approvals: list[str] = Field(
        default_factory=list,
        description="Approval statements found for the run that did not verify, and why "
        "(never shown to the policy as approvals).",
    )
    approval: list[ApprovalRequest] = Field(
        default_factory=list, description="The approvals an awaiting run waits for."
    )
    waived: list[Waiver] = Field(
        default_factory=list, description="The denies an exception waived, and which one."
    )
    rejected_exceptions: list[str] = Field(
        default_factory=list,
        description="Exceptions claiming to apply to the run that waive nothing, and why "
        "(unsigned, altered, signed by an unpinned key, unreadable).",
    )

    @property
    def runs(self) -> bool:
        """Whether the flow run (or task) may start."""
        return self.verdict in RUNNABLE

    @property
    def waits(self) -> bool:
        """Whether the run waits for an approval (it neither starts nor is refused)."""
        return self.verdict == "awaiting_approval"

    def granted(self, requested: list[str]) -> list[str]:
        """The capabilities the run may use: what it asked for, narrowed by the policy's
        grants when enforced (in audit mode or ungoverned nothing is withheld)."""
        if self.grants is None or self.verdict != "allowed":
            return list(requested)
        allowed = set(self.grants)
        return [c for c in requested if c in allowed]


def describe_validation(error: ValidationError, whole: str) -> str:
    """A validation error on one line: each problem as ``field.path: message`` (``whole``
    names the document itself when the problem is not in one of its fields)."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or whole}: {e['msg']}" for e in error.errors()
    )
