"""Output throughput, TTFT and ITL of epdserve vs a `transformers` static-batching script.

    python benchmarks/engine_throughput.py [--model DIR] [--concurrency 1 8 32 64]
        [--requests-per-level N] [--modes engine http hf] [--out benchmarks/results] [--quick]

Modes, all on the same model and the same requests (see workload.build_workload):
  engine -- the worker's engine in-process behind `AsyncEngine`, closed-loop load.
  http   -- a real EPD cluster (launch/agg_multimodal.sh) driven by the streaming `openai` client.
  hf     -- static batching: one padded `model.generate()` per batch of `concurrency` requests.
Levels run in turn, every mode at a level before the next level, each (level, mode) in a fresh
process (and `http` on a fresh cluster), so peak RSS (VmHWM) does not mix.
Writes engine_throughput.json (raw numbers) and engine_throughput.md (tables) to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.generation.streamers import BaseStreamer

from cluster import closed_loop, http_cluster, http_level
from epdserve.config import WorkerConfig, parse_worker_args
from epdserve.engine.async_engine import AsyncEngine
from epdserve.engine.base import Engine, EngineRequest, MultiModalInput, SamplingParams
from epdserve.engine.paged import PagedEngine
from epdserve.models.base import ModelFamily, MultimodalModel
from epdserve.models.registry import load_family
from epdserve.worker.services import engine_config, load_model
from machine import gemm_probe_gflops, machine_info, peak_rss_mib, reset_peak_rss
from metrics import RequestRecord, level_result
from report import write_report
from workload import MAX_TOKENS, MIN_TOKENS, WorkItem, build_workload, decode_png, ensure_model

ROOT = Path(__file__).resolve().parents[1]
MODES = ("engine", "http", "hf")
WORKER_FLAGS = ("--multimodal-worker", "--enable-multimodal", "--device", "cpu")


@dataclass(frozen=True)
class BenchConfig:
    model: str
    levels: tuple[int, ...]
    requests_per_level: int
    seed: int


def make_engine(model: MultimodalModel, c: WorkerConfig, max_model_len: int) -> Engine:
    """The engine the PD worker runs, built as worker/services.py PDService builds it."""
    return PagedEngine(model, engine_config(c, max_model_len))


def _log(mode: str, level: dict[str, Any]) -> None:
    print(f"[{mode}] c={level['concurrency']}: {level['output_tok_s']:.1f} tok/s, TTFT p50 "
          f"{level['ttft_p50_ms']:.0f} ms, ITL p50 {level['itl_p50_ms']:.1f} ms, "
          f"{level['wall_s']:.1f} s", flush=True)


# --------------------------------------------------------------------------- hf

class _TokenClock(BaseStreamer):
    """Records when `generate()` hands over each step's tokens (its first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        return None


def hf_batch(processor: Any, model: Any, batch: list[WorkItem]) -> tuple[list[RequestRecord], float]:
    """One padded batched `generate()` of `max(max_tokens)` new tokens, EOS ignored.

    Every request of the batch is issued at the batch start; its TTFT is the batch's first
    token, its ITL the step gaps up to its own `max_tokens`, its end-to-end latency the end
    of `generate()` (when a script gets its result). Returns (records, preprocessing seconds).
    """
    issued = time.perf_counter()
    texts = [processor.apply_chat_template(it.hf_messages(), add_generation_prompt=True, tokenize=False)
             for it in batch]
    images = [decode_png(it.image) for it in batch if it.image is not None]   # in prompt order
    inputs = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
    preprocess_s = time.perf_counter() - issued
    new_tokens = max(it.max_tokens for it in batch)
    clock = _TokenClock()
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, eos_token_id=[],
                             streamer=clock)
    done = time.perf_counter()
    if out.shape[1] - inputs["input_ids"].shape[1] != new_tokens:
        raise RuntimeError("generate() stopped before max_new_tokens")
    records = []
    for it, mask in zip(batch, inputs["attention_mask"]):
        rec = RequestRecord(it.rid, it.image is not None, it.max_tokens, it.max_tokens,
                            prompt_tokens=int(mask.sum()))
        rec.finish(issued, clock.times[1:1 + it.max_tokens])
        rec.e2e_s = done - issued
        records.append(rec)
    return records, preprocess_s


