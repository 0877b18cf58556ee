"""Find the processes a test or benchmark started, by a tag in their environment.

A launch script's children run in their own sessions; tagging the environment of the script
lets the caller find and kill every one of them by PID, even after the script itself died.
"""

from __future__ import annotations

import os
from pathlib import Path


def tagged_pids(var: str, tag: str) -> list[int]:
    """PIDs of live processes (not this one) whose environment has `var=tag`."""
    needle = f"{var}={tag}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def pid_with_arg(var: str, tag: str, arg: str) -> int:
    """The PID of the tagged process whose command line has the argument `arg`."""
    for pid in tagged_pids(var, tag):
        try:
            if arg.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                return pid
        except OSError:
            continue
    raise LookupError(f"no process tagged {var}={tag} with {arg}")
