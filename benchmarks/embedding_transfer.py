"""Embedding hand-off bandwidth, encoder-cache TTFT, and E/PD vs EPD, in one run.

    python benchmarks/embedding_transfer.py [--model DIR] [--threads N] [--out benchmarks/results] [--quick]

1. bandwidth  -- embedding-sized payloads from one process to another (transfer_probe.py):
                 our hand-off (EmbeddingCache + expect / MediaResolver._read), a bare NIXL READ
                 without and with NIXL's progress thread, and a plain in-process memcpy; under
                 several UCX_TLS settings.
2. cache      -- TTFT of an image request on an encoder-cache miss vs a hit, on an E/PD
                 cluster (launch/agg_multimodal_epd.sh): encoder cache only (a unique system
                 text first), and the same image with a new question (prefix cache too).
3. topologies -- EPD (agg_multimodal.sh) vs E/PD on the same workload, level by level, each
                 (level, topology) on a fresh cluster.
4. paired     -- EPD vs E/PD TTFT at c=1 on both clusters at once, each request sent to both
                 back to back, over rounds of fresh cluster pairs (cluster_ttft.py).
Writes embedding_transfer.json (raw numbers) and embedding_transfer.md (tables) to --out.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cluster_ttft import cache_md, ci_text, paired_md, run_cache, run_paired
from epdserve.config import WorkerConfig
from machine import gemm_probe_gflops, machine_line, run_parts
from metrics import percentile
from report import Target, table, targets_table, write_report
from topologies import E_PD, EPD, paired_ttft_delta_ms, run_topologies
from transfer_probe import MODES, measure_pair, memcpy_times, merge_rounds, mode_rates, rate
from workload import ensure_model

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"handoff_vs_raw": 0.8, "hit_vs_miss": 0.4, "epd_split_ttft_ms": 5.0, "epd_split_tok_s": 0.9}


@dataclass(frozen=True)
class Case:
    name: str
    shapes: tuple[tuple[int, int], ...]   # float32 [rows, hidden] tensors read in one transfer

    @property
    def nbytes(self) -> int:
        return sum(r * c * 4 for r, c in self.shapes)


LLAVA_IMAGE = (576, 4096)   # one LLaVA-1.5-7B image: 576 tokens x hidden 4096
CASES = (Case("1 image", (LLAVA_IMAGE,)), Case("4 images", (LLAVA_IMAGE,) * 4), Case("64 MiB", ((4096, 4096),)))
UCX_SETTINGS: tuple[str | None, ...] = (None, "cma,tcp,self", "shm,tcp,self", "tcp,self")
STAGING_BYTES = WorkerConfig.embedding_buffer_bytes   # the PD worker's default staging region


@dataclass(frozen=True)
class Config:
    model: str
    preset: str | None
    seed: int
    cases: tuple[Case, ...]
    ucx_settings: tuple[str | None, ...]   # None: UCX_TLS unset (what the workers run with)
    rounds: int                            # passes over every (UCX setting, mode)
    reps: int                              # timed repetitions per measurement and round
    warmup: int                            # untimed ones before them (the first READ connects)
    cache_samples: int                     # miss/hit pairs per cache variant
    paired_requests: int                   # per kind (image, text) of the interleaved c=1 run
    paired_warmup: int                     # per kind, to both clusters of a round, before it
    paired_rounds: int                     # fresh cluster pairs the paired requests are split over
    levels: tuple[tuple[int, int], ...]    # (concurrency, requests)
    topology_rounds: int                   # passes over every (level, topology), fresh clusters


# --------------------------------------------------------------------------- 1. bandwidth

def _log_round(round_: int, tls: str | None, case: Case, results: dict[str, dict[str, Any]]) -> None:
    parts = [f"{mode} {case.nbytes / percentile(r['cases'][0]['total_s'], 50) / 1e6:.2f} GB/s"   # B/ms -> GB/s
             if "cases" in r else f"{mode} failed" for mode, r in results.items()]
    print(f"[bandwidth] round {round_ + 1}, UCX_TLS={tls or 'default'}: {', '.join(parts)} ({case.name}, median)",
          flush=True)


def run_bandwidth(cfg: Config) -> dict[str, Any]:
    """Round after round, each UCX setting in turn, every mode in a fresh pair of processes:
    the numbers compared with each other (handoff vs raw) are measured seconds apart, and the
    rounds spread each measurement over the run's minutes."""
    spec = {"cases": [[list(s) for s in c.shapes] for c in cfg.cases], "reps": cfg.reps, "warmup": cfg.warmup,
            "staging_bytes": STAGING_BYTES}
    runs: dict[tuple[str | None, str], list[dict[str, Any]]] = {(t, m): [] for t in cfg.ucx_settings for m in MODES}
    probes: dict[str | None, list[float]] = {t: [] for t in cfg.ucx_settings}
    for round_ in range(cfg.rounds):
        for tls in cfg.ucx_settings:
            probes[tls].append(gemm_probe_gflops())
            for mode in MODES:
                runs[tls, mode].append(measure_pair(mode, tls, spec))
            _log_round(round_, tls, cfg.cases[0], {m: runs[tls, m][-1] for m in MODES})
    named = [(c.name, c.nbytes) for c in cfg.cases]
    settings = [{"ucx_tls": tls or "default", "probe_gflops": probes[tls],
                 "modes": {m: mode_rates(merge_rounds(runs[tls, m]), named) for m in MODES}}
                for tls in cfg.ucx_settings]
    memcpy = {c.name: rate(c.nbytes, memcpy_times([list(s) for s in c.shapes], cfg.reps * cfg.rounds, cfg.warmup))
              for c in cfg.cases}
    return {"staging_bytes": STAGING_BYTES, "settings": settings, "memcpy": memcpy}


