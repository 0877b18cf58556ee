"""LLaVA-1.5: CLIP vision tower, MLP projector, Llama text decoder."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, DynamicCache

from epdserve.media.types import MediaInfo
from epdserve.models.base import ModelFamily, MultimodalModel


class LlavaFamily(ModelFamily):
    model_types = ("llava",)
    modalities = ("image",)

    @property
    def context_length(self) -> int:
        return self.hf_config.text_config.max_position_embeddings

    def placeholder_token_id(self, modality: str) -> int:
        return self.hf_config.image_token_id

    def num_placeholders(self, info: MediaInfo) -> int:
        # Every image is resized to the tower's square input; the count does not depend on
        # the image's own size. "default" drops the CLS position, "full" keeps it.
        vision = self.hf_config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        return patches + (1 if self.hf_config.vision_feature_select_strategy == "full" else 0)

    def load_runner(self, dtype: torch.dtype | None, device: torch.device) -> "LlavaModel":
        return LlavaModel(self, dtype, device)


class LlavaModel(MultimodalModel):
    """Step-1 runner over the `transformers` modules (paged decoder arrives with the engine)."""

    def __init__(self, family: LlavaFamily, dtype: torch.dtype | None, device: torch.device):
        # `transformers` maps both published key layouts (llava-hf and its own) on load.
        self.hf = AutoModelForImageTextToText.from_pretrained(
            family.model_dir, dtype=dtype or "auto").to(device).eval()
        self.image_processor = AutoImageProcessor.from_pretrained(family.model_dir)
        self.config = family.hf_config
        self.device = self.hf.device
        self.dtype = self.hf.dtype

    def preprocess(self, modality: str, items: list[Image.Image]) -> dict[str, torch.Tensor]:
        out = self.image_processor(images=items, return_tensors="pt")
        return {"pixel_values": out["pixel_values"]}

    def encode(self, modality: str, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        pixel_values = features["pixel_values"].to(self.device, self.dtype)
        out = self.hf.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
        )
        return list(out.pooler_output)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.hf.get_input_embeddings()(token_ids.to(self.device))

    def new_cache(self) -> Any:
        return DynamicCache(config=self.config.text_config)

    def forward(self, inputs_embeds: torch.Tensor, cache: Any) -> torch.Tensor:
        start = cache.get_seq_length()
        positions = torch.arange(start, start + inputs_embeds.shape[0], device=self.device)
        hidden = self.hf.model.language_model(
            inputs_embeds=inputs_embeds[None], past_key_values=cache, use_cache=True,
            position_ids=positions[None], cache_position=positions,
        ).last_hidden_state
        return self.hf.lm_head(hidden[:, -1]).float()[0]
