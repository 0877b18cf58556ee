"""The machine a benchmark ran on: cores, versions, load, peak RSS, and a GEMM probe of its
speed right now; and `run_parts`, which wraps a benchmark's parts into a report with it."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _proc_kib(path: str, key: str) -> float:
    """The `key:  N kB` value of a /proc file such as /proc/<pid>/status or /proc/meminfo."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1])
    raise KeyError(f"{key} not in {path}")


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not permitted."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib(pid: int | str = "self") -> float:
    """Peak resident set size (VmHWM) of `pid` in MiB."""
    return _proc_kib(f"/proc/{pid}/status", "VmHWM") / 1024


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, memory, versions and load: what the numbers depend on."""
    import torch
    import transformers
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {
        "cores": os.cpu_count(), "cpu": cpu, "mem_total_gib": round(_proc_kib("/proc/meminfo", "MemTotal") / 2**20, 1),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__, "python": sys.version.split()[0],
        "platform": platform.platform(), "loadavg_at_start": os.getloadavg(),
    }


def run_parts(config: dict[str, Any], parts: dict[str, Callable[[], dict[str, Any]]]) -> dict[str, Any]:
    """A report of `config`, the machine, and each part's results and wall seconds, the parts
    run in order."""
    report: dict[str, Any] = {"config": config, "machine": machine_info(), "results": {}, "wall_s": {}}
    start = time.perf_counter()
    for part, run in parts.items():
        part_start = time.perf_counter()
        report["results"][part] = run()
        report["wall_s"][part] = time.perf_counter() - part_start
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    report["total_wall_s"] = time.perf_counter() - start
    return report


def machine_line(report: dict[str, Any]) -> str:
    """The report's machine, its load and where the time went, as one Markdown line."""
    mach = report["machine"]
    return (f"Machine: {mach['cores']} cores ({mach['cpu']}), torch {mach['torch']} "
            f"(threads: {mach['torch_threads']}); "
            f"load average {mach['loadavg_at_start'][0]:.2f} at start, {mach['loadavg_at_end'][0]:.2f} at end; "
            f"total {report['total_wall_s']:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in report["wall_s"].items())
            + ").")


PROBE_SHAPE = (256, 512, 1376)   # rows, in, out: one of the bench model's prompt-chunk GEMMs


def gemm_probe_gflops(seconds: float = 1.0) -> float:
    """This machine's float32 GEMM rate right now, on one thread: a shared VM's speed drifts,
    and this, taken before each mode at each level, shows by how much during a run."""
    import torch
    rows, k, n = PROBE_SHAPE
    x, w = torch.randn(rows, k), torch.randn(n, k)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.mm(x, w.T)
            calls += 1
        return 2 * rows * k * n * calls / (time.perf_counter() - start) / 1e9
    finally:
        torch.set_num_threads(threads)
