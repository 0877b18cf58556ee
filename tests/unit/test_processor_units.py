"""Processor pieces in isolation: incremental detokenization, stop strings, chat conversion."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from epdserve.processor.chat import convert_messages, template_takes_parts
from epdserve.processor.detokenizer import IncrementalDetokenizer, StopStrings
from epdserve.protocol.errors import EpdError
from epdserve.protocol.openai import ChatMessage


@pytest.fixture(scope="module")
def tokenizer(tiny_llava):
    return AutoTokenizer.from_pretrained(tiny_llava)


def test_streamed_text_equals_full_decode(tokenizer):
    text = "naïve café — 東京 and emoji 🙂 end"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add([t]) for t in ids]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)


def test_byte_fallback_run_is_released_once_it_cannot_change(llava_hf_style):
    """A run of SentencePiece byte tokens that is not valid UTF-8 decodes to one U+FFFD per
    byte, so a later byte (0xEC) turns an earlier valid one ("#") into U+FFFD: the streamed
    text must not have emitted the "#"."""
    tokenizer = AutoTokenizer.from_pretrained(llava_hf_style("float32"))
    byte = tokenizer.convert_tokens_to_ids
    ids = [tokenizer("Venor", add_special_tokens=False)["input_ids"][-1], byte("<0x23>"), byte("<0xEC>"),
           byte("<0x23>"), tokenizer(" 71", add_special_tokens=False)["input_ids"][-1], byte("<0x23>"), byte("<0xEC>")]
    for tail in (ids, ids[:-1]):   # ending in an invalid run, and in a valid byte
        detok = IncrementalDetokenizer(tokenizer)
        streamed = "".join(detok.add([t]) for t in tail) + detok.flush()
        assert streamed == tokenizer.decode(tail, skip_special_tokens=True).rstrip("\ufffd")


def test_stop_strings_hold_back_and_cut():
    stops = StopStrings(["STOP", "xy"])
    out, hit = stops.feed("abcST")
    assert (out, hit) == ("ab", False)
    out, hit = stops.feed("OPmore")
    assert (out, hit) == ("cST"[:1], True)
    tail = StopStrings([])
    assert tail.feed("abc") == ("abc", False) and tail.flush() == ""


def test_template_content_format_detection():
    assert template_takes_parts("{% for c in message['content'] %}{{ c['text'] }}{% endfor %}")
    assert not template_takes_parts("{{ message['content'] }}")


def test_convert_messages_collects_media_in_order():
    msgs = [ChatMessage(role="system", content="be brief"),
            ChatMessage(role="user", content=[{"type": "image_url", "image_url": {"url": "http://a/1.png"}},
                                              {"type": "text", "text": "and"},
                                              {"type": "image_url", "image_url": "http://a/2.png"}])]
    converted, media = convert_messages(msgs, takes_parts=True)
    assert [m.url for m in media] == ["http://a/1.png", "http://a/2.png"]
    assert converted[0]["content"] == [{"type": "text", "text": "be brief"}]
    assert [p["type"] for p in converted[1]["content"]] == ["image", "text", "image"]
    with pytest.raises(EpdError):
        convert_messages([ChatMessage(role="user", content=[{"type": "hologram"}])], takes_parts=True)
    with pytest.raises(EpdError):
        convert_messages(msgs, takes_parts=False)
