"""The container worker: Dockerfile, docker-compose.yml and deploy/kubernetes/.

No Docker engine runs here, so the files are linted (hadolint), validated against their
schemas (compose spec, Kubernetes OpenAPI) and checked for structure; and the parts that
can run without a container do run for real: the image's entrypoint and healthcheck
against a Prefect server, OPA with the compose and pod arguments and the authz policy,
and the PostgreSQL init script.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from prefect_governance.cli.local import free_port, prefect_env, spawn, stop, wait_http
from tests.conftest import ROOT, Postgres, _pg_bindir, missing
from tests.conftest import own_postgres as scratch_postgres

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: prefect depends on `toml`, same loads()
    import toml as tomllib

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "kubernetes"
CONSTRAINTS = ROOT / "deploy" / "constraints.txt"
EXAMPLES = ROOT / "policies" / "examples"
DECISION = "v1/data/prefect/governance/decision?strict-builtin-errors=true"
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|KEY|AUTH|CREDENTIAL|LINEAGE_URL", re.IGNORECASE)
VAR_REF = re.compile(r"\$\{[A-Z_][A-Z0-9_]*(?::?[-?][^}]*)?\}")


# --- reading the files -------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    pairs = []
    for line in logical:
        word, _, rest = line.strip().partition(" ")
        pairs.append((word.upper(), rest.strip()))
    return pairs


def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def last(instruction: str) -> str:
    found = [args for name, args in dockerfile() if name == instruction]
    assert found, f"the Dockerfile has no {instruction}"
    return found[-1]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not the exec (JSON) form: {args}"
    return value


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for name, args in dockerfile():
        if name == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def healthcheck_command() -> list[str]:
    args = last("HEALTHCHECK")
    assert " CMD " in f" {args} ", f"HEALTHCHECK without CMD: {args}"
    return exec_form(args[args.index("CMD") + 3 :].strip())


def image_command() -> list[str]:
    return exec_form(last("ENTRYPOINT")) + exec_form(last("CMD"))


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    return services[name]


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: str(value) for key, value in env.items()}


def pod() -> dict[str, Any]:
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    assert deployment["kind"] == "Deployment"
    return deployment["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    # A native sidecar (an init container with restartPolicy Always) counts too.
    sidecars = [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    return {c["name"]: c for c in [*spec["containers"], *sidecars]}


def opa_container(spec: dict[str, Any]) -> dict[str, Any]:
    found = [c for c in containers(spec).values() if c["image"].startswith("openpolicyagent/opa:")]
    assert len(found) == 1, "the pod needs exactly one OPA sidecar container"
    return found[0]


def flag(args: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    assert len(values) == 1, f"expected one {name}=... in {args}"
    return values[0]


def tool(name: str) -> str:
    """A linter installed in the venv (or on PATH); missing() if it is not."""
    for candidate in (Path(sys.executable).parent / name, shutil.which(name)):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    missing(f"{name} (pip install it into the venv)")
    raise AssertionError  # unreachable: missing() skips or fails


# --- the Dockerfile ----------------------------------------------------------------------


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def build_args() -> dict[str, str]:
    """The Dockerfile's build arguments and their defaults."""
    return dict(args.partition("=")[::2] for name, args in dockerfile() if name == "ARG")


def test_base_image_is_pinned_by_patch_tag_and_digest() -> None:
    assert last("FROM").split()[0] == "${BASE_IMAGE}"
    base = build_args()["BASE_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+@sha256:[0-9a-f]{64}", base), base


def test_engine_comes_from_the_go_stage_unless_a_wheelhouse_is_asked_for() -> None:
    """Upstream (the default) builds the engine with Go; ENGINE=wheelhouse (scripts/docker.sh)
    needs no Go image and no network: every wheel comes from build/wheelhouse."""
    assert build_args()["ENGINE"] == "go"
    stages = {args.split()[-1]: args.split()[0] for name, args in dockerfile() if name == "FROM"}
    assert stages["engine-go"].startswith("golang:1.26.")
    assert stages["engine-wheelhouse"] == "scratch"
    assert stages["engine"] == "engine-${ENGINE}"
    install = " ".join(args for name, args in dockerfile() if name == "RUN")
    assert install.count("pip install --no-index --find-links") == 2
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "!build/wheelhouse" in ignored and "build/" not in ignored


