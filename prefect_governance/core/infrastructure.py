"""What a run would start, for the envelope (``MutationEnvelope.infrastructure``): pure.

Each worker type hands its prepared job configuration to one of these. They read it
the way the infrastructure will: a Docker container's settings as prefect-docker
0.7.4 builds them (the job's fields and ``container_create_kwargs``), a Kubernetes
Job's pod as the API will run it (every container, initContainer and ephemeral
container, the pod's security context where a container sets none). Whatever could
widen a run's privileges and is not understood is listed in ``unrecognized``, by
name, so the policy sees it; environment variables by name only, never values.
"""

from __future__ import annotations

import posixpath
import re
import shlex
import sys
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

from prefect_governance.core.models import Container, Image, Infrastructure, Mount

# --- images ---------------------------------------------------------------------------

DEFAULT_REGISTRY = "docker.io"
_DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[0-9a-fA-F]{32,}$")


def parse_image(reference: str) -> Image:
    """An image reference read as Docker reads it (``distribution/reference``'s
    normalization): the first path component is a registry when it has a dot or a
    colon, is ``localhost``, or has an upper-case letter; otherwise it is Docker Hub's
    (``python:3.11`` is ``docker.io/library/python:3.11``)."""
    rest, _, digest = reference.strip().partition("@")
    slash = rest.find("/")
    first = rest[:slash] if slash != -1 else ""
    if slash != -1 and (
        any(c in first for c in ".:") or first == "localhost" or first.lower() != first
    ):
        registry, path = first, rest[slash + 1 :]
    else:
        registry, path = DEFAULT_REGISTRY, rest
    if registry == "index.docker.io":
        registry = DEFAULT_REGISTRY
    tag = None
    name, colon, maybe_tag = path.rpartition(":")
    if colon and "/" not in maybe_tag:
        path, tag = name, maybe_tag
    if registry == DEFAULT_REGISTRY and "/" not in path:
        path = f"library/{path}"
    return Image(
        reference=reference,
        registry=registry.lower(),
        repository=path,
        tag=tag or None,
        digest=digest if _DIGEST.match(digest) else None,
    )


def _image(value: Any) -> Image | None:
    return parse_image(value) if isinstance(value, str) and value.strip() else None


# --- shared helpers -------------------------------------------------------------------


def _host_path(source: str) -> str:
    """A host path as the kernel resolves it (``/data/../etc`` is ``/etc``); a relative
    one (resolved against the worker's directory) stays as written and matches no
    absolute prefix."""
    return posixpath.normpath(source) if source.startswith("/") else source


def _capability(name: Any) -> str:
    text = str(name).strip().upper()
    return text.removeprefix("CAP_")


def _command(value: Any) -> list[str] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError:
            return [value]
    if isinstance(value, (list, tuple)):
        return [str(part) for part in value]
    return [str(value)]


def _names(env: Any) -> set[str]:
    """Variable names of an env mapping, or of a list of ``NAME=value`` / ``{name: ...}``."""
    if isinstance(env, Mapping):
        return {str(name) for name in env}
    names: set[str] = set()
    for item in env if isinstance(env, (list, tuple)) else []:
        if isinstance(item, Mapping):
            names |= {str(item["name"])} if item.get("name") else set()
        else:
            names.add(str(item).partition("=")[0])
    return names


def _unique(items: Iterable[str]) -> list[str]:
    return sorted(set(items))


def _true(value: Any) -> bool:
    """A flag as the API reads it; anything but false/absent counts (fail closed)."""
    return value not in (None, False, "", 0, "false", "False")


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def process_infrastructure(
    command: str | None, working_dir: str | None, env: Mapping[str, str | None]
) -> Infrastructure:
    """A process run: the command and the directory it runs in, its variables' names."""
    return Infrastructure(
        kind="process",
        command=command,
        working_dir=str(working_dir) if working_dir is not None else None,
        env_names=_unique(_names(env)),
    )


# --- Docker ---------------------------------------------------------------------------

