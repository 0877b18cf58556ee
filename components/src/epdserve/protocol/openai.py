"""OpenAI request bodies, validated the same way by the frontend and the processor.

Unknown fields are accepted and ignored, as OpenAI clients send many; fields we do not
implement but that change results (e.g. penalties, logprobs) are refused with a 400 unless
they hold their default.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from epdserve.protocol.errors import EpdError


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatMessage(_Lenient):
    role: str
    content: str | list[dict[str, Any]] | None = None


class SamplingFields(_Lenient):
    """Fields shared by chat and completion requests."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=16)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)  # vLLM extension
    return_token_ids: bool = False  # vLLM extension: token ids alongside the text

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    multi_modal_uuids: dict[str, list[str | None]] | None = None  # vLLM extension
    mm_processor_kwargs: dict[str, Any] | None = None  # vLLM extension: per-request media processing options
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """Alternatives per token, or None when no logprobs are wanted."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def token_limit(self) -> int:
        return self.max_tokens or 16  # OpenAI's default for completions


# Fields that change results and are not implemented yet: refused unless left at a default.
_NOT_YET = {
    "echo": (None, False),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "response_format": (None, {"type": "text"}),
}


def _refuse_unimplemented(req: SamplingFields) -> None:
    for name, value in (req.model_extra or {}).items():
        if name in _NOT_YET and value not in _NOT_YET[name]:
            raise EpdError.bad_request(f"{name}={value!r} is not supported yet", param=name)


ENDPOINTS: dict[str, type[ChatCompletionRequest] | type[CompletionRequest]] = {
    "chat": ChatCompletionRequest,
    "completions": CompletionRequest,
}


def parse_request(endpoint: str, body: bytes | dict) -> ChatCompletionRequest | CompletionRequest:
    """Validate a request body; any problem is a 400 naming the offending field."""
    cls = ENDPOINTS[endpoint]
    try:
        req = cls.model_validate(body) if isinstance(body, dict) else cls.model_validate_json(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "json_invalid":
            raise EpdError.bad_request(f"request body is not valid JSON: {err['msg']}") from exc
        raise EpdError.bad_request(f"{where}: {err['msg']}", param=where) from exc
    _refuse_unimplemented(req)
    return req
