"""The tiny model builder and the oracle: loadable, deterministic, input-sensitive."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from epdserve.tools.tiny_model import build_tiny_model, main, make_spec
from support.oracle import (
    EOS_CHAT,
    EOS_CHAT_TOKENS,
    EOS_PROMPT,
    EOS_PROMPT_TOKENS,
    data_url,
    decode_image,
    hf_greedy,
    hf_text,
    load_hf,
    make_image,
)

QUESTION = "What is shown in this picture?"


def image_chat(text: str, *pngs: bytes) -> list[dict]:
    """One OpenAI-style user message: the images as data URLs, then the text."""
    parts = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in pngs]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def safetensors_keys(model_dir: Path) -> set[str]:
    """The tensor names stored in the directory's model.safetensors."""
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        return set(f.keys())


@pytest.fixture(scope="module")
def tiny(tiny_llava: Path) -> Path:
    return tiny_llava


@pytest.fixture(scope="module")
def tiny_hf_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("llava", tmp_path_factory.mktemp("hf"), weight_layout="llava-hf")


@pytest.fixture(scope="module")
def custom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(
        "llava", tmp_path_factory.mktemp("custom"), hidden_size=96, num_heads=6,
        num_kv_heads=3, vocab_size=700, image_size=40, patch_size=8, seed=7,
    )


def test_weight_layouts(tiny: Path, tiny_hf_layout: Path) -> None:
    keys, hf_keys = safetensors_keys(tiny), safetensors_keys(tiny_hf_layout)
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"vision_tower", "language_model", "multi_modal_projector"}
    assert "vision_tower.embeddings.patch_embedding.weight" in keys
    assert "language_model.lm_head.weight" in keys
    assert "language_model.model.embed_tokens.weight" in keys
    assert all(k.startswith("vision_tower.vision_model.") for k in hf_keys
               if k.startswith("vision_tower."))
    assert {k for k in keys if not k.startswith("vision_tower.")} == {
        k for k in hf_keys if not k.startswith("vision_tower.")}


def test_both_layouts_load_fully_with_identical_logits(tiny: Path, tiny_hf_layout: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny)
    inputs = processor(text=f"USER: <image>\n{QUESTION} ASSISTANT:",
                       images=[decode_image(make_image(0))], return_tensors="pt")
    logits = []
    for model_dir in (tiny, tiny_hf_layout):
        model, info = AutoModelForImageTextToText.from_pretrained(
            model_dir, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        assert not info["mismatched_keys"]
        with torch.no_grad():
            logits.append(model.eval()(**inputs).logits)
    assert torch.equal(logits[0], logits[1])


def test_greedy_depends_on_image_and_prompt(tiny: Path) -> None:
    by_image = [hf_greedy(tiny, image_chat(QUESTION, make_image(s))) for s in (1, 2)]
    by_prompt = [hf_greedy(tiny, image_chat(q, make_image(1))) for q in (QUESTION, "Why?")]
    assert by_image[0] != by_image[1]
    assert by_prompt[0] != by_prompt[1]
    for out in by_image + by_prompt:
        assert len(out) == 16 and len(set(out)) > 1


def test_oracle_matches_plain_generate(tiny: Path) -> None:
    png = make_image(3, size=(50, 70))
    assert make_image(3, size=(50, 70)) == png
    messages = image_chat(QUESTION, png)
    # Explicit images and data URLs in the messages are the same request.
    assert hf_greedy(tiny, messages, images=[png], max_tokens=5) == hf_greedy(
        tiny, messages, max_tokens=5)
    processor, model = load_hf(tiny)
    prompt = f"USER: <image>\n{QUESTION} ASSISTANT:"
    assert processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True, tokenize=False) == prompt
    inputs = processor(text=prompt, images=[decode_image(png)], return_tensors="pt")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=8)
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert hf_greedy(tiny, prompt=prompt, images=[png], max_tokens=8) == expected
    assert hf_text(tiny, expected) == processor.tokenizer.decode(
        expected, skip_special_tokens=True)


def test_oracle_stops_at_eos(tiny: Path) -> None:
    eos = load_hf(tiny)[0].tokenizer.eos_token_id
    by_prompt = hf_greedy(tiny, prompt=EOS_PROMPT, max_tokens=64)
    by_chat = hf_greedy(tiny, EOS_CHAT, max_tokens=64)
    for out, count in [(by_prompt, EOS_PROMPT_TOKENS), (by_chat, EOS_CHAT_TOKENS)]:
        assert len(out) == count and out[-1] == eos and eos not in out[:-1]
    # A max_tokens limit cuts the same sequence short.
    assert hf_greedy(tiny, prompt=EOS_PROMPT, max_tokens=EOS_PROMPT_TOKENS - 1) == by_prompt[:-1]


