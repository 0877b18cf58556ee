"""The topology matrix: every family served by every launch script, driven by the official
`openai` client and checked token for token against `transformers` greedy `generate()`.

    family/script   | agg | epd-nixl | ec | disagg-epd | disagg-llama | agg-llama |  x CASES (below):
    ----------------+-----+----------+----+------------+--------------+-----------+  text, one image,
    llava           |  x  |    x     | x  |     x      |      x       |     x     |  two images, each
    llama4          |  x  |    x     | x  |     x      |      x       |     x     |  unary and streamed;
    qwen2_5_vl      |  x  |    x     | x  |     x      |      x       |     x     |  then a mixed load
    qwen3_vl        |  x  |    x     | x  |     x      |      x       |     x     |  (MIXED)

    agg          launch/agg_multimodal.sh             E, P and D in one worker
    epd-nixl     launch/agg_multimodal_epd.sh         2 encode workers, embeddings over NIXL
    ec           launch/agg_multimodal_ec_connector.sh  embeddings through the cache on disk
    disagg-epd   launch/disagg_multimodal_epd.sh      E, P, 2 D workers; the prompt's KV over NIXL
    disagg-llama launch/disagg_multimodal_llama.sh    head node (EP) + worker node (D), one machine
    agg-llama    launch/agg_multimodal_llama.sh       one encode+prefill worker that also decodes

FAMILIES, SCRIPTS and UNSUPPORTED are in tests/support/topologies.py: adding a family or a script
is one entry there; adding a case is one entry in CASES. One cluster per (family, script),
started once (tests/cluster/conftest.py) and shared with that topology's other tests
(`@pytest.mark.topology(...)` in test_epd.py, test_epd_encode.py, test_disagg.py,
test_llama4_cluster.py).
"""

from __future__ import annotations

import pytest

from support.chat import assert_nothing_held, chat_concurrently, chat_messages, run_chat
from support.cluster import Cluster
from support.oracle import hf_greedy, make_image
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



def _mixed_jobs() -> list[tuple[list[dict], int, bool]]:
    """MIXED: 24 chats of no, one or two images of four sizes (five images, so some recur, and
    some requests repeat whole), max_tokens 4 to 40, every other one streamed."""
    sizes = [(64, 48), (40, 72), (32, 32), (56, 40)]
    jobs = []
    for i in range(24):
        images = [make_image(300 + (i + k) % 5, sizes[(i + k) % 4]) for k in range(i % 3)]
        jobs.append((chat_messages(images, f"Request {i % 8}."), 4 + (i * 7) % 37, i % 2 == 1))
    return jobs


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_mixed_load_matches_transformers_and_frees_everything(cluster: Cluster, model_dir, topology: str) -> None:
    jobs = _mixed_jobs()
    got = chat_concurrently(cluster, jobs, concurrency=12)
    assert got == [hf_greedy(model_dir, messages, max_tokens=n) for messages, n, _ in jobs]
    assert_nothing_held(cluster.worker_stats())


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_transparent_images_match_transformers(cluster: Cluster, model_dir, topology: str) -> None:
    """RGBA, LA and palette images with transparency: composited on white, as the HF processor
    does (dropping the alpha band would change the pixels)."""
    messages = chat_messages([make_image(40 + i, (32, 32), mode) for i, mode in enumerate(("RGBA", "LA", "P"))])
    text, ids, _ = run_chat(cluster.client(), cluster.model, messages, stream=False)
    split(topology)[0].oracle(model_dir, messages, text, ids)
