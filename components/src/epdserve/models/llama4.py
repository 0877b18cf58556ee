"""Llama 4 (`Llama4ForConditionalGeneration`): tiling vision model, projector, MoE text decoder.

An image is resized onto the best-fitting canvas of up to `max_patches` square tiles, plus a
global tile (the whole image in one tile) when there is more than one; each tile yields
`tokens_per_tile` embedding rows (patches folded by the pixel shuffle). Its prompt tokens, as
`Llama4Processor` writes them in place of the template's `<|image|>`:

    <|image_start|> {tile rows: tiles separated by <|tile_x_separator|>, each row ended by
    <|tile_y_separator|>; only when there are several tiles} <|image|> {global tile} <|image_end|>

with `tokens_per_tile` `<|patch|>` tokens (the config's `image_token_index`) per tile: the
embedding rows go to the `<|patch|>` positions only. Image features do not depend on the text,
so an encode worker loads the vision model and projector alone (`load_encoder`).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor
from transformers.initialization import no_init_weights
from transformers.models.llama4.image_processing_llama4 import find_supported_resolutions, get_best_fit
from transformers.models.llama4.modeling_llama4 import (
    Llama4ForConditionalGeneration,
    Llama4MultiModalProjector,
    Llama4VisionModel,
)

from epdserve.kernels.cpu import CpuKernels
from epdserve.media.types import MediaInfo
from epdserve.models.base import NO_MM_KWARGS, Expansion, MediaEncoder, MMKwargs, ModelFamily
from epdserve.models.llama4_text import PagedLlama4Text
from epdserve.models.multimodal import PagedMultimodalModel
from epdserve.models.weights import load_modules


class Llama4Family(ModelFamily):
    model_types = ("llama4",)
    modalities = ("image",)

    @property
    def context_length(self) -> int:
        """`max_position_embeddings`, capped at `attention_chunk_size` when layers attend in
        chunks: our paged attention has no chunked (local) attention, and below the chunk
        size chunked attention equals full causal attention."""
        text = self.hf_config.get_text_config()
        limit = text.max_position_embeddings
        if text.attention_chunk_size is not None and "chunked_attention" in text.layer_types:
            limit = min(limit, text.attention_chunk_size)
        return limit

    def placeholder_token_id(self, modality: str) -> int:
        return self._processor.image_token_id  # <|image|>, which the chat template writes

    def num_placeholders(self, info: MediaInfo) -> int:
        rows, cols = self._tile_grid(info)
        tiles = rows * cols + (1 if rows * cols > 1 else 0)
        return tiles * self._tokens_per_tile

    def expand_placeholder(self, modality: str, info: MediaInfo, mm_kwargs: MMKwargs = NO_MM_KWARGS) -> Expansion:
        """`Llama4Processor._prompt_split_image` from the image's size (see the module)."""
        ids = self._token_ids
        tile = [ids["patch"]] * self._tokens_per_tile
        rows, cols = self._tile_grid(info)
        tokens = [ids["start"]]
        if rows * cols > 1:
            for _ in range(rows):
                for x in range(cols):
                    tokens += tile + ([ids["tile_x"]] if x < cols - 1 else [])
                tokens.append(ids["tile_y"])
        tokens += [ids["image"], *tile, ids["end"]]
        return Expansion(tokens, [t == ids["patch"] for t in tokens])

    def load_runner(
        self, dtype: torch.dtype | None, device: torch.device, kernels: CpuKernels | None = None
    ) -> Llama4Model:
        return Llama4Model(self, dtype, device, kernels)

    def load_encoder(
        self, dtype: torch.dtype | None, device: torch.device, kernels: CpuKernels | None = None
    ) -> Llama4Vision:
        return Llama4Vision(_vision_only(self, dtype, device), self, kernels)

    @cached_property
    def _processor(self) -> Any:
        """The directory's `Llama4Processor`: token strings, patch size, image processor."""
        return AutoProcessor.from_pretrained(self.model_dir)

    @cached_property
    def _token_ids(self) -> dict[str, int]:
        p = self._processor
        tokens = {
            "start": p.start_of_img_token,
            "end": p.end_of_img_token,
            "image": p.image_token,
            "patch": p.img_patch_token,
            "tile_x": p.tile_token,
            "tile_y": p.tile_global_token,
        }
        return {k: p.tokenizer.convert_tokens_to_ids(v) for k, v in tokens.items()}

    @cached_property
    def _tokens_per_tile(self) -> int:
        p = self._processor
        size = p.image_processor.size
        return (size.height // p.patch_size) * (size.width // p.patch_size) // p.downsample_ratio

    def _tile_grid(self, info: MediaInfo) -> tuple[int, int]:
        """(rows, columns) of the tiles the image processor cuts this image into."""
        ip = self._processor.image_processor
        canvases = torch.tensor(find_supported_resolutions(max_num_chunks=ip.max_patches, patch_size=ip.size))
        height, width = get_best_fit((info.height, info.width), canvases, ip.resize_to_max_canvas).tolist()
        return height // ip.size.height, width // ip.size.width


class Llama4Vision(MediaEncoder):
    """The vision model and projector of a `transformers` Llama 4, as `transformers` runs them.

    Features: `pixel_values` [tiles, 3, S, S] (every item's tiles, global tile last, in the
    image processor's bfloat16) and `aspect_ratios` [items, 2] (tile rows, columns)."""

    def __init__(self, hf: Llama4ForConditionalGeneration, family: Llama4Family, kernels: CpuKernels | None):
        self.hf = hf.eval()
        self.image_processor = AutoImageProcessor.from_pretrained(family.model_dir)
        self.device = hf.multi_modal_projector.linear_1.weight.device
        self.dtype = hf.multi_modal_projector.linear_1.weight.dtype
        if kernels is not None:  # the image encoder's projections are prompt-sized GEMMs too
            kernels.replace_linears(hf.vision_model)
            kernels.replace_linears(hf.multi_modal_projector)

    def preprocess(
        self, modality: str, items: list[Image.Image], mm_kwargs: MMKwargs = NO_MM_KWARGS
    ) -> dict[str, torch.Tensor]:
        out = self.image_processor(images=items, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "aspect_ratios": out["aspect_ratios"]}

    def encode(self, modality: str, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        # transformers casts the bfloat16 pixels to the model's dtype too (exact from bfloat16).
        pixel_values = features["pixel_values"].to(self.device, self.dtype)
        tiles = [rows * cols + (1 if rows * cols > 1 else 0) for rows, cols in features["aspect_ratios"].tolist()]
        per_tile = self.hf.get_image_features(pixel_values=pixel_values).pooler_output  # [tiles, tokens, H]
        return [t.flatten(0, 1) for t in per_tile.split(tiles)]


class Llama4Model(PagedMultimodalModel):
    """Vision model and projector from `transformers`; the text decoder runs paged."""

    def __init__(
        self, family: Llama4Family, dtype: torch.dtype | None, device: torch.device, kernels: CpuKernels | None = None
    ):
        self.hf = AutoModelForImageTextToText.from_pretrained(family.model_dir, dtype=dtype or "auto").to(device).eval()
        lm = self.hf.language_model
        super().__init__(
            PagedLlama4Text(lm.model, lm.lm_head, kernels),
            Llama4Vision(self.hf, family, kernels),
            self.hf.device,
            self.hf.dtype,
        )


def _vision_only(
    family: Llama4Family, dtype: torch.dtype | None, device: torch.device
) -> Llama4ForConditionalGeneration:
    """A `transformers` Llama 4 whose vision model and projector hold the checkpoint's weights
    and whose language model stays on the meta device: its weights are never read."""
    config = family.hf_config
    with torch.device("meta"):
        hf = AutoModelForImageTextToText.from_config(config)
    with no_init_weights():  # every parameter is overwritten from the checkpoint below
        vision = Llama4VisionModel(config.vision_config)
        projector = Llama4MultiModalProjector(config)
    load_modules(
        family.model_dir, {"vision_model.": vision, "multi_modal_projector.": projector}, _vision_key, dtype, device
    )
    hf.vision_model, hf.multi_modal_projector = vision, projector
    return hf


def _vision_key(key: str) -> str | None:
    """A checkpoint key of the vision model or projector (with or without a leading
    `model.`), else None."""
    key = key.removeprefix("model.")
    return key if key.startswith(("vision_model.", "multi_modal_projector.")) else None