def _ratio(settings: dict[str, Any], case: str, other: str) -> float:
    a, b = settings["modes"]["handoff"], settings["modes"][other]
    if a["status"] != "ok" or b["status"] != "ok":
        return float("nan")
    return a["cases"][case]["median_gbps"] / b["cases"][case]["median_gbps"]


def _winner(bandwidth: dict[str, Any], case: str, mode: str = "handoff") -> str:
    ok = [s for s in bandwidth["settings"] if s["modes"][mode]["status"] == "ok"]
    return max(ok, key=lambda s: s["modes"][mode]["cases"][case]["median_gbps"])["ucx_tls"] if ok else "–"


# --------------------------------------------------------------------------- targets and report

def evaluate_targets(results: dict[str, Any]) -> list[Target]:
    bw, topo, paired = results["bandwidth"], results["topologies"], results["paired"]
    repeated, encoder_only = (results["cache"]["variants"][k] for k in ("repeated_image", "encoder_only"))
    default, first = bw["settings"][0], next(iter(bw["memcpy"]))
    ratio = _ratio(default, first, "raw")
    best = _winner(bw, first)
    best_ratio = _ratio(next(s for s in bw["settings"] if s["ucx_tls"] == best), first, "raw") if best != "–" \
        else float("nan")
    epd, split = ({lvl["concurrency"]: lvl for lvl in topo[t.name]} for t in (EPD, E_PD))
    high = 32 if 32 in epd else max(epd)
    image = paired["image"]
    delta, added = image["paired_delta_p50_ms"], image["added_delta_p50_ms"]
    tok = split[high]["output_tok_s"] / epd[high]["output_tok_s"]
    return [
        Target(f"handoff / raw NIXL READ, {first}, UCX_TLS {default['ucx_tls']}", f">= {TARGETS['handoff_vs_raw']}",
               f"{ratio:.2f}", ratio >= TARGETS["handoff_vs_raw"]),
        Target(f"handoff / raw NIXL READ, {first}, fastest UCX_TLS ({best})", f">= {TARGETS['handoff_vs_raw']}",
               f"{best_ratio:.2f}", best_ratio >= TARGETS["handoff_vs_raw"]),
        Target("TTFT p50 cache hit / miss, same image + new question (E/PD)", f"<= {TARGETS['hit_vs_miss']}",
               f"{repeated['hit_vs_miss']:.2f}", repeated["hit_vs_miss"] <= TARGETS["hit_vs_miss"]),
        Target("TTFT p50 cache hit / miss, encoder cache only (E/PD; informational)", "–",
               f"{encoder_only['hit_vs_miss']:.2f}", None),
        Target("E/PD - EPD TTFT at c=1 besides the model's compute, image requests (interleaved, paired median)",
               f"<= {TARGETS['epd_split_ttft_ms']:.0f} ms",
               f"{added:+.1f} ms (90% CI {ci_text(image['added_delta_p50_ci90_ms'])}; compute Δ "
               f"{image['compute_delta_p50_ms']:+.1f} ms, CI {ci_text(image['compute_delta_p50_ci90_ms'])})",
               added <= TARGETS["epd_split_ttft_ms"]),
        Target("E/PD - EPD TTFT at c=1, image requests, end to end (interleaved, paired median; informational)", "–",
               f"{delta:+.1f} ms (90% CI {ci_text(image['paired_delta_p50_ci90_ms'])}; p50 EPD "
               f"{image['base_ttft_p50_ms']:.0f} / E/PD {image['other_ttft_p50_ms']:.0f} ms)", None),
        Target(f"E/PD / EPD output tok/s at c={high}", f">= {TARGETS['epd_split_tok_s']}", f"{tok:.2f}x",
               tok >= TARGETS["epd_split_tok_s"]),
    ]