# DockerWorkerJobConfiguration's fields (prefect-docker 0.7.4): a container_create_kwargs
# key that names one is dropped by _build_container_settings, yet read here too (an
# older or newer release may let it override): the policy sees the wider of the two.
DOCKER_JOB_FIELDS = frozenset(
    {
        "command",
        "env",
        "labels",
        "name",
        "image",
        "image_pull_policy",
        "registry_credentials",
        "networks",
        "network_mode",
        "auto_remove",
        "volumes",
        "stream_output",
        "mem_limit",
        "memswap_limit",
        "privileged",
        "container_create_kwargs",
    }
)
# docker-py's containers.create keywords that change nothing a policy governs.
_DOCKER_INERT = frozenset(
    {
        "auto_remove",
        "detach",
        "domainname",
        "healthcheck",
        "hostname",
        "init",
        "labels",
        "log_config",
        "mac_address",
        "name",
        "network_disabled",
        "platform",
        "restart_policy",
        "stdin_open",
        "stop_signal",
        "tty",
        "use_config_proxy",
        "dns",
        "dns_opt",
        "dns_search",
        "extra_hosts",
        "image_pull_policy",
        "stream_output",
        "registry_credentials",
        "networks",
        "network",
        "environment",
        "env",
        "cap_drop",
        "read_only",
        "oom_score_adj",
        "stop_timeout",
    }
)
# Keywords read into the container's settings below.
_DOCKER_READ = frozenset(
    {
        "image",
        "command",
        "entrypoint",
        "working_dir",
        "user",
        "privileged",
        "cap_add",
        "security_opt",
        "devices",
        "device_cgroup_rules",
        "volumes",
        "mounts",
        "tmpfs",
        "network_mode",
        "pid_mode",
        "ipc_mode",
        "userns_mode",
        "uts_mode",
        "cgroupns",
        "mem_limit",
        "memswap_limit",
        "mem_reservation",
        "nano_cpus",
        "cpu_quota",
        "cpu_period",
        "cpu_shares",
        "cpu_count",
        "cpuset_cpus",
        "pids_limit",
        "shm_size",
    }
)
_DOCKER_LIMITS = (
    ("mem_limit", "memory"),
    ("memswap_limit", "memory_swap"),
    ("mem_reservation", "memory_reservation"),
    ("nano_cpus", "nano_cpus"),
    ("cpu_quota", "cpu_quota"),
    ("cpu_period", "cpu_period"),
    ("cpu_shares", "cpu_shares"),
    ("cpu_count", "cpu_count"),
    ("cpuset_cpus", "cpuset_cpus"),
    ("pids_limit", "pids"),
    ("shm_size", "shm_size"),
)


def _docker_volume(spec: str) -> tuple[Mount, str | None]:
    """A ``source:target[:mode]`` string (or an anonymous ``/target``)."""
    parts = spec.strip().split(":")
    if len(parts) == 1:
        return Mount(type="volume", target=parts[0]), None
    source, target = parts[0], parts[1]
    read_only = len(parts) > 2 and "ro" in parts[2].split(",")
    if source.startswith(("/", ".", "~")) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", source):
        path = _host_path(source)
        return Mount(type="bind", source=path, target=target, read_only=read_only), path
    return Mount(type="volume", source=source, target=target, read_only=read_only), None


