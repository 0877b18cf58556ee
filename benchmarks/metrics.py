"""Per-request records and what a level of requests measured: percentiles, throughput."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class RequestRecord:
    """What one request measured; times in seconds, relative to when it was issued."""

    rid: str
    has_image: bool
    max_tokens: int
    output_tokens: int = 0
    ttft_s: float = float("nan")
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float = float("nan")
    prompt_tokens: int = 0
    compute_s: float = float("nan")   # model compute the cluster's workers spent on it, where measured

    def finish(self, issued: float, token_times: list[float]) -> None:
        """Fill TTFT, ITL and end-to-end latency from the arrival times of output tokens."""
        if token_times:
            self.ttft_s = token_times[0] - issued
            self.itl_s = [b - a for a, b in itertools.pairwise(token_times)]
            self.e2e_s = token_times[-1] - issued


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation) in milliseconds; NaN when empty."""
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def summarize(records: list[RequestRecord], wall_s: float) -> dict[str, Any]:
    """Level metrics: output tok/s counts only each request's own tokens; times in ms."""
    ttft = [r.ttft_s for r in records]
    itl = [x for r in records for x in r.itl_s]
    output = sum(r.output_tokens for r in records)
    return {
        "requests": len(records), "output_tokens": output, "wall_s": wall_s,
        "output_tok_s": output / wall_s, "req_s": len(records) / wall_s,
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
        "itl_p50_ms": percentile(itl, 50), "itl_p99_ms": percentile(itl, 99),
        "e2e_p50_ms": percentile([r.e2e_s for r in records], 50),
        "short_requests": sum(r.output_tokens != r.max_tokens for r in records),
    }


def level_result(concurrency: int, records: list[RequestRecord], wall_s: float,
                 rss: dict[str, float], **extra: Any) -> dict[str, Any]:
    """One level's summary, extra numbers, peak RSS (MiB) and raw per-request records."""
    return {"concurrency": concurrency, **summarize(records, wall_s), **extra, "rss_mib": rss,
            "records": [asdict(r) for r in records]}
