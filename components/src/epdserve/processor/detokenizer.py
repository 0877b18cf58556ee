"""Incremental detokenization and stop strings, so streamed text equals the final text."""

from __future__ import annotations

import re
from typing import Any

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece byte fallback: one raw byte


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    The concatenated deltas, `flush()` included, equal `tokenizer.decode(output_ids,
    skip_special_tokens=True)`, what `transformers` users print, minus a trailing incomplete
    character. Text is released only once it cannot change any more:
    - not while it ends in an incomplete UTF-8 character (decoded as U+FFFD), so a character
      split across byte-level tokens is never emitted in halves;
    - not while the ids end in byte-fallback tokens (`<0x23>`): the decoder turns a run of
      them that is not valid UTF-8 into one U+FFFD per byte, so a later byte can turn an
      earlier valid one ("#") into U+FFFD.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        if self.ids and _BYTE_TOKEN.fullmatch(self.tokenizer.convert_ids_to_tokens(self.ids[-1]) or ""):
            return ""
        return self._release(final=False)

    def flush(self) -> str:
        """At the end of the output: the text held back, minus a trailing incomplete character."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = decode(self.ids[self.prefix_offset :])
        if final:
            new_text = new_text.rstrip("\ufffd")
        elif new_text.endswith("\ufffd"):
            return ""
        if len(new_text) <= len(prefix_text):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text) :]


class StopStrings:
    """Holds back the tail that could still grow into a stop string.

    `feed` returns (text safe to emit, True when a stop string was hit); the stop string
    itself is never emitted, as in OpenAI's API.
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        cut = max(len(self.pending) - self.holdback, 0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
