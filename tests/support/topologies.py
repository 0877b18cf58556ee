"""The topology matrix: which model families are served by which launch scripts
(`tests/cluster/test_topologies.py` runs every case on every pair).

Every (family, script) pair is one cluster, started once by `tests/cluster/conftest.py` and shared
by the matrix and every other test marked `@pytest.mark.topology("<family>/<script>")`. Adding a
family or a script is one entry below (a family names the session fixture of its tiny model, in
`tests/conftest.py`, and its oracle adapter: the images of a case and the check against
`transformers`); a pair that cannot work goes into `UNSUPPORTED`, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from support.chat import assert_matches_oracle
from support.oracle import make_image

CACHE_BYTES = 1 << 20   # tiny LLaVA embeddings are 4 KiB: room for ~250, so eviction is exercised


@dataclass(frozen=True)
class FamilySpec:
    model: str                                # the session fixture that builds its tiny model
    images: Callable[[int], list[bytes]]      # the PNGs of a case with n images
    oracle: Callable[..., None] = assert_matches_oracle   # (model_dir, messages, text, ids): the HF check


@dataclass(frozen=True)
class ScriptSpec:
    script: str                               # under launch/
    args: tuple[str, ...] = ()                # extra flags for the script
    workers: dict[str, int] = field(default_factory=dict)   # wait until these are registered
    two_nodes: bool = False                   # a --head-node script, both nodes on this machine
    disaggregated: bool = False               # the prompt's KV goes from prefill to decode workers


def _llama4_images(n: int) -> list[bytes]:
    # 2x2 tiles + global; then a panorama in 1x4 tiles + global (80 positions among 89) and 1 tile.
    return [[], [make_image(2, (64, 48))], [make_image(3, (200, 33)), make_image(1, (20, 20))]][n]


def _qwen_images(n: int) -> list[bytes]:
    # Dynamic resolution: 48 rows (a 12x16 patch grid); then 45 (18x10) and 16 (8x8).
    return [[], [make_image(2, (64, 48))], [make_image(3, (40, 72)), make_image(1, (32, 32))]][n]


FAMILIES: dict[str, FamilySpec] = {
    "llava": FamilySpec("tiny_llava", lambda n: [make_image(10 + i) for i in range(n)]),
    "llama4": FamilySpec("tiny_llama4", _llama4_images),
    "qwen2_5_vl": FamilySpec("tiny_qwen2_5_vl", _qwen_images),
    "qwen3_vl": FamilySpec("tiny_qwen3_vl", _qwen_images),
}

SCRIPTS: dict[str, ScriptSpec] = {
    "agg": ScriptSpec("agg_multimodal.sh"),
    "epd-nixl": ScriptSpec("agg_multimodal_epd.sh", ("--encode-workers", "2", "--encoder-cache-bytes",
                                                     str(CACHE_BYTES), "--embedding-buffer-bytes", str(128 << 10))),
    "ec": ScriptSpec("agg_multimodal_ec_connector.sh"),
    # Small blocks: a prompt spans many, so READs merge runs and the prefix cache hits partly.
    "disagg-epd": ScriptSpec("disagg_multimodal_epd.sh", ("--decode-workers", "2", "--block-size", "4",
                                                          "--num-kv-blocks", "512"),
                             workers={"prefill": 1, "decode": 2}, disaggregated=True),
    "disagg-llama": ScriptSpec("disagg_multimodal_llama.sh", workers={"prefill": 1, "decode": 1},
                               two_nodes=True, disaggregated=True),
    "agg-llama": ScriptSpec("agg_multimodal_llama.sh"),
}

UNSUPPORTED: dict[tuple[str, str], str] = {}   # (family, script) -> why not

TOPOLOGIES: list[str] = [f"{f}/{s}" for f in FAMILIES for s in SCRIPTS if (f, s) not in UNSUPPORTED]


def split(topology: str) -> tuple[FamilySpec, ScriptSpec]:
    family, script = topology.split("/")
    return FAMILIES[family], SCRIPTS[script]
