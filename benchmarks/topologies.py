"""The serving topologies the benchmarks compare, and closed-loop levels of `build_workload`
requests on fresh clusters of them (embedding_transfer.py part 3, disagg.py part 1).

A level is one (topology, concurrency) on a fresh cluster: after its workers registered and a
two-request warm-up, the level's requests in a closed loop; the workers' counters are read
before and after the measured requests, so the level knows where its requests went.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from cluster import Cluster, http_cluster, http_level
from machine import gemm_probe_gflops
from metrics import RequestRecord, level_result, percentile
from workload import WorkItem, build_workload

WORKER_TIMEOUT_S = 120

Counters = dict[str, dict[str, int]]   # component ("encoder", "backend", "prefill", "decode") -> summed counters


@dataclass(frozen=True)
class Topology:
    name: str
    script: str                  # launch/<script>
    workers: tuple[str, ...]     # components that must be registered before it is what `name` says


EPD = Topology("EPD", "agg_multimodal.sh", ())
# The model is listed before the other workers may have registered: without an encode worker
# the processor sends images to the PD / prefill worker, without a prefill worker requests go
# to the decode worker, which prefills them itself.
E_PD = Topology("E/PD", "agg_multimodal_epd.sh", ("encoder",))
E_P_D = Topology("E/P/D", "disagg_multimodal_epd.sh", ("encoder", "prefill", "decode"))


def component_counters(cluster: Cluster) -> Counters:
    """Every worker's counters, summed per component."""
    totals: Counters = {}
    for name, values in cluster.worker_stats().items():
        mine = totals.setdefault(name.split("/", 1)[0], {})
        for key, value in values.items():
            mine[key] = mine.get(key, 0) + value
    return totals


def counters(cluster: Cluster, component: str = "encoder") -> dict[str, int]:
    """Summed counters of the cluster's `component` instances; empty when none is registered."""
    return component_counters(cluster).get(component, {})


def counter_diff(before: Counters, after: Counters) -> Counters:
    """`after - before`, per component and counter."""
    return {comp: {k: v - before.get(comp, {}).get(k, 0) for k, v in values.items()}
            for comp, values in after.items()}


def wait_workers(cluster: Cluster, topology: Topology) -> None:
    """Wait until each of `topology.workers` has registered; TimeoutError after WORKER_TIMEOUT_S."""
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    while missing := [c for c in topology.workers if c not in component_counters(cluster)]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{topology.name}: no {', '.join(missing)} worker registered in {WORKER_TIMEOUT_S} s")
        time.sleep(0.5)


def routing_warnings(topology: Topology, items: list[WorkItem], diff: Counters) -> list[str]:
    """What the counters say went elsewhere than `topology` names: images the encode workers
    did not see, requests the prefill workers did not prefill, prompts a decode worker ran."""
    images = sum(it.image is not None for it in items)
    out = []
    if "encoder" in topology.workers:
        seen = sum(diff.get("encoder", {}).get(k, 0) for k in ("cache_hits", "cache_misses"))
        if seen < images:
            out.append(f"the encode workers saw {seen} of {images} images")
    if "prefill" in topology.workers:
        prefilled = diff.get("prefill", {}).get("generated_tokens", 0)
        if prefilled != len(items):
            out.append(f"the prefill workers sampled {prefilled} first tokens for {len(items)} requests")
        if diff.get("decode", {}).get("prompt_step_us", 0):
            out.append("a decode worker ran prompt steps (it prefilled a request itself)")
    return out


@dataclass
class LevelRun:
    """One level of one topology on one fresh cluster."""

    records: list[RequestRecord]
    wall_s: float
    probe_gflops: float
    counters: Counters      # the workers' counters over the measured requests
    warnings: list[str]     # `routing_warnings`


def topology_level(model: str, seed: int, topology: Topology, concurrency: int, requests: int,
                   round_: int) -> LevelRun:
    """`requests` of `build_workload` (tagged by the level) on a fresh `topology` cluster,
    `concurrency` in flight, after a two-request warm-up; rids are prefixed by the round, so
    requests pair up across topologies by round and rid."""
    items, warmup = build_workload(requests, seed, f"c{concurrency}"), build_workload(2, seed, "warmup")
    probe = gemm_probe_gflops()
    with http_cluster(model, topology.script, label=f"{topology.name} c={concurrency}") as cluster:
        wait_workers(cluster, topology)
        asyncio.run(http_level(cluster.base_url, warmup, 2))
        before = component_counters(cluster)
        records, wall = asyncio.run(http_level(cluster.base_url, items, concurrency))
        diff = counter_diff(before, component_counters(cluster))
    warnings = routing_warnings(topology, items, diff)
    for w in warnings:
        print(f"[{topology.name}] warning: {w}", flush=True)
    for r in records:
        r.rid = f"r{round_}/{r.rid}"
    ttft = percentile([r.ttft_s for r in records], 50)
    print(f"[{topology.name}] round {round_ + 1}, c={concurrency}: "
          f"{sum(r.output_tokens for r in records) / wall:.1f} tok/s, TTFT p50 {ttft:.0f} ms, {wall:.1f} s", flush=True)
    return LevelRun(records, wall, probe, diff, warnings)


def pool_level(concurrency: int, runs: list[LevelRun]) -> dict[str, Any]:
    """A level's rounds as one: every request of every round, over their summed wall time;
    each round's own numbers and counters alongside."""
    records = [r for run in runs for r in run.records]
    first_itl = [r.itl_s[0] for r in records if r.itl_s]   # E/P/D: the hand-over to the decode worker
    return level_result(
        concurrency, records, sum(run.wall_s for run in runs), {},
        probe_gflops=[run.probe_gflops for run in runs], counters=[run.counters for run in runs],
        warnings=[w for run in runs for w in run.warnings],
        rounds=[{"wall_s": run.wall_s, "ttft_p50_ms": percentile([r.ttft_s for r in run.records], 50),
                 "output_tok_s": sum(r.output_tokens for r in run.records) / run.wall_s} for run in runs],
        image_ttft_p50_ms=percentile([r.ttft_s for r in records if r.has_image], 50),
        text_ttft_p50_ms=percentile([r.ttft_s for r in records if not r.has_image], 50),
        first_itl_p50_ms=percentile(first_itl, 50), first_itl_p99_ms=percentile(first_itl, 99))


def run_topologies(model: str, seed: int, topologies: tuple[Topology, ...], levels: tuple[tuple[int, int], ...],
                   rounds: int) -> dict[str, list[dict[str, Any]]]:
    """Round after round; in each, every topology at one level, then the next level (a shared
    VM drifts over minutes). Each cluster picks its GEMM kernels by timing them at load, so
    clusters differ a little by themselves: rounds average that out too. Returns, per
    topology name, `pool_level` of each (concurrency, requests) in `levels`."""
    runs: dict[tuple[str, int], list[LevelRun]] = {(t.name, c): [] for t in topologies for c, _ in levels}
    for round_ in range(rounds):
        for concurrency, requests in levels:
            for topology in topologies:
                runs[topology.name, concurrency].append(
                    topology_level(model, seed, topology, concurrency, requests, round_))
    return {t.name: [pool_level(c, runs[t.name, c]) for c, _ in levels] for t in topologies}


def paired_ttft_delta_ms(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Median over requests of b's TTFT minus a's for the same request (same workload): steadier
    than a difference of medians when prompts and images vary from request to request."""
    ttft = {r["rid"]: r["ttft_s"] for r in a["records"]}
    return percentile([r["ttft_s"] - ttft[r["rid"]] for r in b["records"] if r["rid"] in ttft], 50)
