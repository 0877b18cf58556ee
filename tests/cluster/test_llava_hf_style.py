"""epdserve serves a directory laid out like the published ``llava-hf/llava-1.5-7b-hf``.

The directory (``llava_hf_style.py``) has the published files and conventions -- older
config format, ``chat_template.json``, SentencePiece-style Llama tokenizer with byte
fallback, 336px CLIP preprocessing (576 image tokens), llava-hf weight keys, float16
weights -- with tiny random weights. Each request goes through ``launch/agg_multimodal.sh``
and the official ``openai`` client and is compared with ``transformers`` on the same
directory: the prompt token ids, the greedy completion ids and their decoded text.

The reference (``oracle.py``) loads the model as ``from_pretrained(dir)`` does by default
(the checkpoint's dtype), which is what the server does without ``--dtype``.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText

from support.cluster import launch
from support.llava_hf_style import IMAGE_TOKEN_ID, IMAGE_TOKENS
from support.oracle import data_url, decode_image, hf_generate, hf_messages, hf_text, load_hf, make_image

MAX_TOKENS = 8
SERVED = "llava-hf-style"
QUESTION = "What is in this image?"

# --------------------------------------------------------------------------- reference


def reference(model_dir: Path, messages: list[dict] | None = None, *, prompt: str | None = None,
              max_tokens: int = MAX_TOKENS) -> tuple[list[int], list[int], str]:
    """(prompt ids, greedy completion ids, decoded completion) from ``transformers``."""
    prompt_ids, ids = hf_generate(model_dir, messages, prompt=prompt, max_tokens=max_tokens)
    return prompt_ids, ids, hf_text(model_dir, ids)


def hf_inputs(model_dir: Path, messages: list[dict]) -> dict:
    """The processor's model inputs for a chat, as the reference builds them."""
    processor, _ = load_hf(model_dir)
    text = processor.apply_chat_template(hf_messages(messages), add_generation_prompt=True, tokenize=False)
    images = [decode_image(url_bytes(p["image_url"]["url"])) for m in messages if isinstance(m["content"], list)
              for p in m["content"] if p["type"] == "image_url"]
    return processor(text=text, images=images or None, return_tensors="pt")


def greedy(model, inputs: dict) -> list[int]:
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_TOKENS)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def url_bytes(url: str) -> bytes:
    return base64.b64decode(url.split(",", 1)[1])


# --------------------------------------------------------------------------- requests


def jpeg_url(seed: int) -> str:
    img = Image.open(io.BytesIO(make_image(seed, (80, 60)))).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def user(*urls: str, text: str = QUESTION) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def chat(cluster, messages: list[dict], stream: bool) -> tuple[list[int], list[int], str, str]:
    """(prompt ids, completion ids, text, finish reason) of a temperature-0 chat completion."""
    kw = dict(model=cluster.model, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
              extra_body={"return_token_ids": True})
    client = cluster.client()
    if not stream:
        r = client.chat.completions.create(**kw)
        choice = r.choices[0]
        ids = choice.model_extra["token_ids"]
        assert r.usage.completion_tokens == len(ids)
        assert r.usage.prompt_tokens == len(r.model_extra["prompt_token_ids"])
        return r.model_extra["prompt_token_ids"], ids, choice.message.content, choice.finish_reason
    prompt_ids, ids, text, finish, usage = None, [], "", None, None
    for chunk in client.chat.completions.create(**kw, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        if prompt_ids is None and (chunk.model_extra or {}).get("prompt_token_ids"):
            prompt_ids = chunk.model_extra["prompt_token_ids"]
        for choice in chunk.choices:
            text += choice.delta.content or ""
            ids += choice.model_extra.get("token_ids") or []
            finish = choice.finish_reason or finish
    assert usage is not None and usage.completion_tokens == len(ids)
    return prompt_ids, ids, text, finish


def assert_same(served: tuple, expected: tuple) -> None:
    """Server (prompt ids, ids, text) vs reference (prompt ids, ids, text), most basic first."""
    prompt_ids, ids, text = served[:3]
    want_prompt, want_ids, want_text = expected
    assert prompt_ids is not None, "return_token_ids: no prompt_token_ids in the response"
    assert len(prompt_ids) == len(want_prompt), "prompt length (template/tokens/expansion)"
    assert prompt_ids == want_prompt, "prompt token ids"
    assert ids == want_ids, "greedy completion ids"
    assert text == want_text.rstrip("\ufffd"), "detokenized text"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=["float16", "float32"])
def model_dir(request, llava_hf_style) -> Path:
    return llava_hf_style(request.param)


@pytest.fixture(scope="module")
def cluster(infra, model_dir, tmp_path_factory):
    c = launch("agg_multimodal.sh", infra, tmp_path_factory.mktemp("logs"), model_dir=model_dir,
               served_name=SERVED)
    yield c
    c.stop()


# --------------------------------------------------------------------------- tests


