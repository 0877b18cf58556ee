"""The lint and type gate's commands, run in the background from the start of the session.

mypy takes ~20 s from a cold cache (a clean clone): started once the tests are collected, it runs
while the cluster tests wait on their processes, and `tests/unit/test_lint.py` collects its result."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "components/src/epdserve"
LINT_RUNS = pytest.StashKey["LintRuns"]()
COMMANDS = {
    "ruff-check": ["ruff", "check", PACKAGE],
    "ruff-format": ["ruff", "format", "--check", PACKAGE],
    "mypy": ["mypy"],
}


class LintRuns:
    """Every command started at once; `result(name)` waits for one: (exit code, its output)."""

    def __init__(self) -> None:
        self._procs = {
            name: subprocess.Popen(
                [sys.executable, "-m", *command], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            for name, command in COMMANDS.items()
        }

    def result(self, name: str) -> tuple[int, str]:
        output, _ = self._procs[name].communicate()
        return self._procs[name].returncode, output

    def close(self) -> None:
        """Stop whatever still runs (a session that ended before the gate's tests ran)."""
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
