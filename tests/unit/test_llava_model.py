"""The worker-side LLaVA model: the vision tower is cut after `vision_feature_layer`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from epdserve.models.llava import _drop_unused_vision_layers
from epdserve.models.registry import load_family
from epdserve.tools.tiny_model import build_tiny_model

VISION_LAYERS = 4


@pytest.fixture(scope="module")
def four_layer_tower(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("llava", tmp_path_factory.mktemp("llava") / "model", vision_layers=VISION_LAYERS)


def _with_feature_layer(model_dir: Path, layer: int, out: Path) -> Path:
    shutil.copytree(model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["vision_feature_layer"] = layer
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("layer,kept", [(-2, 3), (-1, 4), (1, 1), (4, 4)])
@torch.inference_mode()
def test_features_equal_the_whole_tower(four_layer_tower: Path, tmp_path: Path, layer: int, kept: int) -> None:
    model_dir = _with_feature_layer(four_layer_tower, layer, tmp_path / "model")
    runner = load_family(model_dir).load_runner(None, torch.device("cpu"))
    assert len(runner.hf.model.vision_tower.encoder.layers) == kept
    whole = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    size = whole.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    expected = whole.model.get_image_features(pixel_values=pixels, vision_feature_layer=layer,
                                              vision_feature_select_strategy="default").pooler_output
    for got, want in zip(runner.encode("image", {"pixel_values": pixels}), expected, strict=True):
        assert torch.equal(got, want)


def test_feature_layer_lists_keep_the_deepest(four_layer_tower: Path) -> None:
    hf = AutoModelForImageTextToText.from_pretrained(four_layer_tower)
    hf.config.vision_feature_layer = [-3, 1]
    _drop_unused_vision_layers(hf)
    assert len(hf.model.vision_tower.encoder.layers) == 2
    assert hf.config.vision_feature_layer == [2, 1]
