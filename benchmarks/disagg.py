"""E/P/D (prefill and decode on separate workers) against E/PD and EPD, in one run.

    python benchmarks/disagg.py [--model DIR] [--threads N] [--concurrency 1 8] [--out benchmarks/results] [--quick]

1. topologies -- EPD (agg_multimodal.sh), E/PD (agg_multimodal_epd.sh) and E/P/D
                 (disagg_multimodal_epd.sh: 1 encode, 1 prefill, 1 decode worker) on the same
                 `build_workload` requests, closed loop, level by level, each (level, topology)
                 on a fresh cluster (topologies.py); the decode worker's KV READ counters.
2. paired     -- E/PD vs E/P/D TTFT at c=1, both clusters up, each request to both back to back
                 (ABBA), over rounds of fresh cluster pairs (cluster_ttft.run_paired); the
                 paired median end to end and besides the model's compute.
3. kv         -- a prompt's KV blocks between two registered pools in two processes
                 (transfer_probe.py): `KVTransfer.load` as the decode worker runs it, the same
                 agent reading the same bytes as one range, a raw NIXL READ of them, memcpy.
Writes disagg.json (raw numbers) and disagg.md (tables) to --out.
"""

from __future__ import annotations

import argparse
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cluster_ttft import ci_text, paired_md, run_paired
from epdserve.config import WorkerConfig
from machine import gemm_probe_gflops, machine_line, run_parts
from report import Target, table, targets_table, write_report
from topologies import E_P_D, E_PD, EPD, paired_ttft_delta_ms, run_topologies
from transfer_probe import measure_pair, memcpy_times, merge_rounds, mode_rates, rate
from workload import ensure_model

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGIES = (EPD, E_PD, E_P_D)
TARGETS = {"ttft_ms": 5.0, "kv_vs_raw": 0.8}
KV_MODES = ("kv", "kv-1range", "raw", "raw-prog")
POOL_HEADROOM = 4    # the probe pools hold this many times the largest prompt's blocks


@dataclass(frozen=True)
class Config:
    model: str
    preset: str | None
    seed: int
    levels: tuple[tuple[int, int], ...]   # (concurrency, requests)
    topology_rounds: int                  # passes over every (level, topology), fresh clusters
    paired_requests: int                  # per kind (image, text), over all rounds
    paired_warmup: int                    # per kind, to both clusters of a round, before it
    paired_rounds: int                    # fresh cluster pairs
    prompt_tokens: tuple[int, ...]        # KV probe: prompt sizes
    kv_rounds: int                        # KV probe: passes over every mode, fresh processes
    reps: int                             # KV probe: timed READs per case and round
    warmup: int                           # KV probe: untimed ones before them (the first connects)


# --------------------------------------------------------------------------- 3. KV bandwidth

def kv_shape(model: str) -> dict[str, Any]:
    """The worker's KV pool geometry for `model` (text decoder's layers, KV heads, head size,
    the checkpoint's dtype, the workers' default block size), without loading weights."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model)
    text = config.get_text_config()
    dtype = getattr(text, "dtype", None) or getattr(config, "dtype", None) or "float32"
    return {"num_layers": text.num_hidden_layers, "num_kv_heads": text.num_key_value_heads,
            "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            "dtype": str(dtype).removeprefix("torch."), "block_size": WorkerConfig.block_size}


def bytes_per_block(shape: dict[str, Any]) -> int:
    """One block's K and V over all layers."""
    import torch
    itemsize = getattr(torch, shape["dtype"]).itemsize
    return 2 * shape["num_layers"] * shape["block_size"] * shape["num_kv_heads"] * shape["head_dim"] * itemsize


