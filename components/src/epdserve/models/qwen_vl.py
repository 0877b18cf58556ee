"""Qwen2.5-VL and Qwen3-VL: dynamic-resolution ViT, M-RoPE text decoder of Llama layout.

An image is resized (`smart_resize`) to multiples of `patch_size * merge_size` whose area
lies within the processor's pixel bounds (`mm_processor_kwargs` `min_pixels` / `max_pixels`
narrow them per request), cut into a (1, h, w) patch grid, and yields one embedding row per
merged `merge_size`^2 patch block, in place of as many `<|image_pad|>` tokens.

Rotary positions have three axes (temporal, height, width; `mrope_positions`): text tokens
count up on all three; an image's rows take (start, start + row, start + column) over its
merged grid, and the text after it resumes at start + max(rows, columns). Positions after the
prompt are index + delta. The decoder's rotary table mixes the axes (contiguous sections in
Qwen2.5-VL, interleaved in Qwen3-VL): `transformers`' own rotary module does that here.

Qwen3-VL's vision model also returns deepstack features, one [rows, H] tensor per text layer
it feeds (added to that layer's output at the image's positions): the encoder hands them over
as extra columns of the image's embedding, [rows, (1 + K) * H] (see `MultimodalModel`).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText
from transformers.initialization import no_init_weights
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from epdserve.kernels.cpu import CpuKernels
from epdserve.media.types import MediaInfo
from epdserve.models.base import (
    NO_MM_KWARGS,
    Expansion,
    MediaEncoder,
    MediaSpan,
    MMKwargs,
    ModelFamily,
    RopePositions,
)
from epdserve.models.llama import PagedLlama
from epdserve.models.multimodal import PagedMultimodalModel
from epdserve.models.weights import check_loaded, load_modules

# Per-request options and their bounds: an image of more than this many pixels is refused, so a
# request cannot blow up one prompt's patch count (the published models default to 12.8 MP).
MAX_PIXELS_LIMIT = 16 * 1024 * 1024
MM_KWARGS = ("min_pixels", "max_pixels")


class QwenVLFamily(ModelFamily):
    """Qwen2.5-VL (`qwen2_5_vl`) and Qwen3-VL (`qwen3_vl`): what tells them apart lives in the
    `transformers` modules they load (vision model, decoder layers, rotary table)."""

    model_types = ("qwen2_5_vl", "qwen3_vl")
    modalities = ("image",)

    @property
    def context_length(self) -> int:
        return self.hf_config.get_text_config().max_position_embeddings

    def placeholder_token_id(self, modality: str) -> int:
        return self.hf_config.image_token_id

    def num_placeholders(self, info: MediaInfo) -> int:
        return len(self.expand_placeholder("image", info).token_ids)

    def expand_placeholder(self, modality: str, info: MediaInfo, mm_kwargs: MMKwargs = NO_MM_KWARGS) -> Expansion:
        grid = self.image_grid(info, mm_kwargs)
        rows = grid[0] * grid[1] * grid[2] // self._merge**2
        return Expansion([self.placeholder_token_id(modality)] * rows, None, grid)

    def check_mm_kwargs(self, mm_kwargs: MMKwargs) -> dict[str, Any]:
        unknown = sorted(set(mm_kwargs) - set(MM_KWARGS))
        if unknown:
            raise ValueError(f"unsupported mm_processor_kwargs {unknown}; this model takes {list(MM_KWARGS)}")
        floor = (self._image_processor.patch_size * self._merge) ** 2
        out = {}
        for key in MM_KWARGS:
            value = mm_kwargs.get(key)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not floor <= value <= MAX_PIXELS_LIMIT:
                raise ValueError(f"mm_processor_kwargs.{key} must be an integer in [{floor}, {MAX_PIXELS_LIMIT}]")
            out[key] = value
        low, high = self._pixel_bounds(out)
        if low > high:
            raise ValueError(f"mm_processor_kwargs: min_pixels {low} exceeds max_pixels {high}")
        return out

    def image_grid(self, info: MediaInfo, mm_kwargs: MMKwargs = NO_MM_KWARGS) -> tuple[int, int, int]:
        """The (1, h, w) patch grid the image processor cuts this image into (`image_grid_thw`)."""
        patch = self._image_processor.patch_size
        low, high = self._pixel_bounds(mm_kwargs)
        try:
            height, width = smart_resize(info.height, info.width, patch * self._merge, low, high)
        except ValueError as exc:  # an aspect ratio over 200
            raise ValueError(f"image of {info.width}x{info.height}: {exc}") from None
        return 1, height // patch, width // patch

    def load_runner(
        self, dtype: torch.dtype | None, device: torch.device, kernels: CpuKernels | None = None
    ) -> QwenVLModel:
        return QwenVLModel(self, dtype, device, kernels)

    def load_encoder(
        self, dtype: torch.dtype | None, device: torch.device, kernels: CpuKernels | None = None
    ) -> QwenVLVision:
        return QwenVLVision(_vision_only(self, dtype, device), self, kernels)

    def _pixel_bounds(self, mm_kwargs: MMKwargs) -> tuple[int, int]:
        size = self._image_processor.size
        return mm_kwargs.get("min_pixels", size["shortest_edge"]), mm_kwargs.get("max_pixels", size["longest_edge"])

    @property
    def _merge(self) -> int:
        return self.hf_config.vision_config.spatial_merge_size

    @cached_property
    def _image_processor(self) -> Any:
        return AutoImageProcessor.from_pretrained(self.model_dir)


def mrope_positions(token_ids: list[int], media: list[MediaSpan], merge: int) -> RopePositions:
    """`transformers`' `get_rope_index` for a prompt of text and images (see the module)."""
    axes: list[torch.Tensor] = []
    next_pos = cursor = 0
    for span in media:
        if span.grid is None:
            raise ValueError("an image without its patch grid reached an M-RoPE model")
        if span.offset > cursor:  # text before the image
            axes.append(torch.arange(next_pos, next_pos + span.offset - cursor).expand(3, -1))
            next_pos += span.offset - cursor
        t, h, w = span.grid[0], span.grid[1] // merge, span.grid[2] // merge
        if t * h * w != span.length:
            raise ValueError(f"an image of {span.length} placeholders has a grid of {t * h * w} rows")
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
        axes.append(grid.reshape(3, -1) + next_pos)
        next_pos += max(h, w)
        cursor = span.offset + span.length
    if len(token_ids) > cursor:
        axes.append(torch.arange(next_pos, next_pos + len(token_ids) - cursor).expand(3, -1))
        next_pos += len(token_ids) - cursor
    prompt = torch.cat(axes, dim=1) if axes else torch.zeros(3, 0, dtype=torch.long)
    return RopePositions(prompt, next_pos - len(token_ids))


