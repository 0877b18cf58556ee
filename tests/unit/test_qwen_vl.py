"""Qwen2.5-VL and Qwen3-VL against `transformers`: the processor's prompt and grids, M-RoPE
positions, the paged engine's greedy output (chunked, preempted, decoded from handed-over KV),
the split-off vision encoder in both checkpoint layouts, mm_processor_kwargs, start-up checks."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from epdserve.config import MediaConfig
from epdserve.engine.base import EngineOutput, KVAdmitted
from epdserve.engine.paged import EngineConfig, PagedEngine
from epdserve.engine.scheduler import Scheduler, SchedulerConfig
from epdserve.media.fetch import MediaFetcher
from epdserve.media.image import probe_image
from epdserve.models.base import MediaSpan
from epdserve.models.qwen_vl import QwenVLFamily, mrope_positions
from epdserve.models.registry import load_family
from epdserve.processor.prompt import PromptBuilder
from epdserve.protocol.errors import EpdError
from epdserve.protocol.openai import ChatCompletionRequest
from epdserve.tools.tiny_model import build_tiny_model
from support.engine import assert_no_leak, drive
from support.engine_requests import engine_request, load_kv, step_checked
from support.oracle import data_url, decode_image, hf_greedy, load_hf, make_image

FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
SIZES = {"wide": (64, 48), "tall": (40, 72), "small": (32, 32)}
CASES = {
    "text": ("Tell me about the farmer and the boat", [], 12),
    "one-image": ("What is shown?", [make_image(1)], 12),
    "two-images": ("Compare them.", [make_image(2, SIZES["tall"]), make_image(3, SIZES["small"])], 10),
}


@pytest.fixture(scope="module", params=FAMILIES)
def model_dir(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="module")
def runner(model_dir: Path):
    return load_family(model_dir).load_runner(None, torch.device("cpu"))


def user_turn(text: str, images: list[bytes]) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(png)}} for png in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _build(model_dir: Path, messages: list[dict], **request):
    processor, _ = load_hf(model_dir)
    media = MediaConfig()
    builder = PromptBuilder(load_family(model_dir), processor.tokenizer, processor, media, True, MediaFetcher(media))
    return asyncio.run(builder.build(ChatCompletionRequest(model="m", messages=messages, **request)))


def test_tiny_model_is_a_standard_directory(model_dir: Path, tmp_path: Path) -> None:
    """`save_pretrained` output that the auto classes load with no key left over or missing,
    byte for byte the same on a rebuild, and whose greedy output depends on the image."""
    processor = AutoProcessor.from_pretrained(model_dir)
    model, info = AutoModelForImageTextToText.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(processor).__name__ == {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}[
        model.config.model_type]
    again = build_tiny_model(model.config.model_type, tmp_path / "again")
    assert all((again / f.name).read_bytes() == f.read_bytes() for f in model_dir.iterdir())
    outputs = {tuple(hf_greedy(model_dir, user_turn("What is shown?", [make_image(seed)]), max_tokens=8))
               for seed in (1, 2, 3)}
    assert len(outputs) > 1


def test_prompt_grids_and_positions_equal_the_hf_processor(model_dir: Path) -> None:
    """Placeholders expanded from each image's size alone, their grids, and the M-RoPE
    positions and delta are `transformers`' (`get_rope_index`)."""
    processor, model = load_hf(model_dir)
    pngs = [make_image(i, size) for i, size in enumerate(SIZES.values())]
    prompt = _build(model_dir, user_turn("What is shown?", pngs))
    hf_text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] * 3 + [{"type": "text", "text": "What is shown?"}]}],
        add_generation_prompt=True, tokenize=False)
    hf = processor(text=hf_text, images=[decode_image(p) for p in pngs], return_tensors="pt")
    assert prompt.token_ids == hf["input_ids"][0].tolist()
    assert [list(item.grid) for item in prompt.media] == hf["image_grid_thw"].tolist()
    positions, delta = model.model.get_rope_index(hf["input_ids"], hf["mm_token_type_ids"], hf["image_grid_thw"])
    spans = [MediaSpan(m.offset, m.length, tuple(m.grid)) for m in prompt.media]
    ours = mrope_positions(prompt.token_ids, spans, model.config.vision_config.spatial_merge_size)
    assert torch.equal(ours.prompt, positions[:, 0]) and ours.delta == int(delta)


