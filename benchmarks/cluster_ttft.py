"""TTFT on live clusters, one request at a time (embedding_transfer.py parts 2 and 4).

- cache:  an image's TTFT on an encoder-cache miss vs a hit, E/PD cluster, two variants:
          "encoder cache only" (a unique system text before the image: the PD prefix cache
          cannot help, a hit saves the encode alone) and "repeated image" (the same image with
          a new question: its KV blocks are a cached prefix too).
- paired: two topologies' clusters (EPD and E/PD, or E/PD and E/P/D) up at once, every
          request sent to both back to back (ABBA), so the VM's drift between minutes and
          between clusters cancels out of the difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np

from cluster import Cluster, client_for, data_url, http_cluster, timed_chat
from epdserve.tools.images import synthetic_png
from epdserve.tools.stats import StatsReader
from machine import gemm_probe_gflops
from metrics import RequestRecord, percentile
from report import table
from topologies import E_PD, EPD, Counters, Topology, component_counters, counter_diff, counters, wait_workers
from workload import WorkItem

IMAGE_SIZE = (640, 480)
MAX_TOKENS = 4        # TTFT is what is measured; a few tokens keep each sample short
BOOTSTRAP_SAMPLES = 4000
QUESTIONS = ("What is in this image?", "Describe the picture briefly.", "What colors do you see?",
             "Is there anything unusual here?", "Summarize this in one sentence.", "Which color covers the most?",
             "Is it a photo or a drawing?", "What is in the top left corner?")

Messages = list[dict[str, Any]]


def _diff(before: dict[str, int], after: dict[str, int], key: str) -> int:
    return after.get(key, 0) - before.get(key, 0)


# --------------------------------------------------------------------------- cache

def _image_turn(url: str, question: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": question}]}


def _encoder_only(url: str, n: int) -> Messages:
    """A unique system text first: the template puts it before the image, so the PD worker's
    prefix cache cannot reuse the image's KV blocks and a hit saves only the encode."""
    return [{"role": "system", "content": f"Session {uuid.uuid4().hex[:12]}."}, _image_turn(url, QUESTIONS[0])]


def _repeated_image(url: str, n: int) -> Messages:
    """The image, then question `n`: the LLaVA template puts the image first, so on a hit its
    KV blocks are a prefix the PD worker has cached (a new question about the same picture)."""
    return [_image_turn(url, QUESTIONS[n % len(QUESTIONS)])]


CACHE_VARIANTS: dict[str, tuple[str, Callable[[str, int], Messages]]] = {
    "encoder_only": ("encoder cache only (unique system text first)", _encoder_only),
    "repeated_image": ("repeated image, new question", _repeated_image),
}


async def _cache_pairs(base_url: str, seeds: list[int],
                       messages: Callable[[str, int], Messages]) -> dict[str, list[RequestRecord]]:
    """For each seed: its image never seen (miss), then the same image again (hit); the
    question numbers differ between the two."""
    out: dict[str, list[RequestRecord]] = {"miss": [], "hit": []}
    async with client_for(base_url) as client:
        for i, seed in enumerate(seeds):
            url = data_url(synthetic_png(seed, IMAGE_SIZE))   # off the clock
            for j, kind in enumerate(("miss", "hit")):
                rec = RequestRecord(f"{kind}-{seed}", True, MAX_TOKENS)
                out[kind].append(await timed_chat(client, rec, messages(url, 2 * i + j)))
    return out


def _cache_variant(cluster: Cluster, seeds: list[int], messages: Callable[[str, int], Messages]) -> dict[str, Any]:
    enc, pd = counters(cluster), counters(cluster, "backend")
    samples = asyncio.run(_cache_pairs(cluster.base_url, seeds, messages))
    enc_after, pd_after = counters(cluster), counters(cluster, "backend")
    p50 = {kind: percentile([r.ttft_s for r in recs], 50) for kind, recs in samples.items()}
    return {"miss_ttft_p50_ms": p50["miss"], "hit_ttft_p50_ms": p50["hit"], "hit_vs_miss": p50["hit"] / p50["miss"],
            "encoder_cache_hits": _diff(enc, enc_after, "cache_hits"),
            "encoder_cache_misses": _diff(enc, enc_after, "cache_misses"),
            "pd_prefix_cache_hits": _diff(pd, pd_after, "prefix_cache_hits"),
            "pd_prefix_cache_queries": _diff(pd, pd_after, "prefix_cache_queries"),
            "records": {kind: [asdict(r) for r in recs] for kind, recs in samples.items()}}


