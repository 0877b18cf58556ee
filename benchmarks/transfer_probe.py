"""Transfer bandwidth between two processes: embeddings as between an encode worker and a PD
worker, KV blocks as between a prefill and a decode worker.

`measure_pair(mode, ucx_tls, spec)` starts a holder and a reader, each a fresh
`python transfer_probe.py ROLE MODE FD SPEC [RESULT_FD]`, with UCX_TLS in their environment
before nixl loads. They talk over a multiprocessing Pipe. Modes:
  handoff  -- our path: the holder's `TransferAgent` keeps the tensors in its `EmbeddingCache`
              and awaits `expect(notif)`; the reader enters `MediaResolver.resolve` for a
              request carrying them (a staging span of a `spec["staging_bytes"]` region, one
              `TransferAgent.read`; the tensors stay in the span, or are cloned out and the
              span freed when the region would be over half full).
  raw      -- two bare `nixl_agent`s without a progress thread (as `TransferAgent` runs):
              one initialize_xfer + transfer + busy-polled check_xfer_state; the holder
              busy-polls get_new_notifs (it progresses READs that need the target, e.g. TCP).
  raw-prog -- the same with NIXL's default progress thread; both sides poll every POLL_S.
  kv       -- the P/D path: the holder's `KVTransfer` (a KV pool of `spec["kv"]`'s shape,
              registered once) hands out a case's `remote` blocks and awaits `expect(notif)`,
              as `PrefillHandler` does; the reader `KVTransfer.load`s them into its own pool's
              `local` blocks (none cached), as `PDHandler._decode` does.
  kv-1range -- the same holder; the reader `TransferAgent.read_ranges` the same number of
              bytes as one range, pool start to pool start: the agent without block structure.
Per rep: the reader sends ("go", case, notif); the holder arms its wait for `notif` and
answers ("armed", ...); the reader times its READ. The holder goes back to the pipe only once
the READ's notification has arrived, so no two reps overlap.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

MODES = ("handoff", "raw", "raw-prog")
KV_MODES = ("kv", "kv-1range")
POLL_S = 0.0001          # raw-prog: the progress thread moves data, the waiters only look
NOTIF_TIMEOUT_S = 60.0


def _nbytes(shapes: list[list[int]]) -> int:
    return sum(r * c * 4 for r, c in shapes)   # float32 [rows, hidden]


def _check_ucx(nixl: Any) -> None:
    """nixl logs a backend it cannot create and goes on without it: make that an error."""
    if "UCX" not in nixl.backends:
        raise RuntimeError("the UCX backend could not be created")


def _nixl_agent(name: str, prog: bool) -> Any:
    from nixl._api import nixl_agent, nixl_agent_config
    agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=prog, backends=["UCX"]))
    _check_ucx(agent)
    return agent


# --------------------------------------------------------------------------- holder

class HandoffHolder:
    """The encode worker's side: embeddings in the `EmbeddingCache`, `expect(notif)`."""

    def __init__(self, cases: list[list[list[int]]]):
        from epdserve.transfer.agent import TransferAgent
        from epdserve.transfer.region import ALIGNMENT
        from epdserve.worker.embedding_cache import EmbeddingCache
        size = sum(_nbytes(shapes) + ALIGNMENT * len(shapes) for shapes in cases)
        self.agent = TransferAgent("holder", size, torch.device("cpu"))
        _check_ucx(self.agent._nixl)
        cache = EmbeddingCache(self.agent)
        self.remotes = [[cache.remote(cache.insert(f"{i}/{j}", torch.full(tuple(s), j + 1.0))).SerializeToString()
                         for j, s in enumerate(shapes)] for i, shapes in enumerate(cases)]

    def describe(self) -> bytes:
        return self.agent.metadata

    async def serve(self, case: int, notif: bytes, peer: Connection) -> None:
        done = self.agent.expect(notif)
        try:
            peer.send(("armed", self.agent.handoff(notif).SerializeToString(), self.remotes[case]))
            await asyncio.wait_for(done, NOTIF_TIMEOUT_S)
        finally:
            self.agent.forget(notif)


