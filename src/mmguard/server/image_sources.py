"""Image sources in requests resolved to encoded bytes: ``data:`` URLs, raw base64, and (only when enabled)
allowlisted http(s) URLs fetched with a size and a time limit. Untrusted strings never reach
:func:`mmguard.images.load_image` (which also reads local file paths)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

from ..images import ImageLimits
from .errors import APIError
from .request_limits import REQUEST_DEADLINE, request_timeout_error
from .settings import ServerSettings

__all__ = ["ImageFetcher", "decode_data_url", "image_error", "resolve_image"]

_DATA_HEAD_RE = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?$", re.I
)

_B64_CHARS_RE = re.compile(r"^[A-Za-z0-9+/=_-]+$")


def image_error(err: Exception, param: str | None) -> APIError:
    msg = str(err)
    code = "image_too_large" if ("limit" in msg or "larger than" in msg) else "invalid_image"
    return APIError(400, msg, param=param, code=code)


def _b64decode(payload: str, what: str, limits: ImageLimits, param: str | None) -> bytes:
    compact = "".join(payload.split())
    if len(compact) > limits.max_bytes * 4 // 3 + 8:
        raise APIError(
            400,
            f"{what} is larger than the limit of {limits.max_bytes} bytes",
            param=param,
            code="image_too_large",
        )
    if not compact or not _B64_CHARS_RE.match(compact):
        raise APIError(400, f"{what} is not valid base64", param=param, code="invalid_image_url")
    try:
        if "-" in compact or "_" in compact:
            data = base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4))
        else:
            data = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError) as err:
        raise APIError(
            400, f"{what} is not valid base64: {err}", param=param, code="invalid_image_url"
        ) from None
    if not data:
        raise APIError(400, f"{what} holds no data", param=param, code="invalid_image_url")
    return data


def decode_data_url(url: str, limits: ImageLimits, param: str | None = None) -> bytes:
    """``data:image/png;base64,...`` -> bytes, or a 400 naming what is wrong."""
    head, comma, payload = url.partition(",")
    if not comma or len(head) > 256:
        raise APIError(
            400,
            "malformed data URL: expected 'data:image/<type>;base64,<data>'",
            param=param,
            code="invalid_image_url",
        )
    m = _DATA_HEAD_RE.match(head.strip())
    if not m:
        raise APIError(400, f"malformed data URL header {head[:80]!r}", param=param, code="invalid_image_url")
    mime = (m.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise APIError(
            400, f"data URL has media type {mime!r}, expected image/*", param=param, code="invalid_image_url"
        )
    if not m.group("b64"):
        raise APIError(
            400, "data URL must be base64-encoded (';base64,')", param=param, code="invalid_image_url"
        )
    return _b64decode(payload, "data URL", limits, param)


class ImageFetcher:
    """Fetches allowlisted http(s) image URLs with a size and a time limit; no redirects."""

    def __init__(self, settings: ServerSettings) -> None:
        self.request_timeout = settings.request_timeout_s
        self.enabled = settings.remote_images
        self.hosts = tuple(h.strip().lower() for h in settings.remote_image_hosts if h.strip())
        self.timeout = settings.remote_image_timeout_s
        self.max_bytes = settings.max_image_bytes

    def allowed(self, url: str) -> bool:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if not host:
            return False
        netloc = f"{host}:{parts.port}" if parts.port else host
        for entry in self.hosts:
            if entry.startswith("*.") and (host.endswith(entry[1:]) and host != entry[2:]):
                return True
            if entry in (host, netloc):
                return True
        return False

    async def fetch(self, url: str, param: str | None) -> bytes:
        if not self.enabled:
            raise APIError(
                400,
                "remote image URLs are disabled on this server; send the image as a data URL",
                param=param,
                code="remote_images_disabled",
            )
        if not self.allowed(url):
            raise APIError(
                400,
                f"image host of {url[:200]!r} is not in the server's allowlist",
                param=param,
                code="image_host_not_allowed",
            )
        # one deadline for the whole fetch (connect and every read together: a host trickling a byte a second
        # must not hold the request), and never past the request's own deadline
        budget = self.timeout
        request_deadline = REQUEST_DEADLINE.get()
        by_request = False
        if request_deadline is not None and request_deadline - time.monotonic() < budget:
            budget, by_request = request_deadline - time.monotonic(), True
        if budget <= 0:
            raise request_timeout_error(self.request_timeout)
        try:
            return await asyncio.wait_for(self._get(url, param), budget)
        except asyncio.TimeoutError:
            if by_request:
                raise request_timeout_error(self.request_timeout) from None
            raise self._timed_out(param) from None

    def _timed_out(self, param: str | None) -> APIError:
        return APIError(400, f"fetching image URL timed out after {self.timeout:g}s", param=param,
                        code="image_fetch_timeout")

    async def _get(self, url: str, param: str | None) -> bytes:
        try:
            async with (
                # identity: a compressed body would be decoded a chunk at a time before the byte limit sees it
                # (a 64 KiB gzip chunk can hold 64 MiB); images are compressed already
                httpx.AsyncClient(follow_redirects=False, timeout=self.timeout, trust_env=False,
                                  headers={"accept-encoding": "identity"}) as client,
                client.stream("GET", url) as resp,
            ):
                if resp.status_code != 200:
                    raise APIError(
                        400,
                        f"fetching image URL failed: HTTP {resp.status_code}",
                        param=param,
                        code="image_fetch_failed",
                    )
                encoding = resp.headers.get("content-encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise APIError(
                        400,
                        f"the image host sent its image with content-encoding {encoding[:40]!r} although only "
                        "identity was accepted; serve it uncompressed",
                        param=param,
                        code="image_fetch_failed",
                    )
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    raise APIError(
                        400,
                        f"remote image has {declared} bytes, over the limit of {self.max_bytes}",
                        param=param,
                        code="image_too_large",
                    )
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.aiter_raw():  # the bytes as sent: identity, checked above
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise APIError(
                            400,
                            f"remote image is over the limit of {self.max_bytes} bytes",
                            param=param,
                            code="image_too_large",
                        )
                    chunks.append(chunk)
        except httpx.TimeoutException:
            raise self._timed_out(param) from None
        except httpx.HTTPError as err:
            raise APIError(
                400,
                f"fetching image URL failed: {type(err).__name__}",
                param=param,
                code="image_fetch_failed",
            ) from None
        return b"".join(chunks)


async def resolve_image(src: Any, param: str, limits: ImageLimits, fetcher: ImageFetcher) -> bytes:
    """Any accepted image reference -> encoded bytes (never a file path)."""
    if not isinstance(src, str):
        raise APIError(400, "image URL must be a string", param=param, code="invalid_image_url")
    text = src.strip()
    if not text:
        raise APIError(400, "image URL is empty", param=param, code="invalid_image_url")
    if text[:5].lower() == "data:":
        return decode_data_url(text, limits, param)
    if text[:7].lower() == "http://" or text[:8].lower() == "https://":
        return await fetcher.fetch(text, param)
    if "://" in text[:16]:
        raise APIError(
            400,
            f"unsupported image URL scheme in {text[:40]!r}; use a data URL",
            param=param,
            code="invalid_image_url",
        )
    if len(text) < 64:
        raise APIError(
            400,
            "image URL must be a data URL ('data:image/<type>;base64,<data>') or base64 data",
            param=param,
            code="invalid_image_url",
        )
    return _b64decode(text, "base64 image", limits, param)  # OpenAI also takes bare base64