def test_image_runs_as_a_numeric_non_root_user() -> None:
    user = last("USER")
    uid, _, gid = user.partition(":")
    # Numeric, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
    assert uid.isdigit() and int(uid) != 0, user
    assert not gid or (gid.isdigit() and int(gid) != 0), user
    names = [name for name, _ in dockerfile()]
    assert names.index("USER") > max(i for i, n in enumerate(names) if n == "RUN")


def test_image_starts_a_governed_worker_on_the_pool_from_the_environment() -> None:
    command = image_command()
    script = " ".join(command)
    assert "prefect worker start" in script
    assert "--type governed-process" in script
    assert '--pool "$PREFECT_WORK_POOL"' in script
    assert "--with-healthcheck" in script
    assert dockerfile_env()["PREFECT_WORK_POOL"] == "governed"


def test_healthcheck_asks_the_worker_health_endpoint() -> None:
    command = healthcheck_command()
    assert "/health" in " ".join(command)
    assert "PREFECT_WORKER_WEBSERVER_PORT" in " ".join(command)
    assert dockerfile_env()["PREFECT_WORKER_WEBSERVER_PORT"].isdigit()


def test_opa_is_not_inside_the_worker_image() -> None:
    text = " ".join(args for name, args in dockerfile() if name in ("FROM", "RUN", "COPY", "ADD"))
    assert "openpolicyagent" not in text
    assert not re.search(r"\bopa\b", text), "OPA runs beside the worker, not in its image"


def test_image_installs_the_pinned_dependencies_that_pyproject_allows() -> None:
    install = " ".join(args for name, args in dockerfile() if name == "RUN")
    assert "pip install --constraint deploy/constraints.txt '.[postgres]'" in install
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"not an exact pin: {line}"
            pins[canonicalize_name(name)] = version.strip()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["postgres"]]
    for text in wanted:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not pinned in {CONSTRAINTS.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{CONSTRAINTS.name} pins {name}=={pins[name]}, pyproject.toml wants {text}"
        )
        for extra in requirement.extras:  # psycopg[binary] -> psycopg-binary
            assert canonicalize_name(f"{name}-{extra}") in pins, f"{name}[{extra}] not pinned"


