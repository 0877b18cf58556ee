"""Clusters serving the tiny Llama 4, driven by the official `openai` client and checked token
for token against `transformers` greedy `generate()`: EPD (`launch/agg_multimodal.sh`) in
full, and the topologies whose embeddings (rows for the `<|patch|>` positions only) come from
an encode worker, over NIXL or through the embedding cache."""

from __future__ import annotations

import httpx
import openai
import pytest

from support.chat import MAX_TOKENS, assert_matches_oracle, chat_messages, run_chat
from support.cluster import launch
from support.oracle import make_image

# 1 tile; 2x2 tiles + global; a panorama in 1x4 tiles + global (80 positions among 89).
IMAGES = {"one-tile": make_image(1, (20, 20)), "2x2": make_image(2, (64, 48)), "wide": make_image(3, (200, 33))}


@pytest.fixture(scope="module")
def cluster(infra, tiny_llama4, tmp_path_factory):
    c = launch("agg_multimodal.sh", infra, tmp_path_factory.mktemp("logs"), model_dir=tiny_llama4)
    yield c
    c.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("images", [[], ["2x2"], ["wide", "one-tile"]], ids=["text", "one-image", "two-images"])
def test_chat_matches_transformers(cluster, tiny_llama4, images: list[str], stream: bool) -> None:
    messages = chat_messages([IMAGES[name] for name in images])
    text, ids, finish = run_chat(cluster.client(), cluster.model, messages, stream)
    assert_matches_oracle(tiny_llama4, messages, text, ids)
    assert finish in ("stop", "length")


def test_context_is_capped_at_the_attention_chunk(cluster) -> None:
    """The family serves at most `attention_chunk_size` (1024) positions: no chunked attention."""
    (card,) = httpx.get(cluster.base_url + "/v1/models", timeout=5).json()["data"]
    assert card["max_model_len"] == 1024
    with pytest.raises(openai.BadRequestError):
        cluster.client().completions.create(model=cluster.model, prompt="word " * 1100, max_tokens=MAX_TOKENS)


@pytest.mark.parametrize("script", ["agg_multimodal_epd.sh", "agg_multimodal_ec_connector.sh"])
def test_encode_worker_embeddings(infra, tiny_llama4, tmp_path_factory, script: str) -> None:
    c = launch(script, infra, tmp_path_factory.mktemp("logs"), model_dir=tiny_llama4)
    try:
        for images in (["2x2"], ["wide", "one-tile"]):
            messages = chat_messages([IMAGES[name] for name in images])
            text, ids, _ = run_chat(c.client(), c.model, messages, stream=False)
            assert_matches_oracle(tiny_llama4, messages, text, ids)
    finally:
        c.stop()