def run_cache(model: str, seed: int, samples: int) -> dict[str, Any]:
    """One E/PD cluster; a warm-up pair of each variant, then each variant's pairs in turn."""
    rng = random.Random(f"{seed}/cache")
    seeds = rng.sample(range(2**31), len(CACHE_VARIANTS) * (samples + 1))
    per_variant = {key: seeds[i * (samples + 1):(i + 1) * (samples + 1)] for i, key in enumerate(CACHE_VARIANTS)}
    probe = gemm_probe_gflops()
    result: dict[str, Any] = {"image_size": IMAGE_SIZE, "samples": samples, "probe_gflops": probe, "variants": {}}
    with http_cluster(model, E_PD.script, label="cache") as cluster:
        wait_workers(cluster, E_PD)
        for key, (_, messages) in CACHE_VARIANTS.items():
            asyncio.run(_cache_pairs(cluster.base_url, per_variant[key][:1], messages))   # warm-up, not counted
        for key, (label, messages) in CACHE_VARIANTS.items():
            v = result["variants"][key] = _cache_variant(cluster, per_variant[key][1:], messages)
            print(f"[cache] {label}: TTFT p50 miss {v['miss_ttft_p50_ms']:.0f} ms, hit {v['hit_ttft_p50_ms']:.0f} ms "
                  f"({v['hit_vs_miss']:.2f}x); encoder hits {v['encoder_cache_hits']}, misses "
                  f"{v['encoder_cache_misses']}; PD prefix-cache block hits {v['pd_prefix_cache_hits']}/"
                  f"{v['pd_prefix_cache_queries']}", flush=True)
    return result


def cache_md(cache: dict[str, Any]) -> list[str]:
    rows = [[label, f"{v['miss_ttft_p50_ms']:.0f}", f"{v['hit_ttft_p50_ms']:.0f}", f"{v['hit_vs_miss']:.2f}",
             f"{v['encoder_cache_hits']} / {v['encoder_cache_misses']}",
             f"{v['pd_prefix_cache_hits']} / {v['pd_prefix_cache_queries']}"]
            for key, (label, _) in CACHE_VARIANTS.items() if (v := cache["variants"].get(key))]
    return [f"## 2. Encoder cache (E/PD, {cache['samples']} miss/hit pairs per variant, one request at a time; "
            f"probe {cache['probe_gflops']:.0f} GFLOP/s)", "",
            *table(["variant", "miss TTFT p50 ms", "hit TTFT p50 ms", "hit/miss", "encoder hits / misses",
                    "PD prefix-cache block hits / queries"], rows)]


# --------------------------------------------------------------------------- paired: two topologies

Pair = tuple[Topology, Topology]   # (base, other): every difference is other - base


def _paired_items(seed: int, tag: str, per_kind: int) -> list[WorkItem]:
    """Image and text-only requests alternating; each image never seen (a seed of its own) and
    each text led by a number of its own, so neither the encoder nor the prefix cache hits."""
    rng = random.Random(f"{seed}/{tag}")
    numbers = rng.sample(range(10**6, 10**7), 2 * per_kind)
    items = []
    for j, number in enumerate(numbers):
        image = synthetic_png(rng.randrange(2**31), IMAGE_SIZE) if j % 2 == 0 else None
        items.append(WorkItem(f"{tag}-{j}", f"Request {number}: {QUESTIONS[j % len(QUESTIONS)]}", image, MAX_TOKENS))
    return items