def run_hf(cfg: BenchConfig) -> list[dict[str, Any]]:
    """Static batching over every level, the way a user scripts it with `transformers`."""
    processor = AutoProcessor.from_pretrained(cfg.model)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(cfg.model).eval()
    hf_batch(processor, model, build_workload(2, cfg.seed, "warmup"))
    levels = []
    for c in cfg.levels:
        items = build_workload(cfg.requests_per_level, cfg.seed, f"c{c}")
        reset_peak_rss()
        records, preprocess_s, start = [], 0.0, time.perf_counter()
        for i in range(0, len(items), c):
            batch_records, batch_preprocess_s = hf_batch(processor, model, items[i:i + c])
            records += batch_records
            preprocess_s += batch_preprocess_s
        wall = time.perf_counter() - start
        batches = [items[i:i + c] for i in range(0, len(items), c)]
        wasted = sum(max(it.max_tokens for it in b) - it.max_tokens for b in batches for it in b)
        levels.append(level_result(c, records, wall, {"process": peak_rss_mib()},
                                   wasted_tokens=wasted, preprocess_s=preprocess_s))
        _log("hf", levels[-1])
    return levels


# --------------------------------------------------------------------------- engine

def engine_request(processor: Any, family: ModelFamily, model: MultimodalModel, item: WorkItem) -> EngineRequest:
    """What the processor and PD worker hand the engine: token ids, pixel features, no EOS stop."""
    text = processor.apply_chat_template(item.hf_messages(), add_generation_prompt=True, tokenize=False)
    images = [decode_png(item.image)] if item.image is not None else []
    ids = processor(text=text, images=images or None, return_tensors="pt")["input_ids"][0].tolist()
    mm = []
    if images:
        placeholder = family.placeholder_token_id("image")
        mm.append(MultiModalInput("image", hashlib.sha256(item.image).hexdigest(), ids.index(placeholder),
                                  ids.count(placeholder), features=model.preprocess("image", images)))
    return EngineRequest(item.rid, ids, SamplingParams(max_tokens=item.max_tokens, stop_token_ids=()), mm)


async def engine_level(engine: Engine, requests: dict[str, EngineRequest],
                       items: list[WorkItem], concurrency: int) -> tuple[list[RequestRecord], float]:
    """Closed-loop load through an `AsyncEngine`; each output's tokens are timed on arrival."""
    front = AsyncEngine(engine)
    front.start()

    async def send(item: WorkItem) -> RequestRecord:
        req = requests[item.rid]
        rec = RequestRecord(item.rid, item.image is not None, item.max_tokens,
                            prompt_tokens=len(req.prompt_token_ids))
        times: list[float] = []
        issued = time.perf_counter()
        async for out in front.generate(req):
            if out.error is not None:
                raise RuntimeError(f"{item.rid}: {out.error}")
            times += [time.perf_counter()] * len(out.new_token_ids)
        rec.output_tokens = len(times)
        rec.finish(issued, times)
        return rec

    try:
        return await closed_loop(items, concurrency, send)
    finally:
        await front.stop()


def run_engine(cfg: BenchConfig) -> list[dict[str, Any]]:
    """The worker's engine in-process, a fresh one per level; requests are tokenized and
    preprocessed off the clock."""
    config = parse_worker_args([*WORKER_FLAGS, "--model", cfg.model], {})
    family = load_family(cfg.model)
    model = load_model(config, family)
    max_model_len = min(config.max_model_len or family.context_length, family.context_length)
    processor = AutoProcessor.from_pretrained(cfg.model)

    def requests(items: list[WorkItem]) -> dict[str, EngineRequest]:
        return {it.rid: engine_request(processor, family, model, it) for it in items}

    warmup = build_workload(2, cfg.seed, "warmup")
    asyncio.run(engine_level(make_engine(model, config, max_model_len), requests(warmup), warmup, 2))
    levels = []
    for c in cfg.levels:
        items = build_workload(cfg.requests_per_level, cfg.seed, f"c{c}")
        prepared = requests(items)
        engine = make_engine(model, config, max_model_len)
        reset_peak_rss()
        records, wall = asyncio.run(engine_level(engine, prepared, items, c))
        levels.append(level_result(c, records, wall, {"process": peak_rss_mib()},
                                   engine=type(engine).__name__))
        del engine   # a paged engine's KV pool is freed before the next level allocates one
        _log("engine", levels[-1])
    return levels