@pytest.mark.parametrize("config", [
    EngineConfig(block_size=16),
    # 16-token steps split every image over several chunks.
    EngineConfig(block_size=4, scheduler=SchedulerConfig(max_num_batched_tokens=16)),
], ids=["roomy", "chunked"])
def test_engine_matches_generate(model_dir: Path, runner, config: EngineConfig) -> None:
    engine = PagedEngine(runner, config)
    requests = [engine_request(model_dir, runner, rid, text, images, n) for rid, (text, images, n) in CASES.items()]
    for request in requests:
        engine.add_request(request)
    got, _ = drive(engine)
    for rid, (text, images, n) in CASES.items():
        assert got[rid] == hf_greedy(model_dir, user_turn(text, images), images=images, max_tokens=n), rid
    assert_no_leak(engine)


def test_preempted_requests_recompute_their_positions(model_dir: Path, runner, monkeypatch) -> None:
    """Six requests, every other one with an image, in 40 blocks of 4 with no decode room taken
    at admission: decoding preempts the later ones, recomputed with the same M-RoPE positions."""
    preempted = []
    preempt = Scheduler._preempt
    monkeypatch.setattr(Scheduler, "_preempt", lambda self, seq: (preempted.append(seq.request_id), preempt(self, seq)))
    cases = {f"r{i}": (f"Picture {i}.", [make_image(50 + i, SIZES["small"])] * (i % 2), 20) for i in range(6)}
    scheduler = SchedulerConfig(max_num_batched_tokens=64, reserve_window=0)
    engine = PagedEngine(runner, EngineConfig(block_size=4, num_kv_blocks=40, scheduler=scheduler))
    for rid, (text, images, n) in cases.items():
        engine.add_request(engine_request(model_dir, runner, rid, text, images, n))
    got, _ = drive(engine)
    assert preempted
    for rid, (text, images, n) in cases.items():
        assert got[rid] == hf_greedy(model_dir, user_turn(text, images), images=images, max_tokens=n), rid
    assert_no_leak(engine)


def test_decode_from_handed_over_kv_matches_generate(model_dir: Path, runner) -> None:
    """E/P/D in-process: a prefill engine holds the prompt's KV and reports its rope delta; a
    decode engine loads the KV and decodes with that delta alone (no prompt positions)."""
    text, images, n = CASES["two-images"]
    prefill, decode = (PagedEngine(runner, EngineConfig(block_size=4, num_kv_blocks=128)) for _ in range(2))
    request = engine_request(model_dir, runner, "r", text, images, n)
    sampling = request.sampling
    prefill.add_request(dataclasses.replace(request, sampling=dataclasses.replace(sampling, max_tokens=1),
                                            hold_kv=True))
    (first,) = step_checked(prefill)
    assert isinstance(first, EngineOutput) and first.held_blocks and first.rope_delta is not None
    assert first.rope_delta < 0   # images take fewer positions than tokens
    # As a decode worker gets it: the media's places without their data (the KV carries them).
    placed = [dataclasses.replace(m, features=None, grid=None) for m in request.mm_inputs]
    decode.add_request(dataclasses.replace(request, mm_inputs=placed, prefilled_token=first.new_token_ids[0],
                                           rope_delta=first.rope_delta))
    (admitted,) = step_checked(decode)
    assert isinstance(admitted, KVAdmitted)
    load_kv(decode, admitted.blocks, prefill, first.held_blocks)
    prefill.release("r")
    decode.kv_loaded("r")
    got, _ = drive(decode)
    expected = hf_greedy(model_dir, user_turn(text, images), images=images, max_tokens=n)
    assert [first.new_token_ids[0], *got["r"]] == expected
    assert_no_leak(prefill)
    assert_no_leak(decode)


