"""Build the embedded engine: OPA's Go SDK as a C shared library (``native/``).

Everything else is declared in pyproject.toml. ``pip install`` from source needs
Go (the version ``native/go.mod`` names, or newer) and a C compiler (cgo); a
wheel carries the built library, so installing one needs neither. The recipe is
``native/build.sh``; PREFECT_GOVERNANCE_PREBUILT_ENGINE names a library it built
elsewhere, to ship instead of building here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
NATIVE = ROOT / "native"
POLICIES = ROOT / "policies"
LIBRARY = "libgovrego.dylib" if sys.platform == "darwin" else "libgovrego.so"


# An editable install maps policies/ into the package (pyproject.toml's package-dir),
# which setuptools warns about at length on every `make install`: it is meant.
warnings.filterwarnings("ignore", message="Editable installation")


class GoLibrary(Extension):
    """A shared library built by ``go build -buildmode=c-shared`` (not a Python module)."""

    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = source_dir


class build_go(build_ext):
    """Build each GoLibrary with the Go toolchain; plain extensions as usual."""

    def get_ext_filename(self, fullname: str) -> str:
        ext = self.ext_map.get(fullname)
        if isinstance(ext, GoLibrary):
            return os.path.join(*fullname.split(".")[:-1], LIBRARY)
        return super().get_ext_filename(fullname)

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, GoLibrary):
            super().build_extension(ext)
            return
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        prebuilt = os.environ.get("PREFECT_GOVERNANCE_PREBUILT_ENGINE")
        if prebuilt:  # built by native/build.sh elsewhere (the Dockerfile's first stage)
            shutil.copyfile(prebuilt, output)
            return
        if shutil.which("go") is None:
            sys.exit(
                "prefect-governance: building from source needs Go (see native/go.mod for the "
                "version) for the embedded policy engine; install Go, or install a wheel."
            )
        subprocess.run(["sh", str(ext.source_dir / "build.sh"), str(output)], check=True)


def policy_packages() -> list[str]:
    """Each directory of the policy library, as the package its data files ship in."""
    dirs = [POLICIES, *(p for p in sorted(POLICIES.rglob("*")) if p.is_dir())]
    names = (".".join(d.relative_to(POLICIES).parts) for d in dirs if "__pycache__" not in d.parts)
    return ["prefect_governance.policies" + (f".{name}" if name else "") for name in names]


setup(
    packages=find_packages(include=["prefect_governance", "prefect_governance.*"])
    + policy_packages(),
    ext_modules=[GoLibrary("prefect_governance.core.engines.libgovrego", NATIVE)],
    cmdclass={"build_ext": build_go},
)
