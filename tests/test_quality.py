"""The tooling configured in pyproject.toml passes: ruff (lint + format), mypy strict and the
layer contracts of import-linter (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))
# A bound against a hang, not a speed check: a cold mypy on a fresh clone took longer than the suite's
# 120 s per test on two cores at a load of 30 (the ninth session's first CI); about a minute quiet.
TOOL_TIMEOUT = 1200


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "ruff", "check", "."],
        [sys.executable, "-m", "ruff", "format", "--check", "."],
        [sys.executable, "-m", "mypy"],
        [LINT_IMPORTS, "--no-cache"],
    ],
    ids=["ruff-check", "ruff-format", "mypy", "layers"],
)
@pytest.mark.timeout(TOOL_TIMEOUT)
def test_tooling_is_clean(command: list[str]) -> None:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "line", "expected"),
    [
        ("core/errors.py", "import imcli.cli.app", "imcli.core is not allowed to import imcli.cli"),
        ("broker/limits.py", "import imcli.archive.store", "imcli.broker is not allowed to import imcli.archive"),
        ("client/send.py", "import imcli.serve.host", "imcli.client is not allowed to import imcli.serve"),
    ],
)
@pytest.mark.timeout(TOOL_TIMEOUT)
def test_the_layer_contract_fails_on_an_upward_or_sideways_import(
    tmp_path: Path, module: str, line: str, expected: str
) -> None:
    """The contract can fail: the same check on a copy of the package with one bad import added."""
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "imcli", copy / "imcli", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    target = copy / "imcli" / module
    target.write_text(target.read_text() + f"\n{line}  # the import the contract forbids\n")
    result = subprocess.run(
        [LINT_IMPORTS, "--no-cache"],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        check=False,
        env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0, result.stdout
    assert expected in result.stdout, result.stdout


def test_installing_claims_one_import_name() -> None:
    """The distribution puts only ``imcli`` into site-packages: no ``broker``, ``groups`` or
    ``archive`` of its own to collide with another distribution's (issue 14)."""
    from importlib.metadata import distribution

    top_level = distribution("imcli").read_text("top_level.txt")
    assert top_level is not None and top_level.split() == ["imcli"]
