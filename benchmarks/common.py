"""Shared pieces of the benchmarks: the model, the workload, per-request records, metrics.

Everything here is deterministic for a given seed, so every mode of a run (and every run
with the same flags) sends exactly the same prompts, images and `max_tokens`.
"""

from __future__ import annotations

import io
import json
import itertools
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from epdserve.tools.images import synthetic_png
from epdserve.tools.procs import tagged_pids

IMAGE_SIZES = ((64, 48), (320, 240), (640, 480))   # (W, H) of the generated PNGs
MIN_TOKENS, MAX_TOKENS = 16, 96
SHORT_TEXTS = (
    "What is in this image?", "Describe the picture briefly.", "What colors do you see?",
    "Is there anything unusual here?", "Summarize this in one sentence.", "Hi, how are you?",
)
_PROSE = (
    "the old lighthouse stood at edge of cliff keeper climbed steps to light lamp every evening "
    "bread needs flour water salt and yeast bakers argue about oven temperature river flows north "
    "through valley past farms of wheat barley under seven stone bridges into cold grey sea she "
    "opened letter carefully read it twice laughed loudly computers store numbers in binary"
)


@dataclass(frozen=True)
class WorkItem:
    """One benchmark request: a user turn with an optional image and a fixed output length."""

    rid: str
    text: str
    image: bytes | None          # PNG bytes, or None for a text-only request
    max_tokens: int

    def hf_messages(self) -> list[dict]:
        """The turn as the HF chat template takes it (image part first, as the processor does)."""
        parts = [{"type": "image"}] if self.image is not None else []
        return [{"role": "user", "content": parts + [{"type": "text", "text": self.text}]}]

    def openai_messages(self, image_url: str | None) -> list[dict]:
        """The same turn as an OpenAI chat request, the image as `image_url`."""
        parts = [{"type": "image_url", "image_url": {"url": image_url}}] if image_url else []
        return [{"role": "user", "content": parts + [{"type": "text", "text": self.text}]}]


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