# --------------------------------------------------------------------------- http

def run_http(cfg: BenchConfig) -> list[dict[str, Any]]:
    """A real cluster; peak RSS per serving process (VmHWM reset before each level)."""
    levels = []
    with http_cluster(cfg.model) as cluster:
        base_url = cluster.base_url
        pids = {"worker": cluster.pid("--multimodal-worker"), "processor": cluster.pid("--multimodal-processor"),
                "frontend": cluster.pid("epdserve.frontend")}
        asyncio.run(http_level(base_url, build_workload(2, cfg.seed, "warmup"), 2))
        for c in cfg.levels:
            items = build_workload(cfg.requests_per_level, cfg.seed, f"c{c}")
            for pid in pids.values():
                reset_peak_rss(pid)
            records, wall = asyncio.run(http_level(base_url, items, c))
            chunks = sum(len(r.itl_s) + 1 for r in records if r.output_tokens)
            levels.append(level_result(c, records, wall, {k: peak_rss_mib(p) for k, p in pids.items()},
                                       token_chunks=chunks))
            _log("http", levels[-1])
    return levels


RUNNERS: dict[str, Callable[[BenchConfig], list[dict[str, Any]]]] = {
    "engine": run_engine, "http": run_http, "hf": run_hf}


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", help="HF LLaVA directory (default: a random-weight one, preset bench)")
    p.add_argument("--concurrency", type=int, nargs="+", help="levels (default: 1 8 32 64)")
    p.add_argument("--requests-per-level", type=int, help="requests completed per level (default: 64)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int,
                   help="OMP_NUM_THREADS for every mode and cluster process (default: torch's default)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny preset model, concurrency 1 4, 8 requests per level, 1 thread")
    args = p.parse_args(argv)
    args.concurrency = args.concurrency or ([1, 4] if args.quick else [1, 8, 32, 64])
    args.requests_per_level = args.requests_per_level or (8 if args.quick else 64)
    args.threads = args.threads or (1 if args.quick else None)
    return args


def run_mode(mode: str, cfg: BenchConfig) -> tuple[list[dict[str, Any]], float]:
    """Run one mode in a fresh process (so its peak RSS is its own); (levels, wall seconds)."""
    start = time.perf_counter()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        levels = pool.submit(RUNNERS[mode], cfg).result()
    return levels, time.perf_counter() - start


def run_levels(modes: list[str], cfg: BenchConfig) -> dict[str, dict[str, Any]]:
    """Every mode at one level, then the next level: a shared VM's speed drifts by tens of
    percent over minutes, so the numbers compared with each other are measured minutes
    apart, not a whole mode's run apart."""
    results = {mode: {"wall_s": 0.0, "levels": []} for mode in modes}
    for c in cfg.levels:
        for mode in modes:
            probe = gemm_probe_gflops()
            levels, wall = run_mode(mode, replace(cfg, levels=(c,)))
            levels[0]["probe_gflops"] = probe
            results[mode]["levels"] += levels
            results[mode]["wall_s"] += wall
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:   # inherited by the mode processes and the cluster, read at torch import
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    preset = "tiny" if args.quick else "bench"
    model = Path(args.model) if args.model else ensure_model(preset)
    cfg = BenchConfig(str(model.resolve()), tuple(args.concurrency), args.requests_per_level, args.seed)
    report: dict[str, Any] = {
        "config": {**asdict(cfg), "preset": None if args.model else preset, "modes": args.modes,
                   "max_num_seqs": parse_worker_args([*WORKER_FLAGS, "--model", cfg.model], {}).max_num_seqs},
        "machine": machine_info(), "results": {}}
    start = time.perf_counter()
    report["results"] = run_levels(args.modes, cfg)
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    report["total_wall_s"] = time.perf_counter() - start
    write_report(args.out, "engine_throughput", report, render_markdown(report))



# --------------------------------------------------------------------------- report

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


if __name__ == "__main__":
    main()
