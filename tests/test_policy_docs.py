"""Every worked example in policies/README.md runs as written.

A ```console block holds commands (lines starting with `$ `, continued by a
trailing backslash or a here-document) each followed by lines its output must
contain. Blocks run in order, in a scratch copy of policies/, with
`prefect-governance` and `opa` on the PATH.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import POLICIES, ROOT

DOC = POLICIES / "README.md"
BLOCK = re.compile(r"```console\n(.*?)```", re.S)
HEREDOC = re.compile(r"<<-?\s*'?(\w+)'?")


def examples() -> list[list[tuple[str, list[str]]]]:
    """The console blocks: each a list of (command, expected output lines)."""
    blocks = []
    for body in BLOCK.findall(DOC.read_text()):
        steps: list[tuple[list[str], list[str]]] = []
        until: str | None = None  # the end word of an open here-document
        for line in body.splitlines():
            if until is not None:
                steps[-1][0].append(line)
                until = None if line == until else until
            elif line.startswith("$ "):
                steps.append(([line[2:]], []))
                heredoc = HEREDOC.search(line)
                until = heredoc.group(1) if heredoc else None
            elif steps and steps[-1][0][-1].endswith("\\") and not steps[-1][1]:
                steps[-1][0].append(line)  # a command continued on the next line
            elif steps and line.strip():
                steps[-1][1].append(line.strip())
        blocks.append([("\n".join(command), expected) for command, expected in steps])
    return blocks


def test_the_docs_have_worked_examples():
    assert len(examples()) >= 3


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, opa_bin) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("docs")
    shutil.copytree(POLICIES, root / "policies")
    shutil.copytree(ROOT / "blocks", root / "blocks")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "prefect-governance").write_text(
        f'#!/bin/sh\nexec "{sys.executable}" -m prefect_governance.cli "$@"\n'
    )
    (bin_dir / "prefect-governance").chmod(0o755)
    (bin_dir / "opa").symlink_to(opa_bin)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return root, env


@pytest.mark.parametrize("index", range(len(examples())))
def test_worked_example_runs_as_written(scratch, index):
    root, env = scratch
    for command, expected in examples()[index]:
        run = subprocess.run(
            ["bash", "-c", command], cwd=root, env=env, capture_output=True, text=True, timeout=120
        )
        output = run.stdout + run.stderr
        for line in expected:
            assert line in output, f"$ {command}\n--- expected line:\n{line}\n--- got:\n{output}"