def _docker_volumes(value: Any, where: str) -> tuple[list[Mount], list[str], list[str]]:
    """``volumes``: a list of strings, or docker-py's dict ``{source: {bind, mode}}``."""
    mounts: list[Mount] = []
    paths: list[str] = []
    odd: list[str] = []
    items: list[str] = []
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, Mapping):
        for source, spec in value.items():
            if isinstance(spec, Mapping):
                bind = spec.get("bind", "")
                mode = spec.get("mode", "rw")
                items.append(f"{source}:{bind}:{mode}")
            elif isinstance(spec, str):
                items.append(f"{source}:{spec}")
            else:
                odd.append(f"{where}.{source}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            if isinstance(item, str):
                items.append(item)
            else:
                odd.append(f"{where}[{index}]")
    elif value is not None:
        odd.append(where)
    for item in items:
        mount, path = _docker_volume(item)
        mounts.append(mount)
        paths.extend([path] if path else [])
    return mounts, paths, odd


_MOUNT_KEYS = {"target", "source", "type", "readonly", "read_only", "consistency"}


def _docker_mounts(value: Any, where: str) -> tuple[list[Mount], list[str], list[str]]:
    """``mounts``: docker-py ``Mount`` objects (dicts: Target, Source, Type, ReadOnly, ...)
    or mount strings. A volume with driver options (``local`` with ``o=bind`` is a bind
    in disguise) or anything else not understood is listed as unrecognised."""
    mounts: list[Mount] = []
    paths: list[str] = []
    odd: list[str] = []
    for index, item in enumerate(value if isinstance(value, (list, tuple)) else [value]):
        here = f"{where}[{index}]"
        if isinstance(item, str):
            found, found_paths, _ = _docker_volumes([item], here)
            mounts.extend(found)
            paths.extend(found_paths)
            continue
        if not isinstance(item, Mapping):
            odd.append(here)
            continue
        fields = {str(k).lower(): v for k, v in item.items()}
        kind = str(fields.get("type") or "volume").lower()
        source = fields.get("source")
        source = str(source) if source not in (None, "") else None
        read_only = bool(fields.get("readonly", fields.get("read_only", False)))
        odd.extend(f"{here}.{k}" for k in item if str(k).lower() not in _MOUNT_KEYS)
        if kind == "bind" or (kind not in ("volume", "tmpfs", "npipe") and source):
            if kind != "bind":
                odd.append(f"{here}.type={kind}")
            path = _host_path(source or "")
            mounts.append(
                Mount(type="bind", source=path, target=fields.get("target"), read_only=read_only)
            )
            paths.append(path)
        else:
            mounts.append(
                Mount(type=kind, source=source, target=fields.get("target"), read_only=read_only)
            )
    return mounts, paths, odd


def _docker_devices(value: Any, where: str) -> tuple[list[Mount], list[str], list[str]]:
    """``devices``: ``/dev/host[:/dev/container[:rwm]]`` strings."""
    mounts: list[Mount] = []
    paths: list[str] = []
    odd: list[str] = []
    for index, item in enumerate(value if isinstance(value, (list, tuple)) else [value]):
        if not isinstance(item, str):
            odd.append(f"{where}[{index}]")
            continue
        source, _, rest = item.partition(":")
        path = _host_path(source)
        target = rest.partition(":")[0] or source
        mounts.append(Mount(type="device", source=path, target=target))
        paths.append(path)
    return mounts, paths, odd


_UNCONFINED_OPTS = {
    "seccomp=unconfined": "seccomp",
    "seccomp:unconfined": "seccomp",
    "apparmor=unconfined": "apparmor",
    "apparmor:unconfined": "apparmor",
    "label=disable": "selinux",
    "label:disable": "selinux",
    "systempaths=unconfined": "systempaths",
}


def _security_opt(value: Any, where: str) -> tuple[list[str], bool | None, list[str]]:
    """``security_opt``: confinement turned off, no-new-privileges, and what is unknown."""
    unconfined: list[str] = []
    escalation: bool | None = None
    odd: list[str] = []
    for index, item in enumerate(value if isinstance(value, (list, tuple)) else [value]):
        text = str(item).strip().lower().replace(" ", "")
        if text in _UNCONFINED_OPTS:
            unconfined.append(_UNCONFINED_OPTS[text])
        elif text in ("no-new-privileges", "no-new-privileges=true", "no-new-privileges:true"):
            escalation = False
        elif text.startswith(("label=", "label:", "apparmor=", "apparmor:")) and text not in (
            "label=disable",
            "label:disable",
        ):
            continue  # a named profile or label: confinement stays on
        else:
            odd.append(f"{where}[{index}]={item}")
    return unconfined, escalation, odd


def _implied_network_mode(job: Mapping[str, Any]) -> list[str]:
    """The network mode prefect-docker picks when the job sets none (``get_network_mode``):
    on Linux, with no networks and an API on 127.0.0.1 or localhost, the host's."""
    raw_env = job.get("env")
    env: Mapping[str, Any] = raw_env if isinstance(raw_env, Mapping) else {}
    api_url = str(env.get("PREFECT_API_URL") or "")
    host = urllib.parse.urlparse(api_url).netloc.split(":")[0] if api_url else ""
    if sys.platform == "linux" and not job.get("networks") and host in ("127.0.0.1", "localhost"):
        return ["host"]
    return []


def docker_infrastructure(job: Mapping[str, Any]) -> Infrastructure:
    """A Docker run from its prepared ``DockerWorkerJobConfiguration`` (``model_dump()``).

    Reads the job's fields and every key of ``container_create_kwargs`` (docker-py's
    ``containers.create`` keywords): a key that names a job field (``privileged``,
    ``volumes``, ...) is dropped by prefect-docker 0.7.4, yet counted here; the
    settings seen are the wider of both. Without a network mode, the one prefect-docker
    infers (the host's, for an API on loopback). A keyword not known to be harmless is
    listed in ``unrecognized``.
    """
    extra_raw = job.get("container_create_kwargs")
    unrecognized: list[str] = []
    extra: Mapping[str, Any] = {}
    if isinstance(extra_raw, Mapping):
        extra = extra_raw
    elif extra_raw not in (None, {}):
        unrecognized.append("container_create_kwargs")

    def both(key: str) -> list[Any]:
        """The job's value and the create kwargs' value of one setting (present ones)."""
        return [source[key] for source in (job, extra) if source.get(key) is not None]

    for key in extra:
        if key not in _DOCKER_INERT and key not in _DOCKER_READ:
            unrecognized.append(f"container_create_kwargs.{key}")

    mounts: list[Mount] = []
    host_paths: list[str] = []
    for index, value in enumerate(both("volumes")):
        found = _docker_volumes(
            value, "volumes" if index == 0 else "container_create_kwargs.volumes"
        )
        mounts += found[0]
        host_paths += found[1]
        unrecognized += found[2]
    for reader, key in ((_docker_mounts, "mounts"), (_docker_devices, "devices")):
        if extra.get(key) is not None:
            found = reader(extra[key], f"container_create_kwargs.{key}")
            mounts += found[0]
            host_paths += found[1]
            unrecognized += found[2]
    tmpfs = extra.get("tmpfs")
    if isinstance(tmpfs, Mapping):
        mounts += [Mount(type="tmpfs", target=str(target)) for target in tmpfs]
    elif isinstance(tmpfs, (list, tuple)):
        mounts += [Mount(type="tmpfs", target=str(t).partition(":")[0]) for t in tmpfs]
    elif tmpfs is not None:
        unrecognized.append("container_create_kwargs.tmpfs")
    if extra.get("device_cgroup_rules"):
        unrecognized.append("container_create_kwargs.device_cgroup_rules")

    network_modes = [str(v) for v in both("network_mode")] or _implied_network_mode(job)
    namespace_modes = {key: [str(v) for v in both(key)] for key in ("pid_mode", "ipc_mode")}
    for key, modes in namespace_modes.items():  # container:<id> joins another one's
        unrecognized += [f"{key}={m}" for m in modes if m not in ("host", "private", "shareable")]
    unconfined: list[str] = []
    for key, name in (("userns_mode", "userns"), ("uts_mode", "uts"), ("cgroupns", "cgroupns")):
        if any(str(v) == "host" for v in both(key)):
            unconfined.append(name)
    found_unconfined, escalation, odd = _security_opt(
        extra.get("security_opt") or [], "container_create_kwargs.security_opt"
    )
    unconfined += found_unconfined
    unrecognized += odd

    capabilities = extra.get("cap_add") or []
    if isinstance(capabilities, str):
        capabilities = [capabilities]
    limits: dict[str, str] = {}
    for key, name in _DOCKER_LIMITS:
        values = both(key)
        if values:
            limits[name] = str(values[-1])
    user = next((str(v) for v in both("user")), None)
    run_as_user = _int(user.partition(":")[0]) if user else None
    if user and user.partition(":")[0] == "root":
        run_as_user = 0
    images = [parse_image(str(v)) for v in both("image") if str(v).strip()]
    if len({i.reference for i in images}) > 1:  # the kwargs' one, if ever it won
        unrecognized.append("container_create_kwargs.image")
    command = next((v for v in reversed(both("command"))), None)
    container = Container(
        name=str(job["name"]) if job.get("name") else None,
        image=images[0] if images else None,
        privileged=any(_true(v) for v in both("privileged")),
        allow_privilege_escalation=escalation,
        capabilities_added=_unique(_capability(c) for c in capabilities),
        unconfined=_unique(unconfined),
        user=user,
        run_as_user=run_as_user,
        command=_command(command),
        working_dir=str(extra["working_dir"]) if extra.get("working_dir") else None,
        limits=limits,
    )
    if extra.get("entrypoint") is not None:
        container.command = [*(_command(extra["entrypoint"]) or []), *(container.command or [])]
    env_names = _names(job.get("env")) | _names(extra.get("environment"))
    return Infrastructure(
        kind="docker",
        containers=[container],
        mounts=mounts,
        host_paths=_unique(host_paths),
        network_mode=network_modes[0] if network_modes else None,
        host_network="host" in network_modes,
        host_pid="host" in namespace_modes["pid_mode"],
        host_ipc="host" in namespace_modes["ipc_mode"],
        env_names=_unique(env_names),
        unrecognized=_unique(unrecognized),
    )


# --- Kubernetes -----------------------------------------------------------------------

# Fields of a Job, its pod and its containers (Kubernetes v1) that a policy need not
# read; every other one is read below or listed as unrecognised.
_JOB_SPEC = frozenset(
    {
        "template",
        "backoffLimit",
        "backoffLimitPerIndex",
        "maxFailedIndexes",
        "ttlSecondsAfterFinished",
        "activeDeadlineSeconds",
        "completions",
        "parallelism",
        "completionMode",
        "suspend",
        "podFailurePolicy",
        "podReplacementPolicy",
        "successPolicy",
        "managedBy",
        "selector",
        "manualSelector",
    }
)
_POD_SPEC_INERT = frozenset(
    {
        "restartPolicy",
        "parallelism",  # in prefect-kubernetes' default template (ignored by the API)
        "completions",
        "activeDeadlineSeconds",
        "terminationGracePeriodSeconds",
        "nodeSelector",
        "affinity",
        "tolerations",
        "topologySpreadConstraints",
        "priorityClassName",
        "priority",
        "preemptionPolicy",
        "schedulerName",
        "schedulingGates",
        "dnsPolicy",
        "dnsConfig",
        "hostname",
        "subdomain",
        "setHostnameAsFQDN",
        "hostAliases",
        "imagePullSecrets",
        "enableServiceLinks",
        "automountServiceAccountToken",
        "readinessGates",
        "os",
        "overhead",
        "resources",
    }
)
_POD_SPEC_READ = frozenset(
    {
        "containers",
        "initContainers",
        "ephemeralContainers",
        "volumes",
        "securityContext",
        "serviceAccountName",
        "serviceAccount",
        "hostNetwork",
        "hostPID",
        "hostIPC",
        "hostUsers",
    }
)
_CONTAINER_INERT = frozenset(
    {
        "name",
        "imagePullPolicy",
        "env",
        "envFrom",
        "ports",
        "volumeMounts",
        "livenessProbe",
        "readinessProbe",
        "startupProbe",
        "lifecycle",
        "terminationMessagePath",
        "terminationMessagePolicy",
        "stdin",
        "stdinOnce",
        "tty",
        "restartPolicy",
        "resizePolicy",
        "targetContainerName",
    }
)
_CONTAINER_READ = frozenset(
    {"image", "command", "args", "workingDir", "securityContext", "resources", "volumeDevices"}
)
_SECURITY_INERT = frozenset(
    {
        "runAsGroup",
        "readOnlyRootFilesystem",
        "fsGroup",
        "fsGroupChangePolicy",
        "supplementalGroups",
        "supplementalGroupsPolicy",
        "windowsOptions",
        "seLinuxChangePolicy",
    }
)
_SECURITY_READ = frozenset(
    {
        "privileged",
        "allowPrivilegeEscalation",
        "capabilities",
        "runAsUser",
        "runAsNonRoot",
        "seccompProfile",
        "appArmorProfile",
        "seLinuxOptions",
        "procMount",
        "sysctls",
    }
)
_ROLES = (
    ("containers", "container"),
    ("initContainers", "init"),
    ("ephemeralContainers", "ephemeral"),
)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _unknown(fields: Mapping[str, Any], known: Iterable[frozenset[str]], where: str) -> list[str]:
    names = frozenset().union(*known)
    return [f"{where}.{key}" for key in fields if key not in names]


def _security(
    context: Mapping[str, Any], where: str
) -> tuple[dict[str, Any], list[str], list[str]]:
    """A securityContext's settings that matter, confinement turned off, and unknowns."""
    read: dict[str, Any] = {}
    unconfined: list[str] = []
    odd = _unknown(context, (_SECURITY_INERT, _SECURITY_READ), where)
    for key in ("privileged", "allowPrivilegeEscalation", "runAsUser", "runAsNonRoot"):
        if context.get(key) is not None:
            read[key] = context[key]
    capabilities = _mapping(context.get("capabilities"))
    odd += _unknown(capabilities, (frozenset({"add", "drop"}),), f"{where}.capabilities")
    added = capabilities.get("add")
    if added:
        read["add"] = added if isinstance(added, (list, tuple)) else [added]
    for key, name in (("seccompProfile", "seccomp"), ("appArmorProfile", "apparmor")):
        profile = _mapping(context.get(key))
        if str(profile.get("type", "")).lower() == "unconfined":
            read.setdefault("unconfined", []).append(name)
    if str(context.get("procMount", "Default")) != "Default":
        read.setdefault("unconfined", []).append("procmount")
    if context.get("sysctls"):  # unsafe ones need the kubelet's leave, yet: visible
        odd.append(f"{where}.sysctls")
    if _true(_mapping(context.get("windowsOptions")).get("hostProcess")):
        read["privileged"] = True  # a Windows host process: the node's own privileges
    if _mapping(context.get("seLinuxOptions")).get("type") in ("spc_t", "unconfined_t"):
        read.setdefault("unconfined", []).append("selinux")
    unconfined += read.pop("unconfined", [])
    return read, unconfined, odd


def _quantities(value: Any) -> dict[str, str]:
    """Resource quantities that are set (the default template leaves them null)."""
    return {str(k): str(v) for k, v in _mapping(value).items() if v not in (None, "")}


def _unconfined_by_annotation(manifest: Mapping[str, Any]) -> list[str]:
    """The annotations that turned AppArmor or seccomp off before their fields existed
    (``container.apparmor.security.beta.kubernetes.io/<name>: unconfined``, the seccomp
    alpha ones): applied to every container, as the pod's own setting would be."""
    template = _mapping(_mapping(manifest.get("spec")).get("template"))
    annotations = _mapping(_mapping(template.get("metadata")).get("annotations"))
    found = []
    for key, value in annotations.items():
        if str(value).lower() != "unconfined":
            continue
        if "apparmor.security.beta.kubernetes.io" in str(key):
            found.append("apparmor")
        elif "seccomp.security.alpha.kubernetes.io" in str(key):
            found.append("seccomp")
    return found


def _pod_spec(manifest: Mapping[str, Any], unrecognized: list[str]) -> Mapping[str, Any]:
    kind = manifest.get("kind")
    if kind not in (None, "Job"):
        unrecognized.append(f"kind={kind}")
    spec = _mapping(manifest.get("spec"))
    unrecognized += _unknown(spec, (_JOB_SPEC,), "spec")
    template = _mapping(spec.get("template"))
    unrecognized += _unknown(template, (frozenset({"metadata", "spec"}),), "spec.template")
    return _mapping(template.get("spec"))


def kubernetes_infrastructure(
    job_manifest: Mapping[str, Any], namespace: str | None, env: Mapping[str, str | None]
) -> Infrastructure:
    """A Kubernetes run from its prepared Job manifest and the namespace the worker
    creates it in: every container, initContainer and ephemeral container with the
    pod's security context applied, hostPath volumes, host namespaces, the service
    account. Fields not known (or known to widen privileges in ways not modelled, such
    as sysctls) are listed in ``unrecognized``."""
    unrecognized: list[str] = []
    pod = _pod_spec(job_manifest, unrecognized)
    where = "spec.template.spec"
    unrecognized += _unknown(pod, (_POD_SPEC_INERT, _POD_SPEC_READ), where)
    pod_security, pod_unconfined, odd = _security(
        _mapping(pod.get("securityContext")), f"{where}.securityContext"
    )
    unrecognized += odd
    if not isinstance(pod.get("hostUsers"), (bool, type(None))):  # true is the default
        unrecognized.append(f"{where}.hostUsers")
    pod_unconfined += _unconfined_by_annotation(job_manifest)

    mounts: list[Mount] = []
    host_paths: list[str] = []
    volumes = pod.get("volumes") or []
    for index, volume in enumerate(volumes if isinstance(volumes, list) else [volumes]):
        volume = _mapping(volume)
        kinds = [key for key in volume if key != "name"]
        if "hostPath" in volume:
            path = _host_path(str(_mapping(volume["hostPath"]).get("path", "")))
            mounts.append(Mount(type="hostPath", source=path, target=None))
            host_paths.append(path)
        elif len(kinds) == 1:
            mounts.append(Mount(type=kinds[0], source=str(volume.get("name") or "") or None))
        else:
            unrecognized.append(f"{where}.volumes[{index}]")

    containers: list[Container] = []
    env_names = _names(env)
    for field, role in _ROLES:
        listed = pod.get(field) or []
        for index, raw in enumerate(listed if isinstance(listed, list) else [listed]):
            here = f"{where}.{field}[{index}]"
            item = _mapping(raw)
            unrecognized += _unknown(item, (_CONTAINER_INERT, _CONTAINER_READ), here)
            own, own_unconfined, odd = _security(
                _mapping(item.get("securityContext")), f"{here}.securityContext"
            )
            unrecognized += odd
            settings = {**pod_security, **own}
            added = own.get("add") or []
            privileged = _true(settings.get("privileged"))
            escalation = settings.get("allowPrivilegeEscalation")
            resources = _mapping(item.get("resources"))
            command = [*(_command(item.get("command")) or []), *(_command(item.get("args")) or [])]
            if item.get("volumeDevices"):  # raw block devices: not modelled, so visible
                unrecognized.append(f"{here}.volumeDevices")
            env_names |= _names(item.get("env"))
            containers.append(
                Container(
                    name=str(item["name"]) if item.get("name") else None,
                    role=role,
                    image=_image(item.get("image")),
                    privileged=privileged,
                    allow_privilege_escalation=None if escalation is None else _true(escalation),
                    capabilities_added=_unique(_capability(c) for c in added),
                    unconfined=_unique([*pod_unconfined, *own_unconfined]),
                    run_as_user=_int(settings.get("runAsUser")),
                    run_as_non_root=(
                        None
                        if settings.get("runAsNonRoot") is None
                        else _true(settings["runAsNonRoot"])
                    ),
                    command=command or None,
                    working_dir=str(item["workingDir"]) if item.get("workingDir") else None,
                    limits=_quantities(resources.get("limits")),
                    requests=_quantities(resources.get("requests")),
                )
            )

    metadata = _mapping(job_manifest.get("metadata"))
    where_created = namespace or metadata.get("namespace") or "default"
    if metadata.get("namespace") and metadata["namespace"] != where_created:
        unrecognized.append(f"metadata.namespace={metadata['namespace']}")
    account = pod.get("serviceAccountName") or pod.get("serviceAccount") or "default"
    if pod.get("serviceAccount") and pod.get("serviceAccount") != account:
        unrecognized.append(f"{where}.serviceAccount={pod['serviceAccount']}")
    return Infrastructure(
        kind="kubernetes",
        containers=containers,
        mounts=mounts,
        host_paths=_unique(host_paths),
        host_network=_true(pod.get("hostNetwork")),
        host_pid=_true(pod.get("hostPID")),
        host_ipc=_true(pod.get("hostIPC")),
        namespace=str(where_created),
        service_account=str(account),
        env_names=_unique(env_names),
        unrecognized=_unique(unrecognized),
    )


def job_infrastructure(job: Mapping[str, Any]) -> Infrastructure:
    """Any prepared job configuration (``model_dump()``), by its shape: a Kubernetes job
    has a ``job_manifest``, a Docker one an ``image``, a process one neither (for tools
    that hold a configuration of a type they do not know, such as ``decide``)."""
    raw_env = job.get("env")
    env: Mapping[str, str | None] = raw_env if isinstance(raw_env, Mapping) else {}
    if "job_manifest" in job:
        manifest = job["job_manifest"] if isinstance(job["job_manifest"], Mapping) else {}
        namespace = job.get("namespace")
        return kubernetes_infrastructure(manifest, str(namespace) if namespace else None, env)
    if "image" in job:
        return docker_infrastructure(job)
    command, working_dir = job.get("command"), job.get("working_dir")
    return process_infrastructure(
        str(command) if command is not None else None,
        str(working_dir) if working_dir is not None else None,
        env,
    )