def decode_png(data: bytes) -> Image.Image:
    """PNG bytes -> RGB PIL image."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def _long_text(rng: random.Random) -> str:
    """A 60..200-word pseudo-English paragraph followed by a question."""
    vocabulary = _PROSE.split()
    words = [rng.choice(vocabulary) for _ in range(rng.randint(60, 200))]
    return " ".join(words).capitalize() + ". " + rng.choice(SHORT_TEXTS)


def build_workload(num_requests: int, seed: int, tag: str) -> list[WorkItem]:
    """`num_requests` mixed requests: half with one image, short and long texts, `max_tokens`
    spread evenly over 16..96 (shuffled). `tag` (e.g. the concurrency level) seeds the
    content, so different levels get different prompts and no prefix cache carries over."""
    rng = random.Random(f"{seed}/{tag}")
    n = num_requests
    budgets = [MIN_TOKENS + (MAX_TOKENS - MIN_TOKENS) * i // max(n - 1, 1) for i in range(n)]
    rng.shuffle(budgets)
    with_image = set(rng.sample(range(n), n // 2))
    items = []
    for i in range(n):
        text = _long_text(rng) if rng.random() < 0.5 else rng.choice(SHORT_TEXTS)
        image = None
        if i in with_image:
            image = synthetic_png(rng.randrange(2**31), IMAGE_SIZES[i % len(IMAGE_SIZES)])
        items.append(WorkItem(f"{tag}-{i}", text, image, budgets[i]))
    return items


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


# --------------------------------------------------------------------------- processes

TAG_VAR = "EPDSERVE_BENCH_TAG"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_tagged(proc: subprocess.Popen, tag: str) -> None:
    """SIGTERM the launch script (it stops its children), then kill whatever is left by PID."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    for pid in tagged_pids(TAG_VAR, tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


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
    return (f"Machine: {mach['cores']} cores ({mach['cpu']}), torch {mach['torch']} (threads: {mach['torch_threads']}); "
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


def ensure_model(preset: str) -> Path:
    """A random-weight LLaVA of `preset`, built once into $EPDSERVE_CACHE (~/.cache/epdserve)."""
    from epdserve.tools.tiny_model import build_tiny_model
    cache = Path(os.environ.get("EPDSERVE_CACHE", Path.home() / ".cache" / "epdserve"))
    path = cache / f"bench-llava-{preset}"
    if not (path / "config.json").is_file():
        tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
        build_tiny_model("llava", tmp, preset=preset)
        tmp.rename(path)
    return path


# --------------------------------------------------------------------------- report

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


HEADLINE_CONCURRENCY = 32
_COLUMNS = (("output tok/s", "output_tok_s", "{:.1f}"), ("req/s", "req_s", "{:.2f}"),
            ("TTFT p50 ms", "ttft_p50_ms", "{:.0f}"), ("TTFT p99 ms", "ttft_p99_ms", "{:.0f}"),
            ("ITL p50 ms", "itl_p50_ms", "{:.1f}"), ("ITL p99 ms", "itl_p99_ms", "{:.1f}"),
            ("e2e p50 ms", "e2e_p50_ms", "{:.0f}"), ("probe GFLOP/s", "probe_gflops", "{:.0f}"))
NOTES = """\
- Closed loop: `engine` and `http` keep `c` requests in flight until all complete; `hf` runs
  the requests in order as static batches of `c` (one padded `generate()` each, left padding,
  mixed image/no-image batches, `max_new_tokens` = the batch maximum).
- output tok/s counts each request's own `max_tokens` only (EOS ignored everywhere), over the
  level's wall time; tokens `hf` generates beyond a request's `max_tokens` are `wasted_tokens`.
- TTFT: from issuing the request to its first token. For `hf` every request of a batch is
  issued at the batch start (processor call included) and its first token is the batch's
  first streamed step (a `BaseStreamer` timestamps each step); its end-to-end latency is the
  end of `generate()`. `engine` requests are tokenized and preprocessed before the clock
  starts (the vision tower runs inside the engine, timed); `http` times everything.
- ITL: gaps between successive tokens (`http`: between successive token-bearing SSE chunks,
  see `token_chunks` in the JSON).
- probe GFLOP/s: a one-thread float32 GEMM timed for 1 s just before the mode ran the level;
  it shows how far the machine's own speed drifted between the numbers compared.
- Peak RSS: VmHWM, reset before each level (it starts from the RSS the process already had):
  this process for `engine`/`hf` (each mode in its own process), the PD worker for `http`.
"""


def _by_concurrency(report: dict[str, Any], mode: str) -> dict[int, dict[str, Any]]:
    result = report["results"].get(mode)
    return {lvl["concurrency"]: lvl for lvl in result["levels"]} if result else {}


def _serving_rss(level: dict[str, Any]) -> float:
    rss = level["rss_mib"]
    return rss.get("worker", rss.get("process", float("nan")))


def _mode_table(mode: str, result: dict[str, Any]) -> list[str]:
    header = ["c", *(name for name, _, _ in _COLUMNS), "peak RSS MiB"]
    engine = result["levels"][0].get("engine") if result["levels"] else None
    lines = [f"## {mode}" + (f" ({engine})" if engine else "") +
             f" — {result['wall_s']:.0f} s", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for lvl in result["levels"]:
        cells = [str(lvl["concurrency"]), *(fmt.format(lvl[key]) for _, key, fmt in _COLUMNS),
                 f"{_serving_rss(lvl):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _ratio(a: dict[int, dict], b: dict[int, dict], c: int) -> str:
    if c not in a or c not in b:
        return "–"
    return f"{a[c]['output_tok_s'] / b[c]['output_tok_s']:.2f}x"


def _headline(report: dict[str, Any]) -> str:
    http, hf = _by_concurrency(report, "http"), _by_concurrency(report, "hf")
    common = sorted(set(http) & set(hf))
    if not common:
        return "HTTP vs HF static batching: not measured (run both modes)."
    c = HEADLINE_CONCURRENCY if HEADLINE_CONCURRENCY in common else common[-1]
    note = "" if c == HEADLINE_CONCURRENCY else f" (c={HEADLINE_CONCURRENCY} not run; highest common level)"
    return (f"**HTTP c={c} vs HF static batching: {_ratio(http, hf, c)} output tok/s "
            f"({http[c]['output_tok_s']:.1f} vs {hf[c]['output_tok_s']:.1f} tok/s){note}.**")


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: headline, one table per mode, ratios to `hf`, definitions."""
    cfg, mach = report["config"], report["machine"]
    lines = [
        "# Engine throughput", "",
        (f"Model `{cfg['model']}` (preset: {cfg['preset'] or 'given'}); {cfg['requests_per_level']} "
         f"requests per level (half with one image, max_tokens {MIN_TOKENS}..{MAX_TOKENS}), seed "
         f"{cfg['seed']}, max_num_seqs {cfg['max_num_seqs']}."),
        (f"Machine: {mach['cores']} cores ({mach['cpu']}), torch {mach['torch']} "
         f"(threads: {mach['torch_threads']}), transformers {mach['transformers']}; load average "
         f"{mach['loadavg_at_start'][0]:.2f} at start, {mach['loadavg_at_end'][0]:.2f} at end; "
         f"total {report['total_wall_s']:.0f} s."), "", _headline(report), ""]
    for mode, result in report["results"].items():
        lines += _mode_table(mode, result)
    hf = _by_concurrency(report, "hf")
    if hf:
        engine, http = _by_concurrency(report, "engine"), _by_concurrency(report, "http")
        lines += ["## Output tok/s relative to hf", "", "| c | hf tok/s | engine/hf | http/hf |",
                  "|---|---|---|---|"]
        lines += [f"| {c} | {hf[c]['output_tok_s']:.1f} | {_ratio(engine, hf, c)} | {_ratio(http, hf, c)} |"
                  for c in sorted(hf)]
        lines.append("")
    return "\n".join(lines + ["## Definitions", "", NOTES])