class QwenVLVision(MediaEncoder):
    """The vision model of a `transformers` Qwen2.5-VL / Qwen3-VL, as `transformers` runs it.

    Features: `pixel_values` [patches, C * T * P * P] (every item's patches in order) and
    `image_grid_thw` [items, 3]."""

    def __init__(self, hf: Any, family: QwenVLFamily, kernels: CpuKernels | None):
        self.hf = hf.eval()
        self.image_processor = AutoImageProcessor.from_pretrained(family.model_dir)
        visual = hf.model.visual
        weight = next(visual.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        if kernels is not None:  # the image encoder's projections are prompt-sized GEMMs too
            kernels.replace_linears(visual)

    def preprocess(
        self, modality: str, items: list[Image.Image], mm_kwargs: MMKwargs = NO_MM_KWARGS
    ) -> dict[str, torch.Tensor]:
        size = dict(self.image_processor.size)
        if "min_pixels" in mm_kwargs:
            size["shortest_edge"] = mm_kwargs["min_pixels"]
        if "max_pixels" in mm_kwargs:
            size["longest_edge"] = mm_kwargs["max_pixels"]
        out = self.image_processor(images=items, size=size, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def encode(self, modality: str, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        pixel_values = features["pixel_values"].to(self.device, self.dtype)
        grid = features["image_grid_thw"].to(self.device)
        out = self.hf.model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid)
        deepstack = getattr(out, "deepstack_features", None) or []
        return [
            torch.cat([main, *(layer[i] for layer in deepstack)], dim=-1) for i, main in enumerate(out.pooler_output)
        ]


class QwenVLModel(PagedMultimodalModel):
    """Vision model from `transformers`; the text decoder runs paged (`PagedLlama`)."""

    def __init__(
        self, family: QwenVLFamily, dtype: torch.dtype | None, device: torch.device, kernels: CpuKernels | None = None
    ):
        hf, info = AutoModelForImageTextToText.from_pretrained(
            family.model_dir, dtype=dtype or "auto", output_loading_info=True
        )
        check_loaded(family.model_dir, info)
        self.hf = hf.to(device).eval()
        text = self.hf.model.language_model
        if any(t != "full_attention" for t in getattr(text.config, "layer_types", None) or ()):
            raise ValueError(f"{family.model_dir}: sliding-window attention layers are not supported")
        self.merge = family.hf_config.vision_config.spatial_merge_size
        deepstack = len(getattr(family.hf_config.vision_config, "deepstack_visual_indexes", None) or ())
        super().__init__(
            PagedLlama(text, self.hf.lm_head, kernels, deepstack_layers=deepstack),
            QwenVLVision(self.hf, family, kernels),
            self.hf.device,
            self.hf.dtype,
        )

    def rope_positions(self, token_ids: list[int], media: list[MediaSpan]) -> RopePositions:
        return mrope_positions(token_ids, media, self.merge)


# Checkpoint prefixes: transformers 5 saves Qwen2.5-VL as `visual.*` + `model.layers.*`, Qwen3-VL
# as `model.visual.*` + `model.language_model.*`; published checkpoints use either layout.
_VISION_PREFIXES = ("model.visual.", "visual.")
_TEXT_PREFIXES = (
    "model.language_model.",
    "language_model.",
    "model.layers.",
    "model.embed_tokens.",
    "model.norm.",
    "lm_head.",
)


def _vision_only(family: QwenVLFamily, dtype: torch.dtype | None, device: torch.device) -> Any:
    """A `transformers` Qwen-VL whose vision model holds the checkpoint's weights and whose
    text model stays on the meta device: its weights are never read."""
    with torch.device("meta"):
        hf = AutoModelForImageTextToText.from_config(family.hf_config)
    with no_init_weights():  # every parameter is overwritten from the checkpoint below
        visual = type(hf.model.visual)._from_config(family.hf_config.vision_config)
    unknown: list[str] = []

    def rename(key: str) -> str | None:
        for prefix in _VISION_PREFIXES:
            if key.startswith(prefix):
                return "visual." + key.removeprefix(prefix)
        if not key.startswith(_TEXT_PREFIXES):
            unknown.append(key)
        return None

    load_modules(family.model_dir, {"visual.": visual}, rename, dtype, device)
    if unknown:
        raise ValueError(f"{family.model_dir}: unknown checkpoint keys {sorted(unknown)[:8]} ({len(unknown)} in all)")
    hf.model.visual = visual
    return hf
