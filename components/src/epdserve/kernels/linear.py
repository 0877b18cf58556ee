"""Float32 CPU linear layers through the fastest GEMM of this machine, chosen by timing.

Which GEMM wins depends on the CPU, the thread count and the row count, so nothing is
assumed: for each weight shape, every candidate is timed once at load, on cold caches, on
a few-row input (a decode step) and on a many-row one (a prompt chunk), and each kind of
call then takes its winner. Candidates: the module itself (MKL's sgemm), oneDNN on a weight
reordered for it (what vLLM's CPU backend uses), and `cpu.c`'s panel kernel. Measured on an
AMD EPYC (Zen 4) at one thread: on the bench model's prompt-chunk shapes MKL runs at 56-84
GFLOP/s, oneDNN at 86-107; on few rows with the weights in memory the panel kernel, which
prefetches them, is 1.5-3x faster than both. The candidates sum in different orders, so
outputs differ by float rounding only.

The picks persist in a JSON file of the kernel cache: timed once per machine, they are the
same in every process. Timed afresh per process, two workers loading at once on a small
machine picked differently (some GEMMs ~20% slower for that process's whole life), so two
clusters of one model differed by themselves.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from epdserve.utils.files import atomic_target

log = logging.getLogger(__name__)

Gemm = Callable[[torch.Tensor], torch.Tensor]  # x [M, K] contiguous float32 -> x @ W^T + b [M, N]

FEW_ROWS = 48  # calls of at most this many rows take the few-row winner
TIMING_ROWS = (16, 256)  # the inputs the candidates are timed on: few rows, many rows
TIMING_RUNS = 5  # the best of this many runs counts
EVICT_BYTES = 64 << 20  # written before each timed run: more than a CPU's last-level cache


def float32_cpu(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is what the CPU kernels take: float32 on the CPU."""
    return tensor.dtype == torch.float32 and tensor.device.type == "cpu"


def onednn_gemm(module: nn.Linear) -> Gemm | None:
    """oneDNN's linear over a copy of the weight reordered for it; None without oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return None
    packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None)
    bias = None if module.bias is None else module.bias.detach()
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _seconds(gemm: Gemm, x: torch.Tensor, evict: torch.Tensor) -> float:
    """Best time of `gemm(x)` with the caches flushed first: a decode step finds the weights
    in memory, not in cache (timed warm, a kernel that prefetches them looks no better)."""
    gemm(x)  # first call: lazy initialisation
    best = float("inf")
    for _ in range(TIMING_RUNS):
        evict.fill_(1.0)
        start = time.perf_counter()
        gemm(x)
        best = min(best, time.perf_counter() - start)
    return best


def fastest(
    candidates: dict[str, Gemm], rows: int, in_features: int, evict: torch.Tensor
) -> tuple[str, dict[str, float]]:
    """The name of the quickest candidate on a random [rows, in_features] input, and every
    candidate's time in seconds; `evict` is written before each timed run."""
    x = torch.randn(rows, in_features)
    with torch.inference_mode():
        times = {name: _seconds(gemm, x, evict) for name, gemm in candidates.items()}
    return min(times, key=times.__getitem__), times


@dataclass
class FastLinear:
    """`module` with its few-row and many-row calls routed to the chosen GEMMs.

    Inputs other than a contiguous float32 [M, K] matrix go to the module itself."""

    module: nn.Linear
    few: Gemm
    many: Gemm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.dtype != torch.float32 or not x.is_contiguous():
            return self.module(x)
        return (self.few if x.shape[0] <= FEW_ROWS else self.many)(x)


class FastLinearModule(nn.Module):
    """A `FastLinear` where an `nn.Linear` sat in a module tree; takes [..., K] inputs."""

    def __init__(self, linear: FastLinear):
        super().__init__()
        self.inner = linear.module  # keeps weight and bias in the tree's parameters
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.reshape(-1, x.shape[-1]).contiguous()).unflatten(0, x.shape[:-1])


