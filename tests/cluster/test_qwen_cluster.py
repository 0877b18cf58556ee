"""Qwen-VL specifics through a cluster: `mm_processor_kwargs` change the image's resolution,
and the same image at other options misses the embedding cache and the prefix cache."""

from __future__ import annotations

import openai
import pytest

from support.chat import chat_messages
from support.oracle import hf_greedy, make_image

pytestmark = pytest.mark.topology("qwen2_5_vl/epd-nixl", "qwen2_5_vl/ec")


def _chat(cluster, messages: list[dict], mm_kwargs: dict | None = None) -> list[int]:
    extra = {"return_token_ids": True, **({"mm_processor_kwargs": mm_kwargs} if mm_kwargs else {})}
    r = cluster.client().chat.completions.create(model=cluster.model, messages=messages, max_tokens=8,
                                                 temperature=0, extra_body=extra)
    return r.choices[0].model_extra["token_ids"]


def _totals(cluster) -> dict[str, int]:
    stats = cluster.worker_stats()
    return {key: sum(s.get(key, 0) for s in stats.values()) for key in ("encoded_items", "prefix_cache_hits")}


def test_other_max_pixels_misses_both_caches(cluster, model_dir):
    """A 32x32 image has the same 4x4 grid at max_pixels 4096 (the default) and 2048, yet the
    second request hits neither cache; a 64x48 image shrinks at max_pixels 1024, as in HF."""
    messages = chat_messages([make_image(77, (32, 32))], "Describe the picture in detail.")
    expected = hf_greedy(model_dir, messages, max_tokens=8)
    assert _chat(cluster, messages) == expected
    before = _totals(cluster)
    assert _chat(cluster, messages) == expected   # same options: both caches hit
    repeat = _totals(cluster)
    assert repeat["encoded_items"] == before["encoded_items"]
    assert repeat["prefix_cache_hits"] > before["prefix_cache_hits"]
    assert _chat(cluster, messages, {"max_pixels": 2048}) == expected
    other = _totals(cluster)
    assert other["encoded_items"] == repeat["encoded_items"] + 1
    # Only the blocks before the image (the system turn) hit again.
    assert other["prefix_cache_hits"] - repeat["prefix_cache_hits"] < repeat["prefix_cache_hits"] - before[
        "prefix_cache_hits"]

    wide = chat_messages([make_image(78, (64, 48))])
    size = {"shortest_edge": 256, "longest_edge": 1024}
    assert _chat(cluster, wide, {"max_pixels": 1024}) == hf_greedy(model_dir, wide, max_tokens=8,
                                                                  processor_kwargs={"size": size})


def test_mm_processor_kwargs_out_of_bounds_are_400(cluster):
    messages = chat_messages([make_image(79, (32, 32))])
    for bad in ({"max_pixels": 10**8}, {"do_resize": False}):
        with pytest.raises(openai.BadRequestError, match="mm_processor_kwargs"):
            _chat(cluster, messages, bad)
    # Allowed, but 512x512 at 4 MP keeps its 4096 image tokens: over the 2048-position context.
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        _chat(cluster, chat_messages([make_image(80, (512, 512))]), {"max_pixels": 1 << 22})
    assert _chat(cluster, messages)   # still serving
