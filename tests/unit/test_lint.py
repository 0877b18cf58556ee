"""The lint and type gate: ruff (lint and format) and mypy over the package, as pyproject.toml configures
them. Zero findings, or the suite fails. The commands start in the background once the session has
collected these tests (tests/conftest.py, support/lint.py)."""

from __future__ import annotations

import pytest

from support.lint import COMMANDS, LINT_RUNS


@pytest.mark.parametrize("name", list(COMMANDS))
def test_no_findings(name: str, request: pytest.FixtureRequest) -> None:
    code, output = request.config.stash[LINT_RUNS].result(name)
    assert code == 0, f"{' '.join(COMMANDS[name])}:\n{output}"