def test_directory_is_llava_hf_style(model_dir: Path) -> None:
    """The directory loads in transformers like the published one: keys, tokenizer, template."""
    config = json.loads((model_dir / "config.json").read_text())
    assert config["image_token_index"] == IMAGE_TOKEN_ID and "image_token_id" not in config
    assert config["text_config"]["model_type"] == "llama"
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    assert (model_dir / "chat_template.json").is_file()
    assert not (model_dir / "chat_template.jinja").exists()

    _, info = AutoModelForImageTextToText.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    processor, model = load_hf(model_dir)
    assert str(model.dtype) == "torch." + config["torch_dtype"]

    tok = processor.tokenizer
    ids = tok("the cat")["input_ids"]
    assert ids[0] == tok.bos_token_id == 1 and tok.convert_ids_to_tokens(ids[1:]) == ["▁the", "▁cat"]
    assert tok.decode(ids[1:]) == "the cat"  # SentencePiece: leading "▁" -> space, first stripped
    assert tok.decode(ids[2:]) == "cat" and tok.decode(tok.convert_tokens_to_ids(["a", "▁b"])) == "a b"
    assert tok.convert_ids_to_tokens(tok("é")["input_ids"])[-2:] == ["<0xC3>", "<0xA9>"]  # byte fallback

    text = processor.apply_chat_template(hf_messages([user("u")]), add_generation_prompt=True,
                                         tokenize=False)
    assert text == f"USER: <image>\n{QUESTION} ASSISTANT:"
    prompt_ids, _, _ = reference(model_dir, [user(data_url(make_image(1)))], max_tokens=1)
    assert prompt_ids.count(IMAGE_TOKEN_ID) == IMAGE_TOKENS == 576


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_chat_matches_transformers(cluster, model_dir, num_images, stream):
    messages = [user(*(data_url(make_image(10 + i)) for i in range(num_images)))]
    served = chat(cluster, messages, stream)
    assert_same(served, reference(model_dir, messages))
    assert served[3] in ("stop", "length")


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_jpeg_and_png(cluster, model_dir, stream):
    messages = [user(jpeg_url(3), data_url(make_image(4)), text="Compare the two pictures.")]
    assert_same(chat(cluster, messages, stream), reference(model_dir, messages))


def test_multi_turn_with_system_and_non_ascii(cluster, model_dir):
    """System text (no role prefix), an assistant turn ({% generation %} tags), byte fallback."""
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        user(data_url(make_image(21)), text="Qu'est-ce que c'est ? ☕"),
        {"role": "assistant", "content": [{"type": "text", "text": "A café, naïvely."}]},
        user(text="And the colour?"),
    ]
    assert_same(chat(cluster, messages, stream=False), reference(model_dir, messages))


def test_string_content(cluster, model_dir):
    """The llava-hf template reads list contents only (a string renders as nothing in
    transformers); the server passes OpenAI string contents as one text part, like vLLM."""
    messages = [{"role": "user", "content": "Describe the boat."}]
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "Describe the boat."}]}]
    assert_same(chat(cluster, messages, stream=False), reference(model_dir, as_parts))


def test_completions_match_transformers(cluster, model_dir):
    prompt = "The quick brown fox café"
    r = cluster.client().completions.create(model=cluster.model, prompt=prompt, max_tokens=MAX_TOKENS,
                                            temperature=0, extra_body={"return_token_ids": True})
    choice = r.choices[0]
    assert_same((r.model_extra["prompt_token_ids"], choice.model_extra["token_ids"], choice.text),
                reference(model_dir, prompt=prompt))


# Requests whose float16 and float32 greedy outputs differ (at the 1st and 3rd token) on this
# directory (found by search; most requests give the same ids in both dtypes), so the server
# must compute in the checkpoint's dtype to match.
DTYPE_SENSITIVE = [
    ([267], "Old what red blue lighthouse?"),
    ([], "Old cat blue?"),
]


@pytest.mark.parametrize("images,text", DTYPE_SENSITIVE, ids=["image", "text"])
def test_served_in_checkpoint_dtype(cluster, model_dir, images, text):
    messages = [user(*(data_url(make_image(s)) for s in images), text=text)]
    served = chat(cluster, messages, stream=False)
    assert_same(served, reference(model_dir, messages))
    if json.loads((model_dir / "config.json").read_text())["torch_dtype"] == "float16":
        float32 = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
        assert greedy(float32, hf_inputs(model_dir, messages)) != served[1], \
            "float16 and float32 agree here: pick new DTYPE_SENSITIVE requests"


PIL_SEARCH = 40   # candidate images tried for one whose greedy output the PIL backend changes


def _pil_sensitive_image(model_dir: Path) -> bytes | None:
    """An image whose greedy output on `model_dir` changes when its pixel values come from
    the PIL backend instead of the default (torchvision) one; None if none of the candidates
    does. Searched here rather than fixed: which images are sensitive depends on the CPU's
    float16 arithmetic (one found on an AVX-512 machine was not on another)."""
    _, model = load_hf(model_dir)
    pil = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    for seed in range(360, 360 + PIL_SEARCH):
        png = make_image(seed, (50, 40))
        inputs = hf_inputs(model_dir, [user(data_url(png))])
        default = greedy(model, inputs)
        inputs["pixel_values"] = pil(images=[decode_image(png)], return_tensors="pt")["pixel_values"]
        if greedy(model, inputs) != default:
            return png
    return None


def test_image_preprocessing_of_default_processor(cluster, model_dir):
    """The server preprocesses as the directory's default AutoProcessor (torchvision backend
    here). On the float16 directory the request's image is one whose greedy output changes
    with the PIL backend's pixel values (they differ by ~1/255), so a server using PIL would
    fail; most images are not sensitive."""
    png = make_image(360, (50, 40))
    if json.loads((model_dir / "config.json").read_text())["torch_dtype"] == "float16":
        png = _pil_sensitive_image(model_dir)
        assert png is not None, f"none of {PIL_SEARCH} images is sensitive to the PIL backend here"
    messages = [user(data_url(png))]
    served = chat(cluster, messages, stream=False)
    assert_same(served, reference(model_dir, messages))
