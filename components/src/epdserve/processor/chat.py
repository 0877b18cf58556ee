"""OpenAI chat messages -> the model's chat template input, plus the media they reference."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from epdserve.protocol.errors import EpdError
from epdserve.protocol.openai import ChatMessage

# One message as the HF chat template takes it: content is a list of parts, or a string for
# templates that do not take parts.
TemplateMessage = dict[str, str | list[dict[str, str]]]

# OpenAI content part type -> (modality, key holding the URL object or string)
MEDIA_PARTS = {
    "image_url": ("image", "image_url"),
    "video_url": ("video", "video_url"),
    "audio_url": ("audio", "audio_url"),
    "input_audio": ("audio", "input_audio"),
}

# A template that walks message['content'] as a list of parts (most multimodal ones);
# otherwise it expects content to be a string.
_LIST_CONTENT = re.compile(
    r"for\s+\w+\s+in\s+message\[['\"]content['\"]\]"
    r"|message\[['\"]content['\"]\]\s*\|\s*selectattr"
    r"|content\[['\"]type['\"]\]|\.type\s*=="
)


@dataclass(frozen=True)
class MediaRef:
    """A media item referenced by a request, in prompt order."""

    modality: str
    url: str
    uuid: str | None = None


def template_takes_parts(template: str) -> bool:
    return bool(_LIST_CONTENT.search(template))


def _media_url(part: dict[str, Any], key: str) -> str:
    value = part.get(key)
    if isinstance(value, dict) and key == "input_audio":
        data, fmt = value.get("data"), value.get("format", "wav")
        if isinstance(data, str):
            return f"data:audio/{fmt};base64,{data}"
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise EpdError.bad_request(f"content part of type {part.get('type')!r} needs {key}.url", param="messages")
    return value


def convert_messages(messages: list[ChatMessage], takes_parts: bool) -> tuple[list[TemplateMessage], list[MediaRef]]:
    """HF-template messages and the media they reference, in order.

    Media parts become `{"type": <modality>}` placeholders the template renders as the
    model's media token; text parts stay as they are (joined when the template wants a
    string).
    """
    converted: list[TemplateMessage] = []
    media: list[MediaRef] = []
    for msg in messages:
        content = msg.content
        if content is None or isinstance(content, str):
            text = content or ""
            converted.append({"role": msg.role, "content": [{"type": "text", "text": text}] if takes_parts else text})
            continue
        parts: list[dict[str, str]] = []
        for part in content:
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise EpdError.bad_request("text content part needs a string 'text'", param="messages")
                parts.append({"type": "text", "text": part["text"]})
            elif kind in MEDIA_PARTS:
                modality, key = MEDIA_PARTS[kind]
                media.append(MediaRef(modality, _media_url(part, key)))
                parts.append({"type": modality})
            else:
                raise EpdError.bad_request(f"unsupported content part type {kind!r}", param="messages")
        if takes_parts:
            converted.append({"role": msg.role, "content": parts})
            continue
        if any(p["type"] != "text" for p in parts):
            raise EpdError.bad_request("this model's chat template takes text only", param="messages")
        converted.append({"role": msg.role, "content": "".join(p["text"] for p in parts)})
    return converted, media


def attach_uuids(media: list[MediaRef], uuids: dict[str, list[str | None]] | None) -> list[MediaRef]:
    """Apply the client's `multi_modal_uuids` (per modality, in order) as cache keys."""
    if not uuids:
        return media
    seen: dict[str, int] = {}
    out = []
    for ref in media:
        i = seen.get(ref.modality, 0)
        seen[ref.modality] = i + 1
        ids = uuids.get(ref.modality) or []
        out.append(MediaRef(ref.modality, ref.url, ids[i] if i < len(ids) else None))
    return out
