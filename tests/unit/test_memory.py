"""utils.memory: serving processes keep freed memory instead of faulting it in again."""

import subprocess
import sys

PROBE = """
import sys, torch
from epdserve.utils.memory import keep_freed_memory

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = rss_mib()
block = torch.ones(5 << 20)   # 20 MiB, every page written
del block
print(rss_mib() - before)
"""


def _rss_growth_after_free(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def test_freed_blocks_stay_resident_for_reuse():
    assert _rss_growth_after_free("keep") > 15       # kept in malloc's heap, pages resident
    assert _rss_growth_after_free("default") < 5     # glibc unmaps a block this big on free
