"""Llama 4 disaggregated, checked token-for-token against `transformers`: EP/D from
`launch/disagg_multimodal_llama.sh` (a head node with the encode+prefill worker, a worker node
with the decode worker, joined through etcd and NATS) and E/P/D from
`launch/disagg_multimodal_epd.sh` (its vision encoder split off into an encode worker)."""

from __future__ import annotations

import pytest

from support.chat import assert_matches_oracle, chat_messages, run_chat
from support.cluster import ROOT, launch, start
from support.oracle import make_image

SCRIPT = ROOT / "launch" / "disagg_multimodal_llama.sh"
IMAGES = {0: [], 1: [(64, 48)], 2: [(32, 32), (128, 32)]}   # (W, H): 1 to 4 tiles, plus a global tile


def _two_nodes(model_dir):
    """The command running the worker node in the background and the head node in front; a
    SIGTERM to it stops both."""
    def command(port: int, namespace: str) -> list[str]:
        common = ["--namespace", namespace, "--served-model-name", "llama4", "--model", str(model_dir)]
        return ["bash", "-c", 'bash "$0" "${@:2}" & worker=$!; '
                'bash "$0" --head-node --http-port "$1" "${@:2}" & head=$!; '
                'trap "kill -TERM $worker $head" TERM; wait $head; kill -TERM $worker; wait',
                str(SCRIPT), str(port), *common]
    return command


@pytest.fixture(scope="module", params=["EP/D", "E/P/D"])
def cluster(request, infra, tiny_llama4, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    if request.param == "EP/D":
        c = start(_two_nodes(tiny_llama4), infra, logs / "disagg_llama.log", "llama4")
    else:
        c = launch("disagg_multimodal_epd.sh", infra, logs, "--block-size", "4", model_dir=tiny_llama4,
                   served_name="llama4")
    c.wait_for_workers(infra, prefill=1, decode=1)
    yield c
    c.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_chat_matches_transformers(cluster, infra, tiny_llama4, num_images, stream):
    messages = chat_messages([make_image(40 + i, size) for i, size in enumerate(IMAGES[num_images])])
    text, ids, finish = run_chat(cluster.client(), cluster.model, messages, stream)
    assert_matches_oracle(tiny_llama4, messages, text, ids)
    assert finish in ("stop", "length")
    stats = cluster.worker_stats(infra)
    assert sum(s["kv_blocks_read"] for k, s in stats.items() if k.startswith("decode/")) > 0
