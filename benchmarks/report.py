"""Report writing: Markdown tables, the targets table, and `<name>.json` + `<name>.md`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Target:
    """One line of a report's targets table."""

    name: str
    goal: str
    measured: str
    holds: bool | None   # None: informational, no goal


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, followed by an empty line."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def targets_table(targets: list[dict[str, Any]]) -> list[str]:
    """The targets (as `asdict(Target)`) as a Markdown table: goal, measured, holds."""
    return table(["target", "goal", "measured", "holds"],
                 [[t["name"], t["goal"], t["measured"], {True: "yes", False: "**no**", None: "n/a"}[t["holds"]]]
                  for t in targets])


def write_report(out: Path, name: str, report: dict[str, Any], markdown: str) -> None:
    """`<name>.json` (raw numbers) and `<name>.md` (tables) into `out`; prints the tables."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