class LinearChooser:
    """Builds `FastLinear`s; times the candidates once per weight shape and thread count.

    `factories` build each candidate GEMM for a float32 CPU module (a copy of its weight in
    the candidate's layout), or give None where the candidate cannot run; the module's own
    forward ("torch") is always a candidate. Only the chosen candidates are kept. With
    `picks_file`, picks are read from it and new ones added to it.
    """

    def __init__(self, factories: dict[str, Callable[[nn.Linear], Gemm | None]], picks_file: Path | None = None):
        self.factories = {"torch": lambda module: module, **factories}
        self.picks_file = picks_file
        self._choices: dict[tuple, tuple[str, str]] = self._read_picks()

    def linear(self, module: nn.Linear) -> FastLinear | nn.Linear:
        """`module` as a `FastLinear`, or itself when its weight is not float32 on the CPU
        or its own forward wins both kinds of call."""
        weight = module.weight
        if not float32_cpu(weight):
            return module
        key = (*weight.shape, module.bias is not None, torch.get_num_threads())
        picks = self._choices.get(key)
        if picks is not None:
            gemms = self._build(module, {name: self.factories[name] for name in set(picks)})
            if not set(picks) <= gemms.keys():  # read from a file written where it could run
                picks = None
        if picks is None:  # the first module of its shape: time every candidate, keep the winners built
            gemms = self._build(module, self.factories)
            picks = self._choices[key] = self._time(gemms, weight.shape[1], weight.shape[0])
            self._write_picks()
        few, many = picks
        if few == many == "torch":
            return module
        return FastLinear(module, gemms[few], gemms[many])

    def _read_picks(self) -> dict[tuple, tuple[str, str]]:
        """The file's picks whose candidates exist here; none when it is absent or unreadable."""
        if self.picks_file is None:
            return {}
        try:
            stored = json.loads(self.picks_file.read_text())
        except (OSError, ValueError):
            return {}
        return {
            tuple(json.loads(key)): (few, many)
            for key, (few, many) in stored.items()
            if few in self.factories and many in self.factories
        }

    def _write_picks(self) -> None:
        """Merge ours into the file (another process may have added its own), atomically."""
        if self.picks_file is None:
            return
        picks = self._read_picks() | self._choices
        try:
            self.picks_file.parent.mkdir(parents=True, exist_ok=True)
            with atomic_target(self.picks_file, suffix=".json") as tmp:
                tmp.write_text(json.dumps({json.dumps(list(key)): list(pick) for key, pick in picks.items()}))
        except OSError as exc:
            log.warning("could not save the linear picks to %s: %s", self.picks_file, exc)

    @staticmethod
    def _build(module: nn.Linear, factories: dict[str, Callable[[nn.Linear], Gemm | None]]) -> dict[str, Gemm]:
        return {name: gemm for name, factory in factories.items() if (gemm := factory(module)) is not None}

    @staticmethod
    def _time(gemms: dict[str, Gemm], in_features: int, out_features: int) -> tuple[str, str]:
        picks, report = [], []
        evict = torch.empty(EVICT_BYTES // 4)  # one per shape: its first fill faults every page in
        for rows in TIMING_ROWS:
            name, times = fastest(gemms, rows, in_features, evict)
            picks.append(name)
            report.append(f"{rows} rows: " + ", ".join(f"{n} {t * 1e3:.3f}" for n, t in times.items()))
        log.info(
            "linear %dx%d: few rows -> %s, many rows -> %s (ms; %s)",
            in_features,
            out_features,
            picks[0],
            picks[1],
            "; ".join(report),
        )
        return picks[0], picks[1]

    def replace_linears(self, tree: nn.Module) -> None:
        """Swap every `nn.Linear` inside `tree` for its `FastLinearModule` where one is built."""
        for parent in list(tree.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and isinstance(fast := self.linear(child), FastLinear):
                    setattr(parent, name, FastLinearModule(fast))
