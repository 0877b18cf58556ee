"""Paged-engine test helpers: step an engine until idle, and check it leaked nothing."""

from __future__ import annotations

from epdserve.engine.paged import PagedEngine
from support.engine_requests import step_outputs


def drive(engine: PagedEngine, abort_after: dict[str, int] | None = None, max_steps: int = 5000):
    """Step until idle, checking the engine's invariants after every step; abort requests once they produced the given number of tokens."""
    abort_after = abort_after or {}
    got: dict[str, list[int]] = {}
    finish: dict[str, str] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for out in step_outputs(engine):
            assert out.error is None, out.error
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finish_reason:
                finish[out.request_id] = out.finish_reason
        for rid, n in abort_after.items():
            if len(got.get(rid, [])) >= n and rid not in finish:
                engine.abort(rid)
                finish[rid] = "abort"
    assert not engine.has_unfinished()
    return got, finish


def assert_no_leak(engine: PagedEngine) -> None:
    stats = engine.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total and stats.running == stats.waiting == 0

