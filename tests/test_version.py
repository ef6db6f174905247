"""The version is written once, ``prefect_governance.__version__``; everything else reads it.

pyproject.toml takes it as setuptools dynamic metadata (read from the source, without
importing the package), so the installed metadata, a built wheel and the attribute
agree (the wheel is checked in test_native_engine, which builds it); the deployment
files name the image by it and are checked here.
"""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import prefect_governance

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: prefect depends on `toml`, same loads()
    import toml as tomllib

ROOT = Path(__file__).resolve().parent.parent
VERSION = prefect_governance.__version__


def test_the_installed_metadata_is_the_packages_version():
    assert version("prefect-governance") == VERSION
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc|\.dev|\.post)?\d*", VERSION), VERSION


def test_pyproject_reads_the_version_from_the_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "prefect_governance.__version__"}


def test_the_deployment_files_name_the_image_of_this_version():
    image_tags = {
        "Dockerfile": r"prefect-governance:(\S+?)\s",
        "docker-compose.yml": r"image: prefect-governance:(\S+)",
        "deploy/README.md": r"prefect-governance:(\d\S*?)\s",
        "deploy/kubernetes/deployment.yaml": r"image: prefect-governance:(\S+)",
        "deploy/kubernetes/kustomization.yaml": r"newTag: (\S+)",
    }
    for path, pattern in image_tags.items():
        found = re.findall(pattern, (ROOT / path).read_text())
        assert found, f"{path}: no image tag found"
        assert set(found) == {VERSION}, f"{path} names {found}, the package is {VERSION}"