@torch.inference_mode()
def test_split_encoder_equals_the_full_model_in_both_key_layouts(model_dir: Path, runner, tmp_path: Path) -> None:
    """The encode worker's vision-only model (no text weights read) gives the runner's
    embeddings, deepstack columns included. Qwen2.5-VL loads from both layouts `transformers`
    reads (`visual.*` + `model.layers.*`, as published and as `save_pretrained` writes, and
    `model.visual.*` + `model.language_model.*`); Qwen3-VL has one."""
    family = load_family(model_dir)
    pil = [decode_image(make_image(5, size)) for size in SIZES.values()]
    expected = runner.encode("image", runner.preprocess("image", pil))
    deepstack = len(getattr(family.hf_config.vision_config, "deepstack_visual_indexes", None) or ())
    assert expected[0].shape[1] == (1 + deepstack) * family.hf_config.text_config.hidden_size
    directories = [model_dir]
    if family.hf_config.model_type == "qwen2_5_vl":
        other = tmp_path / "model"
        shutil.copytree(model_dir, other)
        tensors = load_file(other / "model.safetensors")
        save_file({_other_layout(k): v for k, v in tensors.items()}, other / "model.safetensors",
                  metadata={"format": "pt"})
        relaid = load_family(other).load_runner(None, torch.device("cpu"))
        assert all(torch.equal(a, b) for a, b in zip(relaid.hf.state_dict().values(),
                                                      runner.hf.state_dict().values(), strict=True))
        directories.append(other)
    for directory in directories:
        encoder = load_family(directory).load_encoder(None, torch.device("cpu"))
        assert all(p.is_meta for p in encoder.hf.model.language_model.parameters())
        got = encoder.encode("image", encoder.preprocess("image", pil))
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))


def _other_layout(key: str) -> str:
    for old, new in (("visual.", "model.visual."), ("model.layers.", "model.language_model.layers."),
                     ("model.embed_tokens.", "model.language_model.embed_tokens."),
                     ("model.norm.", "model.language_model.norm.")):
        if key.startswith(old):
            return new + key.removeprefix(old)
        if key.startswith(new):
            return old + key.removeprefix(new)
    return key


def test_unknown_checkpoint_keys_fail_start_up_naming_them(model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.surprise.weight"] = torch.zeros(2)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    family = load_family(broken)
    for load in (family.load_runner, family.load_encoder):
        with pytest.raises(ValueError, match=r"model\.surprise\.weight"):
            load(None, torch.device("cpu"))


def test_mm_processor_kwargs_resize_bound_and_key_the_cache(model_dir: Path, runner) -> None:
    """max_pixels shrinks the grid as the HF processor does; the same image at other options
    has another hash; keys outside the allow-list and out-of-bounds values are 400s."""
    png = make_image(7, SIZES["wide"])
    family = load_family(model_dir)
    assert isinstance(family, QwenVLFamily)
    default = _build(model_dir, user_turn("Hi", [png])).media[0]
    small = _build(model_dir, user_turn("Hi", [png]), mm_processor_kwargs={"max_pixels": 1024}).media[0]
    same = _build(model_dir, user_turn("Hi", [png]), mm_processor_kwargs={"max_pixels": 1024}).media[0]
    processor, _ = load_hf(model_dir)
    hf = processor.image_processor(images=[decode_image(png)], size={"shortest_edge": 256, "longest_edge": 1024})
    assert list(small.grid) == hf["image_grid_thw"][0].tolist() != list(default.grid)
    assert small.length < default.length and small.hash == same.hash != default.hash
    features = runner.features("image", png, {"max_pixels": 1024})
    assert torch.equal(features["pixel_values"], torch.as_tensor(hf["pixel_values"]))
    assert family.num_placeholders(probe_image(png)) == default.length
    for bad in ({"max_pixels": 10**8}, {"max_pixels": 16}, {"min_pixels": 4096, "max_pixels": 1024},
                {"do_resize": False}, {"max_pixels": "big"}):
        with pytest.raises(EpdError, match="mm_processor_kwargs") as err:
            _build(model_dir, user_turn("Hi", [png]), mm_processor_kwargs=bad)
        assert err.value.code == 400
