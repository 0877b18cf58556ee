"""Resolve a media URL (http(s), data, file) to its bytes under the deployment's policy."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlparse

import httpx

from epdserve.config import MediaConfig
from epdserve.protocol.errors import EpdError

log = logging.getLogger(__name__)

MAX_MEDIA_BYTES = 64 << 20


class MediaFetcher:
    """Fetches media bytes; every failure is an `EpdError(400)` that names the URL."""

    def __init__(self, config: MediaConfig):
        self.config = config
        self._client = httpx.AsyncClient(follow_redirects=config.allow_redirects)

    async def close(self) -> None:
        await self._client.aclose()

    def _timeout(self, modality: str) -> float:
        c = self.config
        return {"video": c.video_fetch_timeout, "audio": c.audio_fetch_timeout}.get(modality, c.image_fetch_timeout)

    async def fetch(self, url: str, modality: str) -> bytes:
        scheme = urlparse(url).scheme.lower()
        if scheme == "data":
            return decode_data_url(url)
        if scheme in ("http", "https"):
            return await self._fetch_http(url, modality)
        if scheme == "file":
            return await asyncio.to_thread(self._read_local, url)
        raise EpdError.bad_request(
            f"unsupported media URL scheme {scheme!r} in {_short(url)}; use http(s)://, data: or an allowed file://"
        )

    async def _fetch_http(self, url: str, modality: str) -> bytes:
        host = urlparse(url).hostname or ""
        allowed = self.config.allowed_domains
        if allowed and host not in allowed:
            raise EpdError.bad_request(f"media domain {host!r} of {url} is not in --allowed-media-domains")
        try:
            async with self._client.stream("GET", url, timeout=self._timeout(modality)) as resp:
                if resp.status_code >= 400:
                    raise EpdError.bad_request(f"failed to fetch {url}: HTTP {resp.status_code}")
                chunks, size = [], 0
                async for chunk in resp.aiter_bytes():
                    size += len(chunk)
                    if size > MAX_MEDIA_BYTES:
                        raise EpdError.bad_request(f"media at {url} is larger than {MAX_MEDIA_BYTES} bytes")
                    chunks.append(chunk)
        except httpx.TimeoutException:
            raise EpdError.bad_request(f"failed to fetch {url}: timed out after {self._timeout(modality)} s") from None
        except httpx.HTTPError as exc:
            raise EpdError.bad_request(f"failed to fetch {url}: {exc.__class__.__name__}: {exc}") from exc
        return b"".join(chunks)

    def _read_local(self, url: str) -> bytes:
        root = self.config.allowed_local_path
        if not root:
            raise EpdError.bad_request(f"local media {url} needs --allowed-local-media-path")
        path = Path(unquote_to_bytes(urlparse(url).path).decode()).resolve()
        if not path.is_relative_to(Path(root).resolve()):
            raise EpdError.bad_request(f"local media {url} is outside --allowed-local-media-path")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise EpdError.bad_request(f"failed to read {url}: {exc.strerror}") from exc


def decode_data_url(url: str) -> bytes:
    """`data:[<mime>][;base64],<payload>` -> bytes."""
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise EpdError.bad_request(f"malformed data URL {_short(url)}: no ',' before the payload")
    if not header.endswith(";base64"):
        return unquote_to_bytes(payload)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EpdError.bad_request(f"invalid base64 in data URL {_short(url)}: {exc}") from exc


def _short(url: str) -> str:
    return url if len(url) <= 80 else url[:77] + "..."