def _order(j: int, names: list[str]) -> list[str]:
    """ABBA over (image, text) pairs: items j = 0, 1 go to the base first, 2, 3 to the other
    first, ...; each kind goes first on each cluster equally often (N even)."""
    return names if (j // 2) % 2 == 0 else names[::-1]


def compute_us(stats: dict[str, dict[str, int]]) -> int:
    """Model compute a cluster's workers spent so far (us, cumulative): the PD and prefill
    workers' engine steps that ran a prompt chunk (EPD: the image's encode is inside them) and
    the encode workers' encoder calls."""
    return sum(v.get("prompt_step_us", 0) + v.get("encode_us", 0) for v in stats.values())


async def _paired_run(clusters: dict[str, Cluster], items: list[WorkItem]) -> dict[str, list[RequestRecord]]:
    """Each item to both clusters (base first in `clusters`), back to back in `_order`, one
    request in flight at a time; each record gets the model compute its cluster counted
    meanwhile (read between requests)."""
    images = {it.rid: data_url(it.image) for it in items if it.image is not None}   # off the clock
    names = list(clusters)
    out: dict[str, list[RequestRecord]] = {t: [] for t in names}
    async with contextlib.AsyncExitStack() as stack:
        clients = {t: await stack.enter_async_context(client_for(c.base_url)) for t, c in clusters.items()}
        readers = {t: await stack.enter_async_context(await StatsReader.connect(c.runtime))
                   for t, c in clusters.items()}
        spent = {t: compute_us(await r.read()) for t, r in readers.items()}
        for j, item in enumerate(items):
            for t in _order(j, names):
                rec = RequestRecord(item.rid, item.image is not None, item.max_tokens)
                out[t].append(await timed_chat(clients[t], rec, item.openai_messages(images.get(item.rid))))
                before, spent[t] = spent[t], compute_us(await readers[t].read())
                rec.compute_s = (spent[t] - before) / 1e6
    return out


def median_ci_ms(values_s: list[float], seed: int = 0, level: float = 0.9) -> tuple[float, float]:
    """A bootstrap `level` confidence interval of the median of `values_s` (s), in ms: one
    request's TTFT varies by tens of ms on this VM, so a median of a few ms needs it."""
    rng = np.random.default_rng(seed)
    draws = rng.choice(np.asarray(values_s), size=(BOOTSTRAP_SAMPLES, len(values_s)))
    medians = np.median(draws, axis=1) * 1000
    tail = (1 - level) / 2 * 100
    return float(np.percentile(medians, tail)), float(np.percentile(medians, 100 - tail))


def _paired_kind(records: dict[str, list[RequestRecord]], has_image: bool) -> dict[str, Any]:
    base, other = ({r.rid: r for r in recs if r.has_image == has_image} for recs in records.values())
    # In send order: even ones went to the base first (`_order`).
    deltas = [other[rid].ttft_s - base[rid].ttft_s for rid in base]
    compute = [other[rid].compute_s - base[rid].compute_s for rid in base]
    added = [d - c for d, c in zip(deltas, compute)]   # what the other adds besides the model's own compute
    return {"requests": len(deltas), "base_ttft_p50_ms": percentile([r.ttft_s for r in base.values()], 50),
            "other_ttft_p50_ms": percentile([r.ttft_s for r in other.values()], 50),
            "paired_delta_p50_ms": percentile(deltas, 50), "paired_delta_p25_ms": percentile(deltas, 25),
            "paired_delta_p75_ms": percentile(deltas, 75), "paired_delta_p50_ci90_ms": median_ci_ms(deltas),
            "other_first_delta_p50_ms": percentile([d for j, d in enumerate(deltas) if j % 2], 50),
            "base_first_delta_p50_ms": percentile([d for j, d in enumerate(deltas) if not j % 2], 50),
            "base_compute_p50_ms": percentile([r.compute_s for r in base.values()], 50),
            "compute_delta_p50_ms": percentile(compute, 50), "compute_delta_p50_ci90_ms": median_ci_ms(compute),
            "added_delta_p50_ms": percentile(added, 50), "added_delta_p25_ms": percentile(added, 25),
            "added_delta_p75_ms": percentile(added, 75), "added_delta_p50_ci90_ms": median_ci_ms(added)}


def _paired_round(model: str, seed: int, round_: int, per_kind: int, warmup: int, pair: Pair
                  ) -> tuple[dict[str, list[RequestRecord]], dict[str, Counters]]:
    """One pair of fresh clusters: `warmup` requests of each kind to both, then `per_kind`
    image and `per_kind` text-only requests, each to both back to back; (records per
    topology name, base first; each cluster's counters over the measured requests)."""
    items = _paired_items(seed, f"paired-r{round_}", per_kind)
    warm = _paired_items(seed, f"paired-warmup-r{round_}", warmup)
    with contextlib.ExitStack() as stack:
        # Entered one after the other, the first-started topology alternating by round.
        started = {t.name: stack.enter_context(http_cluster(model, t.script, label=f"paired r{round_} {t.name}"))
                   for t in (pair if round_ % 2 == 0 else pair[::-1])}
        clusters = {t.name: started[t.name] for t in pair}
        for t in pair:
            wait_workers(clusters[t.name], t)
        asyncio.run(_paired_run(clusters, warm))
        before = {t: component_counters(c) for t, c in clusters.items()}
        records = asyncio.run(_paired_run(clusters, items))
        diffs = {t: counter_diff(before[t], component_counters(c)) for t, c in clusters.items()}
    return records, diffs


def _add(total: Counters, diff: Counters) -> None:
    for comp, values in diff.items():
        mine = total.setdefault(comp, {})
        for key, value in values.items():
            mine[key] = mine.get(key, 0) + value


def run_paired(model: str, seed: int, per_kind: int, warmup: int, rounds: int, pair: Pair = (EPD, E_PD)
               ) -> dict[str, Any]:
    """`rounds` pairs of fresh clusters of `pair`, `per_kind // rounds` requests of each kind
    per round: two processes of one model differ in speed by a few percent for their whole
    life (a per-cluster offset of ~10 ms in an image request's prefill here), which one pair
    of clusters cannot average out however many requests it serves."""
    names = [t.name for t in pair]
    probes = [gemm_probe_gflops()]
    records: dict[str, list[RequestRecord]] = {t: [] for t in names}
    totals: dict[str, Counters] = {t: {} for t in names}
    per_round = []
    for round_ in range(rounds):
        recs, diffs = _paired_round(model, seed, round_, per_kind // rounds, warmup, pair)
        for t in names:
            records[t] += recs[t]
            _add(totals[t], diffs[t])
        image = _paired_kind(recs, True)
        per_round.append({k: image[k] for k in ("paired_delta_p50_ms", "added_delta_p50_ms",
                                                 "base_ttft_p50_ms", "other_ttft_p50_ms")})
        print(f"[paired] round {round_ + 1}: image {names[1]} - {names[0]} paired Δ p50 "
              f"{image['paired_delta_p50_ms']:+.1f} ms, besides compute {image['added_delta_p50_ms']:+.1f} ms", flush=True)
    probes.append(gemm_probe_gflops())
    measured = rounds * (per_kind // rounds)
    result = {"topologies": names, "image_size": IMAGE_SIZE, "max_tokens": MAX_TOKENS, "per_kind": measured,
              "warmup": warmup, "rounds": per_round, "probe_gflops": probes,
              "image": _paired_kind(records, True), "text": _paired_kind(records, False), "counters": totals,
              "records": {t: [asdict(r) for r in recs] for t, recs in records.items()}}
    for kind in ("image", "text"):
        k = result[kind]
        print(f"[paired] {kind}: TTFT p50 {names[0]} {k['base_ttft_p50_ms']:.0f} ms, {names[1]} "
              f"{k['other_ttft_p50_ms']:.0f} ms, paired Δ p50 {k['paired_delta_p50_ms']:+.1f} ms, besides compute "
              f"{k['added_delta_p50_ms']:+.1f} ms ({k['requests']} pairs)", flush=True)
    for t in names:
        enc = totals[t].get("encoder")
        if enc is not None and (enc.get("cache_misses", 0) != measured or enc.get("cache_hits", 0)):
            print(f"[paired] warning: {t}'s encode workers counted {enc.get('cache_misses', 0)} misses and "
                  f"{enc.get('cache_hits', 0)} hits for {measured} new images", flush=True)
    return result


def ci_text(pair: tuple[float, float]) -> str:
    """A confidence interval in ms, as "+a .. +b"."""
    return "{:+.1f} .. {:+.1f}".format(*pair)


def _cache_counts(paired: dict[str, Any]) -> str:
    """Encoder hits / misses and prefix-cache block hits (every worker) of each topology."""
    parts = []
    for t, comps in paired["counters"].items():
        enc = comps.get("encoder")
        hits = sum(v.get("prefix_cache_hits", 0) for v in comps.values())
        encoder = f"encoder hits / misses {enc.get('cache_hits', 0)} / {enc.get('cache_misses', 0)}, " if enc else ""
        parts.append(f"{t}: {encoder}prefix-cache block hits {hits}")
    return "; ".join(parts)


def paired_md(paired: dict[str, Any], section: str) -> list[str]:
    """Section `section` of a report: the paired comparison's tables."""
    base, other = paired["topologies"]
    kinds = [(kind, k) for kind in ("image", "text") if (k := paired[kind])]
    rows = [[kind, str(k["requests"]), f"{k['base_ttft_p50_ms']:.0f}", f"{k['other_ttft_p50_ms']:.0f}",
             f"{k['other_ttft_p50_ms'] - k['base_ttft_p50_ms']:+.1f}", f"{k['paired_delta_p50_ms']:+.1f}",
             ci_text(k["paired_delta_p50_ci90_ms"]),
             f"{k['paired_delta_p25_ms']:+.1f} .. {k['paired_delta_p75_ms']:+.1f}",
             f"{k['base_first_delta_p50_ms']:+.1f} / {k['other_first_delta_p50_ms']:+.1f}"] for kind, k in kinds]
    added = [[kind, f"{k['base_compute_p50_ms']:.0f}", f"{k['compute_delta_p50_ms']:+.1f}",
              ci_text(k["compute_delta_p50_ci90_ms"]), f"{k['added_delta_p50_ms']:+.1f}",
              ci_text(k["added_delta_p50_ci90_ms"]),
              f"{k['added_delta_p25_ms']:+.1f} .. {k['added_delta_p75_ms']:+.1f}"] for kind, k in kinds]
    rounds = ", ".join(f"{r['paired_delta_p50_ms']:+.1f}" for r in paired["rounds"])
    rounds_added = ", ".join(f"{r['added_delta_p50_ms']:+.1f}" for r in paired["rounds"])
    return [f"## {section}. {base} vs {other} at c=1, interleaved ({len(paired['rounds'])} round(s), each on a fresh "
            f"pair of clusters, both up, each request to both back to back, ABBA; {paired['max_tokens']} output "
            "tokens)", "",
            *table(["requests", "pairs", f"{base} TTFT p50 ms", f"{other} TTFT p50 ms", "Δ of p50s ms",
                    "paired Δ p50 ms", "its 90% CI (bootstrap) ms", "paired Δ p25 .. p75 ms",
                    f"paired Δ p50, {base} first / {other} first"], rows),
            f"The same pairs split into the model's compute (the workers' own counters) and the rest, what "
            f"{other} adds:", "",
            *table(["requests", f"{base} compute p50 ms", "compute paired Δ p50 ms", "its 90% CI ms",
                    "TTFT - compute paired Δ p50 ms", "its 90% CI ms", "its p25 .. p75 ms"], added),
            f"Over the measured requests: {_cache_counts(paired)}; probe GFLOP/s before / after: "
            + " / ".join(f"{p:.0f}" for p in paired["probe_gflops"]) + ".", "",
            f"Image paired Δ p50 per round (ms): {rounds}; besides compute: {rounds_added}.", ""]