def _gbps(mode: dict[str, Any], case: str) -> str:
    if mode["status"] != "ok":
        return mode["status"]
    r = mode["cases"][case]
    return f"{r['median_gbps']:.2f} / {r['best_gbps']:.2f}"


def _read_split(s: dict[str, Any], case: str) -> tuple[str, str]:
    """("READ ms / whole ms" of the handoff, raw READ's median time over the handoff's READ)."""
    handoff, raw = s["modes"]["handoff"], s["modes"]["raw"]
    if handoff["status"] != "ok":
        return "–", "–"
    h = handoff["cases"][case]
    ratio = f"{raw['cases'][case]['median_ms'] / h['read_median_ms']:.2f}" if raw["status"] == "ok" else "–"
    kept = {0: "copied out", len(h["times_ms"]): "kept"}.get(h["held"], f"kept {h['held']}/{len(h['times_ms'])}")
    return f"{h['read_median_ms']:.2f} / {h['median_ms']:.2f} ({kept})", ratio


def _bandwidth_md(bw: dict[str, Any], cases: list[Case]) -> list[str]:
    rows = []
    for s in bw["settings"]:
        for case in cases:
            split, read_ratio = _read_split(s, case.name)
            rows.append([s["ucx_tls"], f"{case.name} ({case.nbytes / 1e6:.1f} MB)", _gbps(s["modes"]["handoff"], case.name),
                         split, _gbps(s["modes"]["raw"], case.name), _gbps(s["modes"]["raw-prog"], case.name),
                         f"{_ratio(s, case.name, 'raw'):.2f}", read_ratio, f"{_ratio(s, case.name, 'raw-prog'):.2f}",
                         " / ".join(f"{p:.0f}" for p in s["probe_gflops"])])
    lines = ["## 1. Hand-off bandwidth (GB/s, median / best)", "",
             f"The reader's staging region: {bw['staging_bytes'] >> 20} MiB (the PD worker's default "
             "`--embedding-buffer-bytes`); embeddings are kept in it while it stays at most half full, "
             "else copied out.", "",
             *table(["UCX_TLS", "payload", "handoff", "READ / whole ms", "raw READ", "raw READ + prog thread",
                     "handoff/raw", "its READ alone/raw", "handoff/raw-prog", "probe GFLOP/s"], rows)]
    lines += table(["payload", "memcpy (dst.copy_(src)) GB/s", "fastest UCX_TLS: handoff", "raw READ"],
                   [[c.name, f"{bw['memcpy'][c.name]['median_gbps']:.2f} / {bw['memcpy'][c.name]['best_gbps']:.2f}",
                     _winner(bw, c.name), _winner(bw, c.name, "raw")] for c in cases])
    why = [f"- UCX_TLS {s['ucx_tls']}, {m}: {r['status']}: {r['why']}" for s in bw["settings"]
           for m, r in s["modes"].items() if r["status"] != "ok"]
    return lines + (why + [""] if why else [])