class RawHolder:
    """Bare NIXL: one registered tensor holding every case back to back."""

    def __init__(self, cases: list[list[list[int]]], prog: bool):
        self.prog = prog
        self.nixl = _nixl_agent("holder", prog)
        self.region = torch.empty(sum(_nbytes(s) for s in cases) // 4)
        self.nixl.register_memory(self.region)
        self.descs, cursor = [], 0
        for shapes in cases:
            case = []
            for j, (rows, cols) in enumerate(shapes):
                self.region[cursor:cursor + rows * cols] = j + 1.0
                case.append((self.region.data_ptr() + cursor * 4, rows * cols * 4))
                cursor += rows * cols
            self.descs.append(case)

    def describe(self) -> bytes:
        return self.nixl.get_agent_metadata()

    async def serve(self, case: int, notif: bytes, peer: Connection) -> None:
        peer.send(("armed", b"", self.descs[case]))
        deadline = time.monotonic() + NOTIF_TIMEOUT_S
        while not any(notif in msgs for msgs in self.nixl.get_new_notifs().values()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no notification {notif!r}")
            if self.prog:
                time.sleep(POLL_S)


def _kv_pool(kv: dict[str, Any]) -> Any:
    """A zero-filled `KVCache` of `kv`'s shape, allocated as a worker allocates its pool: after
    `keep_freed_memory` (its start-up), so from the same kind of memory."""
    from epdserve.attention.kv_cache import KVCache
    from epdserve.utils.memory import keep_freed_memory
    keep_freed_memory()
    return KVCache.allocate(kv["num_layers"], kv["num_blocks"], kv["block_size"], kv["num_kv_heads"],
                            kv["head_dim"], getattr(torch, kv["dtype"]), "cpu")


def _block_bytes(pool: torch.Tensor) -> torch.Tensor:
    """`pool` [2, layers, blocks, ...] as bytes [2, layers, blocks, one layer's K (or V) of a block]."""
    return pool.view(torch.uint8).view(*pool.shape[:3], -1)


def _block_marks(pool: torch.Tensor) -> torch.Tensor:
    """Each (K/V, layer, block)'s mark: its index in the pool, mod 251 (any dtype, as bytes)."""
    kv, layers, blocks = pool.shape[:3]
    return (torch.arange(kv * layers * blocks) % 251).to(torch.uint8).view(kv, layers, blocks)


class KVHolder:
    """The prefill worker's side: a KV pool registered by `KVTransfer`, every block's bytes set
    to its mark; each case's `remote` blocks handed out as `PrefillHandler` hands out a
    prompt's, `expect(notif)` awaited."""

    def __init__(self, spec: dict[str, Any]):
        from epdserve.transfer.agent import TransferAgent
        from epdserve.config import TransferTimeouts
        from epdserve.worker.kv_transfer import KVTransfer
        self.agent = TransferAgent("holder", 0, torch.device("cpu"))
        kv = _kv_pool(spec["kv"])
        self.pool = kv.pool   # KVTransfer keeps only its layout; registered memory must stay alive
        _block_bytes(self.pool)[:] = _block_marks(self.pool).unsqueeze(-1)
        self.kv = KVTransfer(self.agent, kv, TransferTimeouts())
        self.blocks = [case["remote"] for case in spec["cases"]]

    def describe(self) -> bytes:
        return self.agent.metadata

    async def serve(self, case: int, notif: bytes, peer: Connection) -> None:
        done = self.agent.expect(notif)
        try:
            peer.send(("armed", self.kv.handoff(notif, self.blocks[case], 0, NOTIF_TIMEOUT_S).SerializeToString(), None))
            await asyncio.wait_for(done, NOTIF_TIMEOUT_S)
        finally:
            self.agent.forget(notif)


async def holder(mode: str, spec: dict[str, Any], peer: Connection) -> None:
    try:
        store = HandoffHolder(spec["cases"]) if mode == "handoff" else KVHolder(spec) if mode in KV_MODES \
            else RawHolder(spec["cases"], mode == "raw-prog")
    except Exception as exc:   # e.g. a UCX_TLS this machine cannot serve
        peer.send(("unavailable", f"{type(exc).__name__}: {exc}"))
        return
    peer.send(("ready", store.describe()))
    while (msg := peer.recv())[0] == "go":
        await store.serve(msg[1], msg[2], peer)


# --------------------------------------------------------------------------- reader

@dataclass(frozen=True)
class Sample:
    total_s: float     # until the reader has the tensors to use
    read_s: float      # of which inside the READ
    held: bool         # the tensors alias the reader's registered region (not copied out)
    correct: bool      # every tensor read holds what the holder wrote


def _correct(tensors: list[torch.Tensor]) -> bool:
    return all(float(t.flatten()[-1]) == j + 1.0 for j, t in enumerate(tensors))


class HandoffReader:
    """The PD worker's side: `MediaResolver.resolve` of a request whose media are embeddings
    in the holder's cache, with the time inside `TransferAgent.read` recorded apart from the
    whole."""

    def __init__(self, capacity: int):
        from epdserve.transfer.agent import TransferAgent
        from epdserve.config import TransferTimeouts
        from epdserve.worker.media_sources import MediaResolver
        self.agent = TransferAgent("reader", capacity, torch.device("cpu"))
        _check_ucx(self.agent._nixl)
        self.resolver = MediaResolver(None, self.agent, None, None, TransferTimeouts())   # embedding items never reach the model
        self.read_s = 0.0
        read = self.agent.read

        async def timed_read(*args: Any) -> list[int]:
            start = time.perf_counter()
            try:
                return await read(*args)
            finally:
                self.read_s = time.perf_counter() - start

        self.agent.read = timed_read

    async def read(self, case: int, notif: bytes, handoff: bytes, remotes: list) -> Sample:
        from epdserve.protocol import epdserve_pb2 as pb
        req = pb.GenerateRequest(handoff=pb.EmbeddingHandoff.FromString(handoff))
        for r in remotes:
            t = pb.RemoteTensor.FromString(r)
            req.media.append(pb.MediaItem(modality="image", hash=str(t.addr), length=t.shape[0], embedding=t))
        start = time.perf_counter()
        async with self.resolver.resolve(req) as inputs:   # as the PD worker starts a request
            elapsed = time.perf_counter() - start
            held = self.agent.allocator.allocated_bytes > 0
            return Sample(elapsed, self.read_s, held, _correct([mm.embeddings for mm in inputs]))


class RawReader:
    def __init__(self, capacity: int, prog: bool, peer_metadata: bytes):
        self.prog = prog
        self.nixl = _nixl_agent("reader", prog)
        self.region = torch.empty(capacity // 4)
        self.nixl.register_memory(self.region)
        self.peer = self.nixl.add_remote_agent(peer_metadata)

    async def read(self, case: int, notif: bytes, handoff: bytes, descs: list) -> Sample:
        local, remote, views, cursor = [], [], [], 0
        for addr, nbytes in descs:   # back to back in the local region, as TransferAgent.read does
            local.append((self.region.data_ptr() + cursor * 4, nbytes, 0))
            remote.append((addr, nbytes, 0))
            views.append(self.region[cursor:cursor + nbytes // 4])
            cursor += nbytes // 4
        start = time.perf_counter()
        handle = self.nixl.initialize_xfer("READ", self.nixl.get_xfer_descs(local, "DRAM"),
                                           self.nixl.get_xfer_descs(remote, "DRAM"), self.peer, notif)
        state = self.nixl.transfer(handle)
        while state not in ("DONE", "ERR"):
            if self.prog:
                time.sleep(POLL_S)
            state = self.nixl.check_xfer_state(handle)
        self.nixl.release_xfer_handle(handle)
        elapsed = time.perf_counter() - start
        if state == "ERR":
            raise RuntimeError("the READ failed")
        return Sample(elapsed, elapsed, True, _correct(views))


class KVReader:
    """The decode worker's side: its own pool registered by `KVTransfer`; `load` of a case's
    blocks into its `local` ones ("kv", timed whole and inside `read_ranges`), or one
    `read_ranges` of as many bytes from the peer's pool start to ours ("kv-1range")."""

    def __init__(self, spec: dict[str, Any], one_range: bool):
        from epdserve.transfer.agent import TransferAgent
        from epdserve.config import TransferTimeouts
        from epdserve.worker.kv_transfer import KVTransfer
        self.agent = TransferAgent("reader", 0, torch.device("cpu"))
        kv = _kv_pool(spec["kv"])
        self.kv = KVTransfer(self.agent, kv, TransferTimeouts())
        self.pool = _block_bytes(kv.pool)   # a view: keeps the registered pool alive
        self.marks = _block_marks(kv.pool)   # the holder's pool has the same shape
        self.cases = spec["cases"]
        self.one_range = one_range

    async def read(self, case: int, notif: bytes, handoff: bytes, _: Any) -> Sample:
        from epdserve.protocol import epdserve_pb2 as pb
        kv = pb.KVHandoff.FromString(handoff)
        local, remote = self.cases[case]["local"], self.cases[case]["remote"]
        inside = self.kv.read_s
        start = time.perf_counter()
        if self.one_range:
            nbytes = len(local) * self.pool[:, :, 0].numel()
            await self.agent.read_ranges(kv.holder, [(self.kv.layout.base, nbytes)], [(kv.layout.base, nbytes)],
                                         NOTIF_TIMEOUT_S)
        else:
            await self.kv.load(kv, local, 0, time.monotonic())
        elapsed = time.perf_counter() - start
        read_s = elapsed if self.one_range else self.kv.read_s - inside
        return Sample(elapsed, read_s, True, self._correct(local, remote))

    def _correct(self, local: list[int], remote: list[int]) -> bool:
        """Whether our blocks (first and last byte of each) carry the marks of theirs. Reads only
        those bytes: copying the blocks out (tens of MB, freed again) between READs made the
        next READ up to 40% slower."""
        if self.one_range:   # as many (K/V, layer, block) slots as the blocks have, from the start
            flat, n = self.pool.flatten(0, 2), len(local) * self.pool.shape[0] * self.pool.shape[1]
            want = self.marks.flatten()[:n]
            return bool((flat[:n, 0] == want).all() and (flat[:n, -1] == want).all())
        want = self.marks[:, :, remote]
        return bool((self.pool[:, :, local, 0] == want).all() and (self.pool[:, :, local, -1] == want).all())


async def reader(mode: str, spec: dict[str, Any], peer: Connection) -> dict[str, Any]:
    kind, info = peer.recv()
    if kind == "unavailable":
        return {"unavailable": f"holder: {info}"}
    try:
        if mode in KV_MODES:
            rd: Any = KVReader(spec, mode == "kv-1range")
        elif mode == "handoff":
            rd = HandoffReader(max(max(_nbytes(s) for s in spec["cases"]), spec["staging_bytes"]))
        else:
            rd = RawReader(max(_nbytes(s) for s in spec["cases"]), mode == "raw-prog", info)
    except Exception as exc:
        return {"unavailable": f"reader: {type(exc).__name__}: {exc}"}
    cases = []
    for i in range(len(spec["cases"])):
        samples = []
        for rep in range(spec["warmup"] + spec["reps"]):
            notif = f"{i}/{rep}".encode()
            peer.send(("go", i, notif))
            _, handoff, remotes = peer.recv()
            sample = await rd.read(i, notif, handoff, remotes)
            if not sample.correct:
                raise RuntimeError("read back the wrong bytes")
            if rep >= spec["warmup"]:   # the first READs also connect the peers
                samples.append(sample)
        cases.append({"total_s": [x.total_s for x in samples], "read_s": [x.read_s for x in samples],
                      "held": sum(x.held for x in samples)})
    return {"cases": cases}


# --------------------------------------------------------------------------- parent side

def measure_pair(mode: str, ucx_tls: str | None, spec: dict[str, Any], timeout: float = 180) -> dict[str, Any]:
    """Run holder and reader with UCX_TLS=`ucx_tls` (None: unset); the reader's result, or
    {"unavailable": why} / {"error": why}."""
    env = {k: v for k, v in os.environ.items() if k != "UCX_TLS"} | ({"UCX_TLS": ucx_tls} if ucx_tls else {})
    holder_end, reader_end = Pipe()
    result_in, result_out = Pipe(duplex=False)
    with tempfile.TemporaryFile() as log:
        def start(role: str, *conns: Connection) -> subprocess.Popen:
            fds = [str(c.fileno()) for c in conns]
            return subprocess.Popen([sys.executable, __file__, role, mode, json.dumps(spec), *fds],
                                    pass_fds=[c.fileno() for c in conns], env=env, stdout=log, stderr=log)
        procs = [start("holder", holder_end), start("reader", reader_end, result_out)]
        for conn in (holder_end, reader_end, result_out):
            conn.close()   # the children hold them now: a child's exit is an EOF here
        try:
            if not result_in.poll(timeout):
                return {"error": f"no result in {timeout:.0f} s"}
            return result_in.recv()
        except EOFError:
            log.seek(0)
            return {"error": "reader exited: " + log.read().decode(errors="replace")[-1500:]}
        finally:
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def rate(nbytes: int, times: list[float], **extra: Any) -> dict[str, Any]:
    """Median and best GB/s (10^9 bytes) of one measurement's repetitions (`times` in s)."""
    median_ms = float(np.median(times)) * 1000
    return {"median_gbps": nbytes / median_ms / 1e6, "best_gbps": nbytes / min(times) / 1e9,
            "median_ms": median_ms, "times_ms": [t * 1000 for t in times], **extra}


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's results of several `measure_pair` rounds as one: every repetition of every
    round, or the first failure."""
    if failed := next((r for r in rounds if "cases" not in r), None):
        return failed
    return {"cases": [{"total_s": [t for c in per_round for t in c["total_s"]],
                       "read_s": [t for c in per_round for t in c["read_s"]],
                       "held": sum(c["held"] for c in per_round)}
                      for per_round in zip(*(r["cases"] for r in rounds))]}


def mode_rates(result: dict[str, Any], cases: list[tuple[str, int]]) -> dict[str, Any]:
    """A (merged) reader result as {"status": "ok", "cases": {name: `rate`}} for `cases`
    ((name, bytes) in the spec's order), or its status and why."""
    if "cases" not in result:
        return {"status": "unavailable" if "unavailable" in result else "error",
                "why": result.get("unavailable") or result.get("error")}
    rates = {}
    for (name, nbytes), got in zip(cases, result["cases"]):
        rates[name] = rate(nbytes, got["total_s"], read_median_ms=float(np.median(got["read_s"])) * 1000,
                           held=got["held"])
    return {"status": "ok", "cases": rates}


def memcpy_times(shapes: list[list[int]], reps: int, warmup: int) -> list[float]:
    """`dst.copy_(src)` of the same tensors into preallocated ones, in this process."""
    src = [torch.full(tuple(s), 1.0) for s in shapes]
    dst = [torch.empty_like(t) for t in src]
    times = []
    for rep in range(warmup + reps):
        start = time.perf_counter()
        for d, s in zip(dst, src):
            d.copy_(s)
        if rep >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _child_main(role: str, mode: str, spec_json: str, peer_fd: str, result_fd: str | None = None) -> None:
    spec, peer = json.loads(spec_json), Connection(int(peer_fd))
    if role == "holder":
        try:
            asyncio.run(holder(mode, spec, peer))
        except EOFError:
            pass   # the reader is gone: it reports why
        return
    result = Connection(int(result_fd))
    try:
        result.send(asyncio.run(reader(mode, spec, peer)))
    except Exception as exc:
        result.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        try:
            peer.send(("stop",))
        except OSError:
            pass   # the holder is gone already


if __name__ == "__main__":
    _child_main(*sys.argv[1:])
