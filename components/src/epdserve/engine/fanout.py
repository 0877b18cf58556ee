"""The n > 1 fan-out: which client request and choice each engine sequence serves."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace

from epdserve.engine.base import EngineRequest


class ChoiceFanout:
    """Owns the mapping from engine sequences back to client requests and choice indices.

    A request with n == 1 is one sequence under its own id, choice 0. A request with n > 1 is
    n sequences `"{id}#{i}"` of n = 1 (seed `seed + i`, mod 2**64). Choice 0 is admitted first;
    the others wait here until it sampled its first token (`take_siblings`): its prompt's
    blocks are committed by then, so they hit them in the prefix cache.

    A sequence is tracked from its admission (`track`) until it finished, failed or was
    refused (`done`), or its request was aborted (`drop`).
    """

    def __init__(self) -> None:
        self._origin: dict[str, tuple[str, int]] = {}  # sequence id -> (request id, choice index)
        self._members: dict[str, list[str]] = {}  # request id (n > 1) -> its sequence ids
        self._siblings: dict[str, list[tuple[int, EngineRequest]]] = {}  # choice 0's id -> (index, choice)

    def split(self, request: EngineRequest) -> EngineRequest:
        """Register `request`; return what to admit now: the request itself (n == 1) or its
        choice 0, whose siblings wait for `take_siblings`."""
        n = request.sampling.n
        if n == 1:
            return request
        choices = [self._choice(request, i) for i in range(n)]
        self._members[request.request_id] = [c.request_id for c in choices]
        self._siblings[choices[0].request_id] = list(enumerate(choices))[1:]
        return choices[0]

    @staticmethod
    def _choice(request: EngineRequest, index: int) -> EngineRequest:
        seed = request.sampling.seed
        sampling = replace(request.sampling, n=1, seed=None if seed is None else (seed + index) % 2**64)
        return EngineRequest(f"{request.request_id}#{index}", request.prompt_token_ids, sampling, request.mm_inputs)

    def track(self, sequence_id: str, request_id: str, index: int) -> None:
        """Sequence `sequence_id` (being admitted) serves choice `index` of `request_id`."""
        self._origin[sequence_id] = (request_id, index)

    def origin(self, sequence_id: str) -> tuple[str, int]:
        """(request id, choice index) of a tracked sequence."""
        return self._origin[sequence_id]

    def take_siblings(self, sequence_id: str) -> Collection[tuple[int, EngineRequest]]:
        """The (index, choice) siblings waiting for choice 0 `sequence_id`, once: admit them now."""
        return self._siblings.pop(sequence_id, ())

    def done(self, sequence_id: str) -> tuple[str, int]:
        """The sequence finished, failed or was refused: stop tracking it (siblings it still kept
        waiting never start) and return its (request id, choice index)."""
        origin = self._origin.pop(sequence_id)
        self._siblings.pop(sequence_id, None)
        members = self._members.get(origin[0])
        if members is not None and not any(m in self._origin for m in members):
            del self._members[origin[0]]
        return origin

    def drop(self, request_id: str) -> list[str]:
        """Forget a request (aborted) and return the ids of its sequences, started or not."""
        sequence_ids = self._members.pop(request_id, None) or [request_id]
        for sid in sequence_ids:
            self._siblings.pop(sid, None)
            self._origin.pop(sid, None)
        return sequence_ids

    @property
    def tracked(self) -> Collection[str]:
        """Ids of the sequences tracked now (admitted and not done)."""
        return self._origin.keys()

    def is_idle(self) -> bool:
        """True when nothing is tracked: no sequence, no n > 1 request, no waiting sibling."""
        return not (self._origin or self._members or self._siblings)

    def check_invariants(self) -> None:
        """Raise AssertionError if the mapping is inconsistent (tests; not on the hot path)."""
        for sid, siblings in self._siblings.items():
            assert sid in self._origin, f"siblings wait for {sid}, which is not tracked"
            request_id, index = self._origin[sid]
            assert index == 0 and request_id in self._members, f"{sid} keeps siblings but is no choice 0"
            assert all(s.request_id not in self._origin for _, s in siblings), f"a sibling of {sid} started"
        for request_id, members in self._members.items():
            assert any(m in self._origin for m in members), f"request {request_id}: no choice left, still kept"
        for sid, (request_id, _) in self._origin.items():
            group = self._members.get(request_id)
            assert (sid in group) if group is not None else sid == request_id, f"{sid}: origin {request_id}"
