"""The topology matrix: every family served by every launch script, driven by the official
`openai` client and checked token for token against `transformers` greedy `generate()`.

    FAMILIES (support/topologies.py)   x   SCRIPTS (support/topologies.py)          x   CASES (below)
    llava    tiny_llava, 64x48 PNGs        agg           agg_multimodal.sh              text    unary/stream
    llama4   tiny_llama4, 1 to 4 tiles     epd-nixl      agg_multimodal_epd.sh          1 image unary/stream
                                           ec            agg_multimodal_ec_connector.sh 2 images unary/stream
                                           disagg-epd    disagg_multimodal_epd.sh
                                           disagg-llama  disagg_multimodal_llama.sh (two nodes)

One cluster per (family, script), started once (tests/cluster/conftest.py) and shared with the
other tests of that topology (`@pytest.mark.topology(...)` in test_epd.py, test_epd_encode.py,
test_disagg.py, test_llama4_cluster.py). Adding a family or a script is one entry in
support/topologies.py; adding a case is one entry in CASES.
"""

from __future__ import annotations

import pytest

from support.chat import chat_messages, run_chat
from support.cluster import Cluster
from support.topologies import TOPOLOGIES, split

CASES = {   # id -> (number of images, streamed)
    "text-unary": (0, False),
    "text-stream": (0, True),
    "one-image-unary": (1, False),
    "one-image-stream": (1, True),
    "two-images-unary": (2, False),
    "two-images-stream": (2, True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_chat_matches_transformers(cluster: Cluster, model_dir, topology: str, case: str) -> None:
    family, script = split(topology)
    num_images, stream = CASES[case]
    messages = chat_messages(family.images(num_images))
    text, ids, finish = run_chat(cluster.client(), cluster.model, messages, stream)
    family.oracle(model_dir, messages, text, ids)
    assert finish in ("stop", "length")
    if script.disaggregated:   # the prompt's KV reached a decode worker over NIXL
        stats = cluster.worker_stats()
        assert sum(s["kv_blocks_read"] for k, s in stats.items() if k.startswith("decode/")) > 0