@pytest.mark.parametrize("which, per_image", [("tiny", 16), ("custom", 25)])
def test_image_token_count(which: str, per_image: int, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(which)
    processor = AutoProcessor.from_pretrained(model_dir)
    image_id = json.loads((model_dir / "config.json").read_text())["image_token_index"]
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == image_id
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                      {"type": "text", "text": "Compare."}]}],
        add_generation_prompt=True, tokenize=False)
    pngs = [make_image(1), make_image(2, size=(30, 90))]
    inputs = processor(text=text, images=[decode_image(p) for p in pngs], return_tensors="pt")
    assert int((inputs["input_ids"] == image_id).sum()) == 2 * per_image


def test_chat_template_multi_turn_and_system(tiny: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "More?"},
    ]
    expected = "Be brief. USER: <image>\nHi ASSISTANT: Hello USER: More? ASSISTANT:"
    assert processor.apply_chat_template(messages, add_generation_prompt=True,
                                         tokenize=False) == expected
    tokenizer = AutoTokenizer.from_pretrained(tiny)  # the tokenizer alone has it too
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                         tokenize=False) == expected


def test_tokenizer(tiny: Path, custom: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    generation = json.loads((tiny / "generation_config.json").read_text())
    text = "The farmer painted 12 red boats, then said: \"café & naïve!\"\n  Done."
    ids = tokenizer(text).input_ids
    # bos is prepended (by tokenizer.json's post-processor), eos is not appended.
    assert ids[0] == tokenizer.bos_token_id == generation["bos_token_id"]
    assert ids[-1] != tokenizer.eos_token_id == generation["eos_token_id"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer("USER: <image>\n").input_ids) == len(tokenizer("USER: \n").input_ids) + 1
    assert len(tokenizer) == 1024
    assert len(AutoTokenizer.from_pretrained(custom)) == 700


def test_custom_sizes(custom: Path) -> None:
    config = json.loads((custom / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert (text["hidden_size"], text["num_attention_heads"], text["vocab_size"]) == (96, 6, 700)
    assert (vision["image_size"], vision["patch_size"]) == (40, 8)
    out = hf_greedy(custom, image_chat(QUESTION, make_image(1)), max_tokens=4)
    assert len(out) == 4 and all(0 <= t < 700 for t in out)


def test_preset_with_overrides() -> None:
    spec = make_spec("bench", vocab_size=4096)
    assert (spec.hidden_size, spec.vocab_size, spec.image_size) == (512, 4096, 224)
    with pytest.raises(ValueError):
        make_spec(image_size=30)


def test_build_is_deterministic(tmp_path: Path, tiny: Path) -> None:
    again = build_tiny_model("llava", tmp_path / "again")
    for path in sorted(tiny.iterdir()):
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    other = build_tiny_model("llava", tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()


def test_cli_bfloat16_llava_hf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    main(["--family", "llava", "--out", str(out), "--weight-layout", "llava-hf",
          "--dtype", "bfloat16", "--vision-layers", "3"])
    assert capsys.readouterr().out.strip() == str(out)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("language_model.lm_head.weight").dtype == torch.bfloat16
        assert "vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight" in f.keys()
    assert len(hf_greedy(out, image_chat(QUESTION, make_image(1)), max_tokens=3)) == 3


def test_llama4_build_is_deterministic_and_input_sensitive(tmp_path: Path, tiny_llama4: Path) -> None:
    again = build_tiny_model("llama4", tmp_path / "again")
    for path in sorted(tiny_llama4.iterdir()):
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    by_image = [hf_greedy(tiny_llama4, image_chat(QUESTION, make_image(s)), max_tokens=8) for s in (1, 2)]
    by_prompt = [hf_greedy(tiny_llama4, image_chat(q, make_image(1)), max_tokens=8) for q in (QUESTION, "Why?")]
    assert by_image[0] != by_image[1] and by_prompt[0] != by_prompt[1]


def test_llama4_tokenizer_leaves_bos_to_the_template(tiny_llama4: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_llama4)
    tokenizer = processor.tokenizer
    assert tokenizer("Hi").input_ids[0] != tokenizer.bos_token_id
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}],
                                         add_generation_prompt=True, tokenize=False)
    assert text == "<|begin_of_text|><|header_start|>user<|header_end|>\n\n<|image|><|eot|>" \
                   "<|header_start|>assistant<|header_end|>\n\n"
    generation = json.loads((tiny_llama4 / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eom|>", "<|eot|>"])
