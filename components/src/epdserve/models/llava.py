"""LLaVA-1.5: CLIP vision tower, MLP projector, Llama text decoder."""

from __future__ import annotations

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageTextToText
from transformers.initialization import no_init_weights
from transformers.models.llava.modeling_llava import LlavaForConditionalGeneration, LlavaMultiModalProjector

from epdserve.kernels.cpu import CpuKernels
from epdserve.media.types import MediaInfo
from epdserve.models.base import NO_MM_KWARGS, MediaEncoder, MMKwargs, ModelFamily
from epdserve.models.llama import PagedLlama
from epdserve.models.multimodal import PagedMultimodalModel
from epdserve.models.weights import load_modules


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

    def load_runner(
        self, dtype: torch.dtype | None, device: torch.device, kernels: CpuKernels | None = None
    ) -> LlavaModel:
        return LlavaModel(self, dtype, device, kernels)

    def load_encoder(
        self, dtype: torch.dtype | None, device: torch.device, kernels: CpuKernels | None = None
    ) -> LlavaVision:
        return LlavaVision(_vision_only(self, dtype, device), self, kernels)


class LlavaVision(MediaEncoder):
    """The CLIP tower and projector of a `transformers` LLaVA, as `transformers` runs them."""

    def __init__(self, hf: LlavaForConditionalGeneration, family: LlavaFamily, kernels: CpuKernels | None):
        self.hf = hf.eval()
        self.image_processor = AutoImageProcessor.from_pretrained(family.model_dir)
        self.config = family.hf_config
        self.device = hf.model.multi_modal_projector.linear_1.weight.device
        self.dtype = hf.model.multi_modal_projector.linear_1.weight.dtype
        _drop_unused_vision_layers(hf)
        if kernels is not None:  # the image encoder's projections are prompt-sized GEMMs too
            kernels.replace_linears(hf.model.vision_tower)
            kernels.replace_linears(hf.model.multi_modal_projector)

    def preprocess(
        self, modality: str, items: list[Image.Image], mm_kwargs: MMKwargs = NO_MM_KWARGS
    ) -> dict[str, torch.Tensor]:
        out = self.image_processor(images=items, return_tensors="pt")
        return {"pixel_values": out["pixel_values"]}

    def encode(self, modality: str, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        pixel_values = features["pixel_values"].to(self.device, self.dtype)
        out = self.hf.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=self.hf.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
        )
        return list(out.pooler_output)


class LlavaModel(PagedMultimodalModel):
    """CLIP tower and projector from `transformers`; the Llama decoder runs paged."""

    def __init__(
        self, family: LlavaFamily, dtype: torch.dtype | None, device: torch.device, kernels: CpuKernels | None = None
    ):
        # `transformers` maps both published key layouts (llava-hf and its own) on load.
        self.hf = AutoModelForImageTextToText.from_pretrained(family.model_dir, dtype=dtype or "auto").to(device).eval()
        super().__init__(
            PagedLlama(self.hf.model.language_model, self.hf.lm_head, kernels),
            LlavaVision(self.hf, family, kernels),
            self.hf.device,
            self.hf.dtype,
        )


def _vision_only(family: LlavaFamily, dtype: torch.dtype | None, device: torch.device) -> LlavaForConditionalGeneration:
    """A `transformers` LLaVA whose tower and projector hold the checkpoint's weights and whose
    language model stays on the meta device: its weights are never read."""
    config = family.hf_config
    with torch.device("meta"):
        hf = AutoModelForImageTextToText.from_config(config)
    with no_init_weights():  # every parameter is overwritten from the checkpoint below
        tower = AutoModel.from_config(config.vision_config)
        projector = LlavaMultiModalProjector(config)
    load_modules(
        family.model_dir, {"vision_tower.": tower, "multi_modal_projector.": projector}, _vision_key, dtype, device
    )
    hf.model.vision_tower, hf.model.multi_modal_projector = tower, projector
    return hf


def _vision_key(key: str) -> str | None:
    """A checkpoint key in the in-memory layout of the tower or projector, else None. Both
    published layouts: `vision_tower.vision_model.*` (llava-hf) and `vision_tower.*`
    (`transformers` 5), each with or without a leading `model.`."""
    key = key.removeprefix("model.")
    if key.startswith("vision_tower.vision_model."):
        key = "vision_tower." + key.removeprefix("vision_tower.vision_model.")
    return key if key.startswith(("vision_tower.", "multi_modal_projector.")) else None


def _drop_unused_vision_layers(hf: LlavaForConditionalGeneration) -> None:
    """Features come from `vision_feature_layer` (llava-1.5: the second to last layer), so
    the vision tower's later layers never matter: drop them, as vLLM does, and rewrite the
    loaded model's `vision_feature_layer` as indices from the front, which stay valid for the
    shorter tower. A tower laid out otherwise is left whole."""
    tower = hf.model.vision_tower
    encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
    if encoder is None:
        return
    chosen = hf.config.vision_feature_layer
    # hidden_states[0] is the embeddings, hidden_states[i] the output of layer i.
    num_layers = len(encoder.layers)
    from_front = [i if i >= 0 else num_layers + 1 + i for i in ([chosen] if isinstance(chosen, int) else chosen)]
    del encoder.layers[max(1, *from_front) :]  # a tower of no layers returns no hidden states
    hf.config.vision_feature_layer = from_front[0] if isinstance(chosen, int) else from_front
