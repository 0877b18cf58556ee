"""The lint and type gate: ruff (lint and format) and mypy over the package, as pyproject.toml configures
them. Zero findings, or the suite fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "components/src/epdserve"


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", PACKAGE],
        ["ruff", "format", "--check", PACKAGE],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_no_findings(command):
    done = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}{done.stderr}"