# --- docker-compose.yml ------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_spec() -> None:
    result = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_has_server_database_opa_and_worker_with_health_gates() -> None:
    services = compose()["services"]
    assert {"postgres", "prefect-server", "opa", "worker"} <= set(services)
    for name in ("postgres", "prefect-server", "opa"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    worker = services["worker"]
    assert worker["depends_on"] == {
        name: {"condition": "service_healthy"} for name in ("postgres", "prefect-server", "opa")
    }
    assert not worker.get("healthcheck", {}).get("disable"), "the image's HEALTHCHECK is kept"
    server_db = environment(services["prefect-server"])
    assert server_db["PREFECT_SERVER_DATABASE_HOST"] == "postgres"
    assert server_db["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"


def test_compose_worker_is_the_governed_image_pointed_at_opa_and_postgres() -> None:
    worker = service("worker")
    assert worker["build"]["dockerfile"] == "Dockerfile"
    assert "entrypoint" not in worker and "command" not in worker, "the image's command runs"
    env = environment(worker)
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    opa_port = flag(service("opa")["command"], "--addr").rsplit(":", 1)[1]
    assert env["PREFECT_GOVERNANCE_OPA_URL"] == f"http://opa:{opa_port}"
    assert env["PREFECT_GOVERNANCE_LINEAGE_URL"].startswith("postgresql+psycopg://lineage:")
    assert "@postgres:5432/lineage" in env["PREFECT_GOVERNANCE_LINEAGE_URL"]
    assert env["PREFECT_WORK_POOL"].startswith("${PREFECT_WORK_POOL")


def test_compose_opa_serves_the_policies_read_only() -> None:
    opa = service("opa")
    assert re.fullmatch(
        r"openpolicyagent/opa:\d+\.\d+\.\d+(-static)?(@sha256:[0-9a-f]{64})?", opa["image"]
    )
    command = opa["command"]
    assert command[:2] == ["run", "--server"]
    assert "--authorization=basic" in command and "--authentication=token" in command
    mounts = {volume.split(":")[0]: volume.split(":")[1:] for volume in opa["volumes"]}
    assert mounts["./policies"] == ["/policies", "ro"]
    assert mounts["./deploy/opa"] == ["/authz", "ro"]
    assert {"/policies", "/authz"} <= set(command)


def test_compose_databases_live_on_declared_volumes() -> None:
    document = compose()
    volumes = service("postgres")["volumes"]
    data = [v for v in volumes if v.split(":")[1] == "/var/lib/postgresql/data"]
    assert len(data) == 1
    assert data[0].split(":")[0] in document["volumes"], "a named volume, declared"


def test_compose_holds_no_secret_values() -> None:
    for name, svc in compose()["services"].items():
        for key, value in environment(svc).items():
            if SECRET_NAME.search(key):
                assert VAR_REF.search(value), f"{name}.{key} holds a literal secret"
                # Whatever a URL carries as its password must itself be a reference.
                for password in re.findall(r"://[^:/@]+:([^@]+)@", value):
                    assert VAR_REF.fullmatch(password), f"{name}.{key}: password in the URL"
                if "://" not in value:
                    assert VAR_REF.fullmatch(value), f"{name}.{key} is not only a reference"


def test_env_example_defines_every_required_variable() -> None:
    required = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*):\?", COMPOSE.read_text()))
    example = ROOT / ".env.example"
    defined = {
        line.split("=", 1)[0]
        for line in example.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert required and required <= defined, f"missing from .env.example: {required - defined}"


# --- deploy/kubernetes -------------------------------------------------------------------


def test_kubernetes_manifests_are_valid_for_kubernetes() -> None:
    for manifest in ("deployment.yaml", "serviceaccount.yaml"):
        result = subprocess.run(
            [tool("kubernetes-validate"), "--strict", "-k", "1.30.0", str(K8S / manifest)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert all((K8S / resource).is_file() for resource in kustomization["resources"])


def test_pod_runs_the_worker_with_an_opa_sidecar_on_localhost() -> None:
    spec = pod()
    worker = containers(spec)["worker"]
    opa = opa_container(spec)
    env = {e["name"]: e for e in worker["env"]}
    port = flag(opa["args"], "--addr")
    assert port.startswith("127.0.0.1:"), "OPA answers only inside the pod"
    assert env["PREFECT_GOVERNANCE_OPA_URL"]["value"] == f"http://{port}"
    assert env["PREFECT_WORK_POOL"]["value"]
    assert "--authorization=basic" in opa["args"]
    assert "--ignore=..*" in opa["args"], "a ConfigMap volume's hidden copies must be skipped"
    mount = next(m for m in opa["volumeMounts"] if m["mountPath"] in opa["args"])
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert mount["readOnly"] is True and volume["configMap"]["name"] == "governance-policies"


def test_pod_takes_its_secrets_from_a_secret() -> None:
    for container in containers(pod()).values():
        for env in container.get("env", []):
            if SECRET_NAME.search(env["name"]):
                assert "value" not in env, f"{container['name']}: {env['name']} is inline"
                assert env["valueFrom"]["secretKeyRef"]["name"] == "governance-worker"
    worker_env = {e["name"] for e in containers(pod())["worker"]["env"]}
    assert {"PREFECT_GOVERNANCE_LINEAGE_URL", "PREFECT_GOVERNANCE_OPA_TOKEN"} <= worker_env


def test_pod_runs_non_root_with_limits_and_probes() -> None:
    spec = pod()
    uid = int(last("USER").split(":")[0])
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == uid
    assert spec["automountServiceAccountToken"] is False
    account = yaml.safe_load((K8S / "serviceaccount.yaml").read_text())
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    for name, container in containers(spec).items():
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False, name
        assert security["capabilities"]["drop"] == ["ALL"], name
        assert security.get("runAsUser", uid) != 0, name
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
        assert {"cpu", "memory"} <= set(container["resources"]["limits"]), name
        assert container["livenessProbe"] and container["readinessProbe"], name
    worker_probe = containers(spec)["worker"]["livenessProbe"]["httpGet"]
    assert worker_probe["path"] == "/health"


# --- real parts: OPA as composed and as in the pod ---------------------------------------


def post(url: str, body: bytes | None, token: str | None, method: str = "POST") -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, None


def decide(base: str, example: str, token: str | None) -> tuple[int, Any]:
    body = json.dumps({"input": json.loads((EXAMPLES / example / "input.json").read_text())})
    return post(f"{base}/{DECISION}", body.encode(), token)


def assert_decisions_only_with_token(base: str, token: str) -> None:
    status, allowed = decide(base, "allowed", token)
    assert status == 200 and allowed["result"]["allow"] is True
    status, refused = decide(base, "refused-capability", token)
    assert status == 200 and refused["result"]["allow"] is False
    assert decide(base, "allowed", None)[0] == 401
    assert decide(base, "allowed", "not-the-token")[0] == 401
    # Nobody, not even with the token, may replace the policy or the data over the API.
    evil = b"package prefect.governance\n\ndecision := {}\n"
    assert post(f"{base}/v1/policies/evil", evil, token, "PUT")[0] == 401
    assert post(f"{base}/v1/data/prefect", b"{}", token, "PUT")[0] == 401
    assert decide(base, "refused-capability", token)[1]["result"]["allow"] is False


def test_opa_as_composed_decides_with_the_token_and_its_healthcheck_works(
    opa_bin: str, tmp_path: Path
) -> None:
    opa = service("opa")
    mounts = {v.split(":")[1]: str(ROOT / v.split(":")[0]) for v in opa["volumes"]}
    port = free_port()
    args = [
        f"--addr=127.0.0.1:{port}" if a.startswith("--addr=") else mounts.get(a, a)
        for a in opa["command"]
    ]
    token = uuid.uuid4().hex
    env = {**os.environ, "GOVERNANCE_OPA_TOKEN": token}
    healthcheck = [
        opa_bin if a == "/opa" else a.replace(":8181/", f":{port}/")
        for a in opa["healthcheck"]["test"][1:]
    ]
    assert subprocess.run(healthcheck, capture_output=True).returncode != 0, "nothing is up yet"
    process = spawn([opa_bin, *args], env, tmp_path / "opa.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 30, process)
        assert subprocess.run(healthcheck, capture_output=True).returncode == 0
        assert_decisions_only_with_token(f"http://127.0.0.1:{port}", token)
        # The worker's own OPA client, with the token as the worker sends it.
        from prefect_governance.core.engines.opa import OpaEngine

        async def ask() -> Any:
            engine = OpaEngine(f"http://127.0.0.1:{port}", token=token)
            try:
                example = json.loads((EXAMPLES / "allowed" / "input.json").read_text())
                return (await engine.evaluate("prefect/governance/decision", example)).result
            finally:
                await engine.aclose()

        assert asyncio.run(ask())["allow"] is True
    finally:
        stop(process)
    assert subprocess.run(healthcheck, capture_output=True).returncode != 0


def configmap_from_readme(target: Path) -> Path:
    """Lay out the ConfigMap that deploy/README.md's command creates, as the kubelet mounts
    it: the files in a hidden timestamped directory, `..data` and per-file symlinks."""
    text = (ROOT / "deploy" / "README.md").read_text()
    command = re.search(r"kubectl create configmap governance-policies[^\n]*(?:\\\n[^\n]*)*", text)
    assert command, "deploy/README.md shows how to create the governance-policies ConfigMap"
    sources = re.findall(r"--from-file=(\S+)", command.group(0))
    files: list[Path] = []
    for source in sources:
        path = ROOT / source
        files += sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    names = [f.name for f in files]
    assert len(names) == len(set(names)), f"ConfigMap keys collide: {names}"
    data = target / "..2026_01_01_00_00_00.000000001"
    data.mkdir(parents=True)
    for f in files:
        shutil.copy(f, data / f.name)
    (target / "..data").symlink_to(data.name)
    for name in names:
        (target / name).symlink_to(f"..data/{name}")
    return target


def test_opa_as_in_the_pod_loads_the_configmap_and_serves_probes(
    opa_bin: str, tmp_path: Path
) -> None:
    opa = opa_container(pod())
    policies = configmap_from_readme(tmp_path / "policies")
    port, diagnostic = free_port(), free_port()
    mount = next(m["mountPath"] for m in opa["volumeMounts"] if m["mountPath"] in opa["args"])

    def arguments(args: list[str]) -> list[str]:
        swap = {
            "--addr": f"--addr=127.0.0.1:{port}",
            "--diagnostic-addr": f"--diagnostic-addr=127.0.0.1:{diagnostic}",
        }
        return [swap.get(a.split("=")[0], str(policies) if a == mount else a) for a in args]

    token = uuid.uuid4().hex
    env = {**os.environ, "GOVERNANCE_OPA_TOKEN": token}
    # Without --ignore=..* OPA finds every module three times and does not start.
    naive = subprocess.run(
        [opa_bin, *[a for a in arguments(opa["args"]) if a != "--ignore=..*"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert naive.returncode != 0 and "..data" in naive.stdout + naive.stderr
    process = spawn([opa_bin, *arguments(opa["args"])], env, tmp_path / "opa.log")
    try:
        probe = opa["readinessProbe"]["httpGet"]["path"]
        wait_http(f"http://127.0.0.1:{diagnostic}{probe}", 30, process)
        assert_decisions_only_with_token(f"http://127.0.0.1:{port}", token)
    finally:
        stop(process)


# --- real parts: the image's command and healthcheck against a Prefect server ------------


def run_healthcheck(env: dict[str, str]) -> int:
    command = [sys.executable if a == "python" else a for a in healthcheck_command()]
    return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode


def test_image_command_starts_a_healthy_governed_worker(prefect_server, tmp_path: Path) -> None:
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    pool = f"container-{uuid.uuid4().hex[:8]}"
    env = prefect_env(
        tmp_path / "home",
        prefect_server.api_url,
        **{
            **dockerfile_env(),
            "PREFECT_HOME": str(tmp_path / "home"),
            "PREFECT_WORK_POOL": pool,
            "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1",
            "PREFECT_WORKER_WEBSERVER_PORT": str(free_port()),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        },
    )
    assert run_healthcheck(env) != 0, "no worker is up yet"
    process = spawn(image_command(), env, tmp_path / "worker.log")
    try:
        port = env["PREFECT_WORKER_WEBSERVER_PORT"]
        try:
            wait_http(f"http://127.0.0.1:{port}/health", 90, process)
        except Exception:
            pytest.fail((tmp_path / "worker.log").read_text()[-3000:])
        assert run_healthcheck(env) == 0

        async def polling_worker() -> tuple[str, list[str]]:
            """The pool's type and its workers, once the worker has created and polled it."""
            async with get_client() as client:
                for _ in range(120):
                    try:
                        found = await client.read_work_pool(pool)
                        workers = await client.read_workers_for_work_pool(pool)
                    except ObjectNotFound:
                        workers = []
                    if workers:
                        return found.type, [w.name for w in workers]
                    await asyncio.sleep(0.5)
            pytest.fail((tmp_path / "worker.log").read_text()[-3000:])

        pool_type, workers = asyncio.run(polling_worker())
        assert pool_type == "governed-process" and len(workers) == 1
        assert run_healthcheck(env) == 0
    finally:
        stop(process)
    assert run_healthcheck(env) != 0


# --- real parts: the PostgreSQL init script ----------------------------------------------


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[Postgres]:
    """A cluster of its own: the init script creates cluster-wide roles."""
    with scratch_postgres("governance-pg-compose-") as server:
        yield server


def test_postgres_init_script_makes_two_separate_databases(own_postgres: Postgres) -> None:
    from sqlalchemy import create_engine, text

    from prefect_governance.lineage.store import LineageStore

    env = {
        **os.environ,
        "PATH": f"{_pg_bindir()}{os.pathsep}{os.environ['PATH']}",
        "PGHOST": "127.0.0.1",
        "PGPORT": str(own_postgres.port),
        "POSTGRES_USER": "governance",
        "POSTGRES_DB": "postgres",
        "PREFECT_DB_PASSWORD": "pw-with-'quote",
        "LINEAGE_DB_PASSWORD": "another pw",
    }
    script = ROOT / "deploy" / "compose" / "postgres-init.sh"
    assert os.access(script, os.X_OK), "the postgres image runs (not sources) executable scripts"
    result = subprocess.run([str(script)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    admin = create_engine(own_postgres.url)
    try:
        with admin.connect() as connection:

            def ask(sql: str) -> Any:
                return connection.execute(text(sql)).scalar()

            assert (
                ask("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname='prefect'")
                == "prefect"
            )
            assert (
                ask("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname='lineage'")
                == "lineage"
            )
            assert ask("SELECT has_database_privilege('lineage', 'prefect', 'CONNECT')") is False
            assert ask("SELECT has_database_privilege('prefect', 'lineage', 'CONNECT')") is False
            assert ask("SELECT rolpassword IS NOT NULL FROM pg_authid WHERE rolname='prefect'")
    finally:
        admin.dispose()
    # The lineage role can create and use the lineage schema in its own database.
    store = LineageStore(f"postgresql+psycopg://lineage@127.0.0.1:{own_postgres.port}/lineage")
    try:
        assert store.verify() == []
    finally:
        store.engine.dispose()