def _topologies_md(topo: dict[str, list[dict[str, Any]]]) -> list[str]:
    epd, split = ({lvl["concurrency"]: lvl for lvl in topo[t.name]} for t in (EPD, E_PD))
    rows = [[str(c), f"{epd[c]['ttft_p50_ms']:.0f}", f"{split[c]['ttft_p50_ms']:.0f}",
             f"{split[c]['ttft_p50_ms'] - epd[c]['ttft_p50_ms']:+.1f}", f"{paired_ttft_delta_ms(epd[c], split[c]):+.1f}",
             f"{epd[c]['image_ttft_p50_ms']:.0f}", f"{split[c]['image_ttft_p50_ms']:.0f}",
             f"{epd[c]['output_tok_s']:.1f}", f"{split[c]['output_tok_s']:.1f}",
             f"{split[c]['output_tok_s'] / epd[c]['output_tok_s']:.2f}x", str(epd[c]["requests"]),
             f"{min(epd[c]['probe_gflops'] + split[c]['probe_gflops']):.0f}-"
             f"{max(epd[c]['probe_gflops'] + split[c]['probe_gflops']):.0f}"] for c in sorted(epd)]
    rounds = len(next(iter(epd.values()))["rounds"])
    return [f"## 3. EPD vs E/PD (same workload; {rounds} round(s), each level and topology on a fresh cluster)", "",
            *table(["c", "EPD TTFT p50 ms", "E/PD TTFT p50 ms", "Δ ms", "paired Δ ms", "EPD image TTFT p50",
                    "E/PD image TTFT p50", "EPD tok/s", "E/PD tok/s", "E/PD/EPD", "requests",
                    "probe GFLOP/s"], rows)]


NOTES = """\
- **handoff**: the holder keeps the tensors in an `EmbeddingCache` (its `TransferAgent`'s one
  registered region) and awaits `expect(notif)`; the reader enters `MediaResolver.resolve` of a
  request carrying them, as the PD worker does: staging span, one `TransferAgent.read` of all
  the request's tensors, then the tensors stay in the span for the request ("kept") or, when
  that would leave the region over half full, are cloned out and the span freed ("copied
  out"). Timed until `resolve` yields the engine inputs; "READ / whole ms" splits off the time
  spent inside `TransferAgent.read`, and "its READ alone/raw" compares that part alone with
  the raw READ (time ratio, raw over it).
- **raw READ**: two bare `nixl_agent`s, one `initialize_xfer("READ")` + `transfer` + polled
  `check_xfer_state` into registered memory, handle released; no copy out. Without the
  progress thread both sides busy-poll (the holder `get_new_notifs`); with it both poll every
  0.1 ms. Every mode runs in a fresh pair of processes, with UCX_TLS set before nixl loads.
- **memcpy**: `dst.copy_(src)` of the same tensors into preallocated ones, one process.
- Each measurement: warm-up repetitions (the first READ also connects the peers), then the
  timed ones; GB/s = 10^9 bytes per second of the median and of the fastest repetition.
- **cache**: E/PD cluster; each sample is a never-seen 640x480 PNG (miss), then the same image
  again (hit), one at a time, 4 output tokens. "encoder cache only": a unique system text comes
  before the image, so the PD worker's prefix cache cannot reuse the image's KV and a hit saves
  only the encode. "repeated image": no system text, a new question after the same image (the
  template puts the image first), so a hit reuses the image's KV blocks too. Counters: the
  encode workers' cache hits/misses and the PD worker's prefix-cache block hits/queries.
- **EPD vs E/PD**: the workload of `build_workload` (half the requests with one image, 16..96
  output tokens, EOS ignored), closed loop at `c`; TTFT from the client. "paired Δ" is the
  median over requests of (E/PD - EPD) TTFT of the same request in the same round. Rounds are
  pooled: percentiles over every request, tok/s over the summed wall time (each round's own
  numbers are in the JSON). Each cluster times its GEMM candidates at load and keeps the
  fastest, so two clusters of one topology differ a little by themselves.
- **interleaved**: in each round a fresh EPD and a fresh E/PD cluster, both up at once (two
  processes of one model differ in speed by a few percent for life, ~10 ms of an image
  request's prefill, so one pair of clusters carries an offset that more requests do not
  average out; many short rounds do, pooled: 12 of 20 pairs per kind); after warm-up requests, image and
  text-only requests alternate, each sent to both clusters one after the other (EPD first for
  requests 0, 1, E/PD first for 2, 3, ...: ABBA), one request in flight, 4 output tokens; every
  image never seen and every text led by a number of its own (no cache hits). "paired Δ" is
  the median over requests of (E/PD - EPD) TTFT; the VM's drift is the same for both halves.
  One request's TTFT varies by ±30 ms here, so 240 pairs per kind, and the median comes with
  a 90% bootstrap confidence interval (over requests: it does not cover the per-cluster
  offsets, which the spread of the per-round medians shows).
- **compute / besides compute**: between requests the benchmark reads each cluster's workers'
  counters: `prompt_step_us` (PD workers: wall time of the engine steps that ran a prompt
  chunk; in EPD the image's encode runs inside them) and `encode_us` (encode workers: time in
  the encoder). Their increase over a request is its model compute, the same work in both
  topologies; one image request's compute varies by ±50 ms on this VM, far more than a 5 ms
  target, so the target is taken on the rest, TTFT - compute: the paired median of (E/PD -
  EPD) of it is what the split adds (hops, the hand-off, waits). The compute's own paired Δ is
  shown beside it: were E/PD's compute slower by itself, it would show there.
- probe GFLOP/s: a one-thread GEMM timed for 1 s before each measurement (the VM's speed drifts).
"""


