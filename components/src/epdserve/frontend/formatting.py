"""OpenAI response bodies for chat and text completions, streamed and not."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from epdserve.protocol import epdserve_pb2 as pb


@dataclass
class ResponseBuilder:
    """Turns the processor's `TextDelta`s into OpenAI objects for one request."""

    endpoint: str  # "chat" or "completions"
    model: str
    request_id: str
    created: int = field(default_factory=lambda: int(time.time()))
    return_token_ids: bool = False
    logprobs: bool = False  # the client asked for logprobs

    @property
    def _object(self) -> str:
        return "chat.completion" if self.endpoint == "chat" else "text_completion"

    def _base(self, obj: str) -> dict:
        prefix = "chatcmpl-" if self.endpoint == "chat" else "cmpl-"
        return {"id": prefix + self.request_id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def usage(u: pb.Usage) -> dict:
        return {
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
        }

    def _logprobs(self, items: list[pb.Logprob], text_offset: int = 0) -> dict | None:
        """OpenAI's logprobs object: chat's `content` list, or the completions arrays."""
        if not self.logprobs:
            return None
        if self.endpoint == "chat":
            entry = lambda lp: {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode())}  # noqa: E731
            return {"content": [entry(lp) | {"top_logprobs": [entry(t) for t in lp.top]} for lp in items]}
        offsets = []
        for lp in items:
            offsets.append(text_offset)
            text_offset += len(lp.token)
        return {
            "tokens": [lp.token for lp in items],
            "token_logprobs": [lp.logprob for lp in items],
            "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in items],
            "text_offset": offsets,
        }

    def response(self, deltas: list[pb.TextDelta]) -> dict:
        """The non-streaming body from every delta of the request, one choice per index."""
        by_index: dict[int, list[pb.TextDelta]] = {}
        for d in deltas:
            by_index.setdefault(d.index, []).append(d)
        choices = [self._choice(i, ds) for i, ds in sorted(by_index.items())]
        usage = next(d.usage for d in reversed(deltas) if d.HasField("usage"))
        body = self._base(self._object) | {"choices": choices, "usage": self.usage(usage)}
        if self.return_token_ids:
            body["prompt_token_ids"] = list(deltas[0].prompt_token_ids)
        return body

    def _choice(self, index: int, deltas: list[pb.TextDelta]) -> dict:
        text = "".join(d.text for d in deltas)
        choice: dict = {
            "index": index,
            "logprobs": self._logprobs([lp for d in deltas for lp in d.logprobs]),
            "finish_reason": deltas[-1].finish_reason or None,
        }
        if self.endpoint == "chat":
            choice["message"] = {"role": "assistant", "content": text, "refusal": None, "tool_calls": []}
        else:
            choice["text"] = text
        if self.return_token_ids:
            choice["token_ids"] = [t for d in deltas for t in d.token_ids]
        return choice

    def chunk(self, delta: pb.TextDelta, first: bool, include_usage: bool, text_offset: int = 0) -> dict:
        """One streamed chunk; the first chat chunk also carries the assistant role.
        `text_offset` is the length of the text streamed before (completions logprobs)."""
        choice: dict = {
            "index": delta.index,
            "logprobs": self._logprobs(list(delta.logprobs), text_offset),
            "finish_reason": delta.finish_reason or None,
        }
        if self.endpoint == "chat":
            choice["delta"] = ({"role": "assistant"} if first else {}) | (
                {"content": delta.text} if delta.text or first else {}
            )
            obj = "chat.completion.chunk"
        else:
            choice["text"] = delta.text
            obj = "text_completion"
        body = self._base(obj) | {"choices": [choice]}
        if self.return_token_ids:
            choice["token_ids"] = list(delta.token_ids)
            if delta.prompt_token_ids:
                body["prompt_token_ids"] = list(delta.prompt_token_ids)
        if include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, usage: pb.Usage) -> dict:
        obj = "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"
        return self._base(obj) | {"choices": [], "usage": self.usage(usage)}


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