def _kv_cases(tokens: tuple[int, ...], block_size: int, num_blocks: int, seed: int) -> list[dict[str, Any]]:
    """Per prompt size two block lists: "runs" (consecutive on both sides, at different places,
    as the block manager hands out a fresh pool's blocks: 2 x layers ranges in all), and
    "scattered" (random blocks on both sides, as a long-used pool may give: a range per block
    and layer)."""
    rng = random.Random(f"{seed}/kv")
    cases = []
    for t in tokens:
        n = -(-t // block_size)
        cases.append({"name": f"{t} tokens", "tokens": t, "local": list(range(num_blocks - n, num_blocks)),
                      "remote": list(range(n))})
        cases.append({"name": f"{t} tokens, scattered", "tokens": t, "local": rng.sample(range(num_blocks), n),
                      "remote": rng.sample(range(num_blocks), n)})
    return cases


def run_kv(cfg: Config) -> dict[str, Any]:
    """Round after round, every mode in a fresh pair of processes (UCX_TLS as the launch
    scripts leave it): the modes compared are measured seconds apart."""
    shape = kv_shape(cfg.model)
    per_block = bytes_per_block(shape)
    blocks = [-(-t // shape["block_size"]) for t in cfg.prompt_tokens]
    pool = {**shape, "num_blocks": POOL_HEADROOM * max(blocks)}
    cases = _kv_cases(cfg.prompt_tokens, shape["block_size"], pool["num_blocks"], cfg.seed)
    runs_only = [c for c in cases if "scattered" not in c["name"]]
    sizes = [(c["name"], len(c["local"]) * per_block) for c in runs_only]
    common = {"reps": cfg.reps, "warmup": cfg.warmup}
    specs = {"kv": {"kv": pool, "cases": cases, **common}, "kv-1range": {"kv": pool, "cases": runs_only, **common},
             "raw": {"cases": [[[n, per_block // 4]] for n in blocks], **common}}
    specs["raw-prog"] = specs["raw"]
    named = {m: sizes for m in KV_MODES} | {"kv": [(c["name"], len(c["local"]) * per_block) for c in cases]}
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in KV_MODES}
    probes = []
    for round_ in range(cfg.kv_rounds):
        probes.append(gemm_probe_gflops())
        for mode in KV_MODES:
            results[mode].append(measure_pair(mode, None, specs[mode]))
        got = {m: mode_rates(results[m][-1], named[m]) for m in KV_MODES}
        print(f"[kv] round {round_ + 1}, {sizes[-1][0]}: " + ", ".join(
            f"{m} {r['cases'][sizes[-1][0]]['median_gbps']:.2f} GB/s" if r["status"] == "ok" else f"{m} {r['status']}"
            for m, r in got.items()), flush=True)
    memcpy = {name: rate(nbytes, memcpy_times([[n, per_block // 4]], cfg.reps * cfg.kv_rounds, cfg.warmup))
              for (name, nbytes), n in zip(sizes, blocks)}
    return {"shape": pool, "bytes_per_block": per_block, "probe_gflops": probes, "memcpy": memcpy,
            "bytes": dict(sizes),
            "ranges": {c["name"]: _range_count(c, shape["num_layers"]) for c in cases},
            "modes": {m: mode_rates(merge_rounds(results[m]), named[m]) for m in KV_MODES}}


def _range_count(case: dict[str, Any], layers: int) -> int:
    """Ranges `paired_ranges` makes of the case: runs consecutive on both sides, per K/V and layer."""
    pairs = list(zip(case["local"], case["remote"]))
    runs = 1 + sum(1 for (a, b), (c, d) in zip(pairs, pairs[1:]) if (c, d) != (a + 1, b + 1))
    return 2 * layers * runs


def _gbps(kv: dict[str, Any], mode: str, case: str) -> float:
    m = kv["modes"][mode]
    return m["cases"][case]["median_gbps"] if m["status"] == "ok" else float("nan")


def _raw_best(kv: dict[str, Any], case: str) -> float:
    """The faster bare NIXL READ of the two (without / with NIXL's progress thread)."""
    return max(_gbps(kv, "raw", case), _gbps(kv, "raw-prog", case))


def in_cluster_kv(topologies: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per E/P/D level: the decode worker's READs over the measured requests (all rounds)."""
    out = []
    for level in topologies[E_P_D.name]:
        decode = [c.get("decode", {}) for c in level["counters"]]
        total = {k: sum(d.get(k, 0) for d in decode)
                 for k in ("kv_bytes_read", "kv_read_us", "kv_blocks_read", "kv_blocks_cached")}
        us, nbytes = total["kv_read_us"], total["kv_bytes_read"]
        out.append({"concurrency": level["concurrency"], "requests": level["requests"], **total,
                    "gbps": nbytes / us / 1e3 if us else float("nan"),
                    "bytes_per_block": nbytes / total["kv_blocks_read"] if total["kv_blocks_read"] else float("nan")})
    return out


# --------------------------------------------------------------------------- targets and report

def evaluate_targets(results: dict[str, Any]) -> list[Target]:
    paired, kv = results["paired"], results["kv"]
    targets = []
    for kind in ("image", "text"):
        k = paired[kind]
        added = k["added_delta_p50_ms"]
        targets += [
            Target(f"E/P/D - E/PD TTFT at c=1 besides the model's compute, {kind} requests (interleaved, paired median)",
                   f"<= {TARGETS['ttft_ms']:.0f} ms",
                   f"{added:+.1f} ms (90% CI {ci_text(k['added_delta_p50_ci90_ms'])}; compute Δ "
                   f"{k['compute_delta_p50_ms']:+.1f} ms, CI {ci_text(k['compute_delta_p50_ci90_ms'])})",
                   added <= TARGETS["ttft_ms"]),
            Target(f"E/P/D - E/PD TTFT at c=1, {kind} requests, end to end (interleaved, paired median)",
                   f"<= {TARGETS['ttft_ms']:.0f} ms",
                   f"{k['paired_delta_p50_ms']:+.1f} ms (90% CI {ci_text(k['paired_delta_p50_ci90_ms'])}; p50 E/PD "
                   f"{k['base_ttft_p50_ms']:.0f} / E/P/D {k['other_ttft_p50_ms']:.0f} ms)",
                   k["paired_delta_p50_ms"] <= TARGETS["ttft_ms"])]
    for name in kv["memcpy"]:
        ratio = _gbps(kv, "kv", name) / _raw_best(kv, name)
        targets.append(Target(f"KV READ (KVTransfer.load, blocks in runs) / raw NIXL READ, {name}",
                              f">= {TARGETS['kv_vs_raw']}",
                              f"{ratio:.2f} ({_gbps(kv, 'kv', name):.2f} / {_raw_best(kv, name):.2f} GB/s)",
                              ratio >= TARGETS["kv_vs_raw"]))
    for level in results["in_cluster_kv"]:
        targets.append(Target(f"in-cluster KV READ, decode worker, c={level['concurrency']} (informational)", "–",
                              f"{level['gbps']:.2f} GB/s ({level['kv_bytes_read'] / 1e6:.1f} MB in "
                              f"{level['kv_read_us'] / 1e3:.0f} ms)", None))
    return targets


def _topologies_md(topo: dict[str, list[dict[str, Any]]]) -> list[str]:
    by = {t: {lvl["concurrency"]: lvl for lvl in levels} for t, levels in topo.items()}
    rows = []
    for c in sorted(by[EPD.name]):
        for t in topo:
            lvl = by[t][c]
            vs = by[E_PD.name][c]
            rows.append([str(c), t, f"{lvl['ttft_p50_ms']:.0f}", f"{lvl['ttft_p99_ms']:.0f}",
                         f"{lvl['itl_p50_ms']:.1f}", f"{lvl['itl_p99_ms']:.1f}", f"{lvl['first_itl_p50_ms']:.1f}",
                         f"{lvl['output_tok_s']:.1f}", f"{lvl['output_tok_s'] / vs['output_tok_s']:.2f}x",
                         f"{paired_ttft_delta_ms(vs, lvl):+.1f}", str(lvl["requests"]),
                         " / ".join(f"{p:.0f}" for p in lvl["probe_gflops"]), str(len(lvl["warnings"]))])
    rounds = len(next(iter(by[EPD.name].values()))["rounds"])
    return [f"## 1. EPD vs E/PD vs E/P/D (same workload; {rounds} round(s), each level and topology on a fresh "
            "cluster)", "",
            *table(["c", "topology", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "1st ITL p50 ms",
                    "output tok/s", "tok/s vs E/PD", "TTFT paired Δ vs E/PD ms", "requests", "probe GFLOP/s",
                    "routing warnings"], rows)]


def _in_cluster_md(levels: list[dict[str, Any]], probe_bytes_per_block: int) -> list[str]:
    rows = [[str(lv["concurrency"]), str(lv["requests"]), f"{lv['kv_blocks_read']}", f"{lv['kv_blocks_cached']}",
             f"{lv['kv_bytes_read'] / 1e6:.1f}", f"{lv['kv_read_us'] / 1e3:.1f}", f"{lv['gbps']:.2f}",
             f"{lv['bytes_per_block']:.0f}"] for lv in levels]
    return ["The E/P/D decode worker's KV READs over part 1's measured requests (its counters, all rounds; "
            f"the probe's pools have {probe_bytes_per_block} bytes per block):", "",
            *table(["c", "requests", "blocks read", "blocks cached (not read)", "MB read", "ms in READs", "GB/s",
                    "bytes per block"], rows)]


def _kv_md(kv: dict[str, Any]) -> list[str]:
    rows = []
    for name, nbytes in kv["bytes"].items():
        scattered = f"{name}, scattered"
        whole = kv["modes"]["kv"]["cases"][name] if kv["modes"]["kv"]["status"] == "ok" else None
        split = f"{whole['read_median_ms']:.2f} / {whole['median_ms']:.2f}" if whole else "–"
        rows.append([f"{name} ({nbytes / 1e6:.1f} MB)", f"{_gbps(kv, 'kv', name):.2f} ({kv['ranges'][name]})", split,
                     f"{_gbps(kv, 'kv', scattered):.2f} ({kv['ranges'][scattered]})",
                     f"{_gbps(kv, 'kv-1range', name):.2f}", f"{_gbps(kv, 'raw', name):.2f}",
                     f"{_gbps(kv, 'raw-prog', name):.2f}", f"{kv['memcpy'][name]['median_gbps']:.2f}",
                     f"{_gbps(kv, 'kv', name) / _raw_best(kv, name):.2f}",
                     f"{_gbps(kv, 'kv', name) / _gbps(kv, 'kv-1range', name):.2f}"])
    failed = [f"- {m}: {r['status']}: {r['why']}" for m, r in kv["modes"].items() if r["status"] != "ok"]
    s = kv["shape"]
    return ["## 3. KV transfer bandwidth (GB/s, median; two processes, UCX_TLS unset)", "",
            (f"Pools of {s['num_blocks']} blocks of {s['block_size']} tokens, {s['num_layers']} layers x "
             f"{s['num_kv_heads']} KV heads x {s['head_dim']} ({s['dtype']}): {kv['bytes_per_block']} bytes per block "
             "(K and V, all layers). Probe GFLOP/s per round: " + " / ".join(f"{p:.0f}" for p in kv["probe_gflops"])
             + "."), "",
            *table(["prompt", "KV READ, runs (ranges)", "its READ / whole ms", "KV READ, scattered (ranges)",
                    "agent, one range", "raw READ", "raw READ + prog thread", "memcpy", "KV / best raw",
                    "KV / one range"], rows), *failed, ""]


NOTES = """\
- **topologies**: `build_workload`'s requests (half with one PNG, 16..96 output tokens, EOS
  ignored), closed loop at `c`, the same for every topology; each (level, topology) on a fresh
  cluster after a two-request warm-up, round after round. TTFT from the client; ITL between
  token-bearing SSE chunks; "1st ITL" is the gap between the first and second token, where
  E/P/D hands the request from the prefill to the decode worker (the decode worker's READ of
  the prompt's KV is in it). "TTFT paired Δ vs E/PD" is the median over requests of the
  per-request difference (same request, same round). Routing warnings count levels whose
  counters show requests that did not take the topology's path (images not encoded by the
  encode worker; requests not prefilled by the prefill worker, or prefilled by the decode worker).
- **paired**: as embedding_transfer.py's part 4 with E/PD as the base and E/P/D as the other:
  each round a fresh E/PD and a fresh E/P/D cluster, both up; image and text-only requests
  alternate, each sent to both back to back (ABBA), one in flight, 4 output tokens, nothing
  cached. "besides compute" subtracts each request's model compute, read from the workers'
  counters between requests: `prompt_step_us` of the PD, prefill (and decode) workers and
  `encode_us` of the encode workers. A request's TTFT in E/P/D ends with the prefill worker's
  first token, which the processor passes on before it starts the decode worker: the KV
  READ is not in TTFT but in the first ITL.
- **KV bandwidth**: a holder process (the prefill worker's side: a zero-filled pool of the
  model's KV shape registered once by `KVTransfer`, `handoff` of a prompt's blocks,
  `expect(notif)` awaited) and a reader (the decode worker's side: `KVTransfer.load` of those
  blocks into its own pool, none cached: `paired_ranges` and one `TransferAgent.read_ranges`),
  fresh processes per mode and round. "runs": the blocks consecutive on both sides (a fresh
  pool's allocation), one range per K/V and layer; "scattered": random blocks, one range per
  block, K/V and layer. "agent, one range": the same agents, one `read_ranges` of the same
  bytes from pool start to pool start. "raw": bare `nixl_agent`s, one READ of the same bytes
  as one range into registered memory, without NIXL's progress thread (both sides busy-poll)
  and with it ("+ prog thread"); the target compares with the faster of the two. memcpy:
  `dst.copy_(src)` in one process. GB/s = 10^9 bytes per second of the median repetition;
  "its READ / whole ms" splits the time inside `read_ranges` off the whole `load`.
- **in-cluster**: `kv_bytes_read` / `kv_read_us` of the E/P/D decode worker over part 1's
  measured requests: the time inside `read_ranges`, connection set up in the warm-up.
- probe GFLOP/s: a one-thread GEMM timed for 1 s before each measurement (the VM's speed drifts).
"""


def render_markdown(report: dict[str, Any]) -> str:
    cfg, res = report["config"], report["results"]
    lines = [
        "# E/P/D disaggregation", "",
        (f"Model `{cfg['model']}` (preset: {cfg['preset'] or 'given'}); seed {cfg['seed']}; OMP threads: "
         f"{cfg['threads']}."),
        machine_line(report), "",
        *targets_table(report["targets"]),
        *_topologies_md(res["topologies"]),
        *_in_cluster_md(res["in_cluster_kv"], res["kv"]["bytes_per_block"]),
        *paired_md(res["paired"], "2"),
        *_kv_md(res["kv"]),
        "## Definitions", "", NOTES]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", help="HF LLaVA directory (default: a random-weight one, preset bench)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for every process (default 1)")
    p.add_argument("--concurrency", type=int, nargs="+", help="part 1's levels (default: 1 8)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny preset, c = 1 and 4 with few requests, one round, "
                        "4 paired requests per kind, prompts of 256 and 1024 tokens")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> Config:
    preset = "tiny" if args.quick else "bench"
    model = Path(args.model) if args.model else ensure_model(preset)
    common = dict(model=str(model.resolve()), preset=None if args.model else preset, seed=args.seed)
    if args.quick:
        levels = tuple((c, 2 * c + 2) for c in args.concurrency or (1, 4))
        return Config(**common, levels=levels, topology_rounds=1, paired_requests=4, paired_warmup=1,
                      paired_rounds=1, prompt_tokens=(256, 1024), kv_rounds=1, reps=3, warmup=1)
    # c = 1 needs more requests than its time suggests: one request's TTFT varies by tens of ms
    levels = tuple((c, max(24, 6 * c)) for c in args.concurrency or (1, 8))
    return Config(**common, levels=levels, topology_rounds=2, paired_requests=240, paired_warmup=2,
                  paired_rounds=12, prompt_tokens=(256, 1024, 2048), kv_rounds=4, reps=8, warmup=2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)   # inherited by every child, read at torch import
    import torch
    torch.set_num_threads(args.threads)
    c = make_config(args)
    # The short KV probe first: a failure there shows before the clusters' half hour.
    report = run_parts({**asdict(c), "threads": args.threads}, {
        "kv": lambda: run_kv(c),
        "topologies": lambda: run_topologies(c.model, c.seed, TOPOLOGIES, c.levels, c.topology_rounds),
        "paired": lambda: run_paired(c.model, c.seed, c.paired_requests, c.paired_warmup, c.paired_rounds,
                                     pair=(E_PD, E_P_D))})
    report["results"]["in_cluster_kv"] = in_cluster_kv(report["results"]["topologies"])
    report["targets"] = [asdict(t) for t in evaluate_targets(report["results"])]
    write_report(args.out, "disagg", report, render_markdown(report))


if __name__ == "__main__":
    main()