def render_markdown(report: dict[str, Any]) -> str:
    cfg, res = report["config"], report["results"]
    cases = [Case(c["name"], tuple(map(tuple, c["shapes"]))) for c in cfg["cases"]]
    lines = [
        "# Embedding transfer", "",
        (f"Model `{cfg['model']}` (preset: {cfg['preset'] or 'given'}); bandwidth: {cfg['rounds']} round(s) of "
         f"{cfg['reps']} timed repetitions per measurement; seed {cfg['seed']}; OMP threads: {cfg['threads']}."),
        machine_line(report), "",
        *targets_table(report["targets"]),
        *_bandwidth_md(res["bandwidth"], cases),
        *cache_md(res["cache"]),
        *_topologies_md(res["topologies"]),
        *paired_md(res["paired"], "4"),
        "## Definitions", "", NOTES]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", help="HF LLaVA directory (default: a random-weight one, preset bench)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int,
                   help="OMP_NUM_THREADS for every process, cluster and transfer probes (default: torch's default)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny preset, 2 payloads, 2 UCX settings, one round, c = 2 only, "
                        "4 interleaved requests per kind, 1 thread")
    args = p.parse_args(argv)
    args.threads = args.threads or (1 if args.quick else None)
    return args


def make_config(args: argparse.Namespace) -> Config:
    preset = "tiny" if args.quick else "bench"
    model = Path(args.model) if args.model else ensure_model(preset)
    common = dict(model=str(model.resolve()), preset=None if args.model else preset, seed=args.seed)
    if args.quick:
        return Config(**common, cases=CASES[:2], ucx_settings=(None, "tcp,self"), rounds=1, reps=3,
                      warmup=1, cache_samples=3, paired_requests=4, paired_warmup=1, paired_rounds=1, levels=((2, 6),),
                      topology_rounds=1)
    return Config(**common, cases=CASES, ucx_settings=UCX_SETTINGS, rounds=2, reps=8, warmup=2,
                  cache_samples=8, paired_requests=240, paired_warmup=2, paired_rounds=12,
                  levels=((1, 24), (16, 48), (32, 64)), topology_rounds=2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:   # inherited by every child process, read at torch import
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        import torch
        torch.set_num_threads(args.threads)
    c = make_config(args)
    report = run_parts({**asdict(c), "threads": args.threads}, {
        "bandwidth": lambda: run_bandwidth(c), "cache": lambda: run_cache(c.model, c.seed, c.cache_samples),
        "topologies": lambda: run_topologies(c.model, c.seed, (EPD, E_PD), c.levels, c.topology_rounds),
        "paired": lambda: run_paired(c.model, c.seed, c.paired_requests, c.paired_warmup, c.paired_rounds)})
    report["targets"] = [asdict(t) for t in evaluate_targets(report["results"])]
    write_report(args.out, "embedding_transfer", report, render_markdown(report))


if __name__ == "__main__":
    main()
