"""A NIXL agent with one registered memory region, driven from an asyncio event loop.

A peer's READ of our memory completes only once our UCX worker has progressed (it answers
over the TCP lane), so something must progress it promptly. NIXL's progress thread does, but
its Python wrapper gives the thread's poll() a timeout of 0, and the thread then spins (0.6
of a core idle, docs/architecture.md, Transfer). We give it PROGRESS_POLL_TIMEOUT_US instead: the thread
sleeps until the worker has traffic. Measured: a 0.5 MB READ took 1-2 ms when the holder
polled from Python every few ms, 0.6-0.8 ms with the thread; idle, the thread costs ~0.3% of
a core.

A reader sends its notification after the READ rather than with it, so that the READ's
completion does not wait for the notification's delivery. The holder collects notifications
(`get_new_notifs`, which the thread has already received) only while it expects one.

Every NIXL call of ours happens on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import TypeAlias

import torch
from nixl import _api as nixl_api
from nixl._api import nixl_agent, nixl_agent_config

from epdserve.protocol import epdserve_pb2 as pb
from epdserve.protocol.errors import EpdError
from epdserve.transfer.region import RegionAllocator, Span

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PollPolicy:
    """How a waiter polls: without sleeping (yielding to the loop) for `spin_s`, then sleeping
    between polls from 50 us, doubling up to `max_sleep_s`."""

    spin_s: float
    max_sleep_s: float


# A READ is on the request's critical path and one image's READ takes 1-2 ms: spin through
# it (a sleeping poll overshot it by 1-3 ms), sleep only when it runs long.
READ_POLL = PollPolicy(spin_s=0.003, max_sleep_s=0.001)
# The holder's wait for the READ notification frees memory, nothing waits on it: poll lightly.
NOTIF_POLL = PollPolicy(spin_s=0.0002, max_sleep_s=0.002)

# The progress thread's poll() timeout: it wakes on its worker's traffic, else this often (us).
PROGRESS_POLL_TIMEOUT_US = 100_000
# The wrapper's own config class (kept: the module attribute is swapped below); an alias, so it can be a base.
_WrapperConfig: TypeAlias = nixl_api.nixlBind.nixlAgentConfig


class _EventDrivenConfig(_WrapperConfig):
    """The agent config `nixl_agent` builds, except that its `pthrDelay = 0` (a spinning
    progress thread) becomes PROGRESS_POLL_TIMEOUT_US."""

    pthrDelay = property(
        lambda self: _WrapperConfig.pthrDelay.__get__(self),
        lambda self, _: _WrapperConfig.pthrDelay.__set__(self, PROGRESS_POLL_TIMEOUT_US),
    )


_config_swap = threading.Lock()


def _ucx_agent(name: str) -> nixl_agent:
    """A UCX-only agent whose progress thread sleeps in poll() while its worker is idle."""
    with _config_swap:  # `nixl_agent` builds its config from the module attribute
        nixl_api.nixlBind.nixlAgentConfig = _EventDrivenConfig
        try:
            return nixl_agent(name, nixl_agent_config(enable_prog_thread=True, backends=["UCX"]))
        finally:
            nixl_api.nixlBind.nixlAgentConfig = _WrapperConfig


class _Backoff:
    def __init__(self, policy: PollPolicy) -> None:
        self._policy = policy
        self._start = time.monotonic()
        self._sleep = 0.00005

    async def wait(self) -> None:
        if time.monotonic() - self._start < self._policy.spin_s:
            await asyncio.sleep(0)
            return
        await asyncio.sleep(self._sleep)
        self._sleep = min(self._sleep * 2, self._policy.max_sleep_s)


class TransferAgent:
    """One NIXL agent (UCX backend) owning `capacity` registered bytes on `device`.

    Memory is registered once, here; callers carve it with `alloc`/`free` and address it with
    `view`. `register` adds memory allocated elsewhere (a KV pool), once, at start-up. `read`
    pulls tensors from a peer's region into a local span with one READ, `read_ranges` any
    (address, bytes) ranges of registered memory; `expect` waits for the notification a
    peer's READ of our memory sends when it completes.
    """

    def __init__(self, name: str, capacity: int, device: torch.device):
        self.name = name
        self._nixl = _ucx_agent(name)
        if "UCX" not in self._nixl.backends:  # nixl only warns when the plugin fails to load
            raise OSError("NIXL could not create its UCX backend (is the UCX plugin installed?)")
        self.region = torch.empty(capacity, dtype=torch.uint8, device=device)
        if not self.region.is_cuda:
            # Fault every page in now: a first write into a fresh page costs ~0.5 ms/MB, which
            # made a new embedding's copy into the cache (or its READ) several times slower.
            self.region.zero_()
        self.mem_type = "VRAM" if self.region.is_cuda else "DRAM"
        self.device_id = self.region.device.index or 0
        self._registrations = [self._nixl.register_memory(self.region)] if capacity else []
        self.allocator = RegionAllocator(capacity)
        self.metadata = self._nixl.get_agent_metadata()
        self._remotes: set[str] = set()
        self._live_transfers = 0
        self._expected: dict[bytes, asyncio.Future[None]] = {}
        self._notif_poller: asyncio.Task | None = None

    # ------------------------------------------------------------------ memory

    def alloc(self, nbytes: int) -> Span | None:
        return self.allocator.alloc(nbytes)

    def free(self, span: Span) -> None:
        self.allocator.free(span)

    def view(self, span: Span, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """`shape` of `dtype` at the start of `span`, aliasing the registered memory."""
        nbytes = _nbytes(dtype, shape)
        return self.region[span.offset : span.offset + nbytes].view(dtype).view(shape)

    def remote_tensor(self, span: Span, dtype: torch.dtype, shape: tuple[int, ...]) -> pb.RemoteTensor:
        """How a peer addresses `view(span, dtype, shape)`."""
        return pb.RemoteTensor(
            addr=self.region.data_ptr() + span.offset,
            nbytes=_nbytes(dtype, shape),
            dtype=str(dtype).removeprefix("torch."),
            shape=shape,
        )

    def handoff(self, notif: bytes) -> pb.EmbeddingHandoff:
        return pb.EmbeddingHandoff(
            agent=self.name, agent_metadata=self.metadata, notif=notif, mem_type=self.mem_type, device_id=self.device_id
        )

    def register(self, tensor: torch.Tensor) -> None:
        """Register `tensor` (contiguous, on this agent's device) for transfers until `close`."""
        if not tensor.is_contiguous() or tensor.device != self.region.device:
            raise ValueError("a registered tensor must be contiguous and on the agent's device")
        self._registrations.append(self._nixl.register_memory(tensor))
        self.metadata = self._nixl.get_agent_metadata()  # peers need the new memory's keys

    # ------------------------------------------------------------------ transfers

    async def read(
        self, handoff: pb.EmbeddingHandoff, tensors: list[pb.RemoteTensor], into: Span, timeout: float
    ) -> list[int]:
        """READ `tensors` of the peer named in `handoff` back to back into `into`, as one transfer,
        then send the peer `handoff.notif`; returns each tensor's offset in `into`.

        Raises EpdError(503) when the peer is gone, the transfer fails or exceeds `timeout`
        seconds. Cancelling releases the transfer (NIXL aborts it).
        """
        offsets, local, remote = [], [], []
        cursor = into.offset
        for t in tensors:
            offsets.append(cursor - into.offset)
            local.append((self.region.data_ptr() + cursor, t.nbytes))
            remote.append((t.addr, t.nbytes))
            cursor += t.nbytes
        if cursor > into.offset + into.nbytes:
            raise ValueError(f"{cursor - into.offset} bytes do not fit a span of {into.nbytes}")
        await self.read_ranges(handoff, local, remote, timeout)
        return offsets

    async def read_ranges(
        self, handoff: pb.EmbeddingHandoff, local: list[tuple[int, int]], remote: list[tuple[int, int]], timeout: float
    ) -> None:
        """READ each `remote[i]` (address, bytes) of the peer named in `handoff` into `local[i]`
        of our registered memory, as one transfer, then send the peer `handoff.notif`. Errors
        and cancelling as `read`."""
        if [n for _, n in local] != [n for _, n in remote]:
            raise ValueError("local and remote ranges differ in size")
        peer, handle = handoff.agent, None
        try:
            self._connect(handoff)
            handle = self._nixl.initialize_xfer(
                "READ",
                self._nixl.get_xfer_descs([(a, n, self.device_id) for a, n in local], self.mem_type),
                self._nixl.get_xfer_descs([(a, n, handoff.device_id) for a, n in remote], handoff.mem_type or "DRAM"),
                peer,
            )
            self._live_transfers += 1
            state = self._nixl.transfer(handle)
            deadline = time.monotonic() + timeout
            backoff = _Backoff(READ_POLL)
            while state not in ("DONE", "ERR"):
                if time.monotonic() > deadline:
                    raise EpdError(503, f"reading from {peer} timed out after {timeout}s")
                await backoff.wait()
                state = self._nixl.check_xfer_state(handle)
            if state == "ERR":
                raise EpdError(503, f"reading from {peer} failed")
        except EpdError:
            self._forget_remote(peer)
            raise
        except Exception as exc:  # nixlRemoteDisconnectError and friends: the peer died
            self._forget_remote(peer)
            raise EpdError(503, f"reading from {peer} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if handle is not None:
                self._nixl.release_xfer_handle(handle)
                self._live_transfers -= 1
        self.notify(handoff)

    def notify(self, handoff: pb.EmbeddingHandoff) -> None:
        """Send the peer named in `handoff` its notification (what a READ sends when it
        completes), e.g. when the data turned out to be here already. Best effort: the peer
        frees its copy on its own timeout if this fails."""
        peer = handoff.agent
        try:
            self._connect(handoff)
            self._nixl.send_notif(peer, handoff.notif)
        except Exception:
            log.warning("notifying %s failed", peer, exc_info=True)
            self._forget_remote(peer)

    def _connect(self, handoff: pb.EmbeddingHandoff) -> None:
        if handoff.agent not in self._remotes:
            name = self._nixl.add_remote_agent(handoff.agent_metadata)
            name = name.decode() if isinstance(name, bytes) else name
            if name != handoff.agent:
                raise EpdError(500, f"agent metadata names {name!r}, the handoff {handoff.agent!r}")
            self._remotes.add(name)

    def _forget_remote(self, peer: str) -> None:
        """Drop a peer after a failure: if it restarted, its next handoff brings new metadata."""
        if peer in self._remotes:
            self._remotes.discard(peer)
            try:
                self._nixl.remove_remote_agent(peer)
            except Exception:
                log.warning("removing NIXL peer %s failed", peer, exc_info=True)

    # ------------------------------------------------------------------ notifications

    def expect(self, notif: bytes) -> asyncio.Future[None]:
        """A future resolved when a peer's transfer carrying `notif` completes. Call `forget`
        when done waiting, resolved or not."""
        future = asyncio.get_running_loop().create_future()
        self._expected[notif] = future
        if self._notif_poller is None or self._notif_poller.done():
            self._notif_poller = asyncio.create_task(self._poll_notifs(), name=f"nixl-notifs {self.name}")
        return future

    def forget(self, notif: bytes) -> None:
        self._expected.pop(notif, None)

    async def _poll_notifs(self) -> None:
        """Collect, while any notification is expected, those the progress thread received."""
        backoff = _Backoff(NOTIF_POLL)
        while self._expected:
            got = False
            for messages in self._nixl.get_new_notifs().values():
                for msg in messages:
                    future = self._expected.pop(msg, None)
                    if future is not None and not future.done():
                        future.set_result(None)
                        got = True
            backoff = _Backoff(NOTIF_POLL) if got else backoff
            await backoff.wait()

    # ------------------------------------------------------------------ lifecycle

    def stats(self) -> dict[str, int]:
        return {
            "nixl_registrations": len(self._registrations),
            "nixl_live_transfers": self._live_transfers,
            "nixl_remote_agents": len(self._remotes),
            "nixl_expected_notifs": len(self._expected),
            "region_bytes": self.allocator.capacity,
            "region_allocated_bytes": self.allocator.allocated_bytes,
            "region_allocations": self.allocator.allocations,
        }

    def close(self) -> None:
        """Deregister the region and drop the agent: its progress thread stops and peers see
        its connections close. Idempotent; the agent is unusable after it."""
        if not hasattr(self, "_nixl"):
            return
        if self._notif_poller is not None:
            self._notif_poller.cancel()
        for peer in list(self._remotes):
            self._forget_remote(peer)
        for registration in self._registrations:
            self._nixl.deregister_memory(registration)
        self._registrations = []
        del self._nixl  # the last reference: the C++ agent is destroyed here


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a RemoteTensor names; ValueError for anything else."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype
