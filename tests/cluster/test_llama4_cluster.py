"""The tiny Llama 4 served by `launch/agg_multimodal.sh` (the matrix's "llama4/agg" cluster; its
chats against `transformers`, in every topology, are in test_topologies.py): the family's
context limit."""

from __future__ import annotations

import httpx
import openai
import pytest

from support.chat import MAX_TOKENS

pytestmark = pytest.mark.topology("llama4/agg")


def test_context_is_capped_at_the_attention_chunk(cluster) -> None:
    """The family serves at most `attention_chunk_size` (1024) positions: no chunked attention."""
    (card,) = httpx.get(cluster.base_url + "/v1/models", timeout=5).json()["data"]
    assert card["max_model_len"] == 1024
    with pytest.raises(openai.BadRequestError):
        cluster.client().completions.create(model=cluster.model, prompt="word " * 1100, max_tokens=MAX_TOKENS)
