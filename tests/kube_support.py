"""A real single-node Kubernetes for the tests: ``scripts/kubernetes/cluster.sh``.

The session fixture ``kube_cluster`` builds the binaries if the cache lacks them
(``scripts/kubernetes/build.sh``, minutes from an empty cache), starts etcd, the API
server, the controller manager, the scheduler, a containerd of its own and the kubelet
on loopback, once per session, and stops them at the end. Outside CI a cluster that
cannot come up skips the tests that need it; with CI=true it fails them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts" / "kubernetes"
IN_CI = os.environ.get("CI", "").lower() == "true"


def _missing(part: str) -> None:
    message = f"{part} is not available"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: real parts are required, not skipped)")
    pytest.skip(message)


@dataclass
class KubeCluster:
    """A running cluster: its directory, kubeconfig and the API server's loopback URL."""

    dir: Path
    kubeconfig: Path
    server: str
    bin: Path
    ready_seconds: float

    def kubectl(self, *args: str, check: bool = True, input: bytes | None = None) -> str:
        done = subprocess.run(
            [str(self.bin / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            check=False,
        )
        if check and done.returncode:
            raise RuntimeError(f"kubectl {' '.join(args)}: {done.stderr.decode()}")
        return done.stdout.decode()

    def get(self, *args: str) -> dict[str, Any]:
        """``kubectl get ... -o json``, parsed."""
        return yaml.safe_load(self.kubectl("get", *args, "-o", "json"))

    def import_image(self, image: str) -> None:
        """Give the node a local Docker image (``docker save`` into its containerd, unless
        the node's image store holds that very image already)."""
        subprocess.run(
            ["bash", str(SCRIPTS / "cluster.sh"), "import", str(self.dir), f"docker:{image}"],
            check=True,
            capture_output=True,
        )

    def in_cluster_env(self) -> dict[str, str]:
        """What a client in a pod needs to reach the API server on loopback (never the
        ``kubernetes`` service's address, in the service range nothing may connect to)."""
        host, _, port = self.server.removeprefix("https://").rpartition(":")
        return {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port}

    def wait(self, condition: Any, timeout: float = 120, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.5)
        raise AssertionError(f"{what} not met in {timeout} s")


def start_cluster(images: tuple[str, ...] = ()) -> KubeCluster:
    """Start a cluster in a fresh short directory (containerd's sockets live there)."""
    if shutil.which("containerd") is None:
        _missing("containerd (apt-get install containerd) for the Kubernetes node")
    directory = Path(tempfile.mkdtemp(prefix="k8s-", dir="/tmp"))
    started = time.monotonic()
    done = subprocess.run(
        ["bash", str(SCRIPTS / "cluster.sh"), "up", str(directory), *images],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        stop_cluster(directory)
        _missing(f"a local Kubernetes cluster ({done.stderr.strip()[-2000:]})")
    kubeconfig = Path(done.stdout.strip().splitlines()[-1])
    config = yaml.safe_load(kubeconfig.read_text())
    bin_dir = subprocess.run(
        ["bash", str(SCRIPTS / "build.sh")], capture_output=True, text=True, check=True
    ).stdout.strip()
    return KubeCluster(
        dir=directory,
        kubeconfig=kubeconfig,
        server=config["clusters"][0]["cluster"]["server"],
        bin=Path(bin_dir),
        ready_seconds=time.monotonic() - started,
    )


def stop_cluster(directory: Path) -> None:
    subprocess.run(
        ["bash", str(SCRIPTS / "cluster.sh"), "down", str(directory)],
        capture_output=True,
        check=False,
        timeout=120,
    )
    prefix = f"{directory}/"
    mounts = Path("/proc/self/mounts").read_text().split("\n")
    if not any(f" {prefix}" in line or f" {directory} " in line for line in mounts):
        shutil.rmtree(directory, ignore_errors=True)  # never through a mount left behind


# The project's image (Python, Prefect and this package), built by scripts/docker.sh on a
# locally made base; the flow runs' pods start from it.
FLOW_IMAGE_ENV = "PREFECT_GOVERNANCE_FLOW_IMAGE"


@pytest.fixture(scope="session")
def flow_image() -> str:
    """The image the flow-run pods use: $PREFECT_GOVERNANCE_FLOW_IMAGE, or the project's
    image that ``scripts/docker.sh daemon base image`` builds (needs a Docker engine)."""
    if os.environ.get(FLOW_IMAGE_ENV):
        return os.environ[FLOW_IMAGE_ENV]
    script = ROOT / "scripts" / "docker.sh"
    if not script.exists():
        _missing("scripts/docker.sh (the project's image for the pods)")
    done = subprocess.run(
        ["bash", str(script), "daemon", "base", "image"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        _missing(f"the project's image ({done.stderr.strip()[-2000:]})")
    from prefect_governance import __version__

    return f"prefect-governance:{__version__}"


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[KubeCluster]:
    """One real single-node cluster for the session."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        stop_cluster(cluster.dir)
