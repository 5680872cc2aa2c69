"""The request side of image input: what the engine does between a canonical ``ImageInput`` and
the ``PreparedImage`` it queues (models/images.py does the decoding itself).

- Bytes per request: every image's encoded size (judged from the base64 length before decoding,
  and each fetched URL's body) counts against ``--max-image-request-bytes`` (413 beyond it); each
  image also has its own limit.
- Decoded pixels: ``PixelBudget`` bounds the pixels that the decoding threads hold at once (the
  images' width × height, read from their headers before any pixel is decoded). An image waits for
  room until its request's deadline; an image larger than the whole budget is refused with 413.
- URLs: refused unless ``--image-url-hosts`` names the URL's host; then fetched with a time limit
  and the per-image byte limit, never through a proxy, following at most ``MAX_REDIRECTS``
  redirects and only to the same host (a redirect elsewhere is refused, not followed).

Every error names the problem and never carries the image's bytes, its base64 or the URL's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import urllib.parse
from collections.abc import Iterator

import httpx

from ..models.images import ImageInputError
from .canonical import ImageInput
from .errors import DeadlineExceeded, PayloadTooLarge, ValidationError

MAX_REDIRECTS = 3
_REDIRECTS = (301, 302, 303, 307, 308)


class PixelBudget:
    """Pixels being decoded right now, bounded (thread-safe: entered on the decoding threads)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_use = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, pixels: int, deadline: float) -> Iterator[None]:
        """Hold ``pixels`` of the budget for the ``with`` block; waits for room until ``deadline`` (a
        ``time.perf_counter()`` value): DeadlineExceeded then; PayloadTooLarge if ``pixels`` alone
        exceeds the limit."""
        if pixels > self.limit:
            raise PayloadTooLarge(
                f"an image of {pixels} pixels is more than the server decodes at once "
                f"({self.limit} pixels, --max-decoding-pixels)"
            )
        with self._cond:
            while self.in_use + pixels > self.limit:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    raise DeadlineExceeded("the request's deadline passed while its images waited to be decoded")
                self._cond.wait(remaining)
            self.in_use += pixels
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= pixels
                self._cond.notify_all()


def encoded_size(image: ImageInput) -> int:
    """Bytes the image will have once its base64 is decoded (its length for bytes; 0 for a URL,
    whose size is counted when it is fetched)."""
    if isinstance(image.data, bytes):
        return len(image.data)
    if image.is_url:
        return 0
    payload = image.data
    if payload[:5].lower() == "data:":
        payload = payload.partition(",")[2]
    return len(payload) * 3 // 4


class RequestBytes:
    """The encoded image bytes of one request, counted as they become known (base64 lengths first,
    then each fetched URL's body): PayloadTooLarge once they pass ``limit``."""

    def __init__(self, limit: int):
        self.limit = limit
        self.total = 0

    def add(self, size: int) -> None:
        self.total += size
        if self.total > self.limit:
            raise PayloadTooLarge(
                f"the request's images are more than the limit of {self.limit} bytes per request "
                "(--max-image-request-bytes)"
            )


def allowed_url(url: str, hosts: tuple[str, ...]) -> urllib.parse.SplitResult:
    """The parsed URL if it may be fetched: http(s), no credentials, a host (or host:port) that
    ``hosts`` names. ValidationError naming the reason otherwise (URLs are off when ``hosts`` is empty)."""
    if not hosts:
        raise ValidationError(
            "image URLs are not fetched by this server; send the image as base64 or a data:image/...;base64, URI "
            "(an operator can allow hosts with --image-url-hosts)"
        )
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValidationError("image URL is not a valid URL") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValidationError("image URL must be an http(s) URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValidationError("image URL must not carry credentials")
    host = parts.hostname.lower()
    if host not in hosts and (port is None or f"{host}:{port}" not in hosts):
        raise ValidationError(f"image URL host {host[:100]!r} is not one the server fetches from (--image-url-hosts)")
    return parts


async def fetch_image(url: str, hosts: tuple[str, ...], max_bytes: int, timeout_s: float) -> bytes:
    """The body of an allowed image URL (``allowed_url``): at most ``max_bytes``, within
    ``timeout_s`` in all; ValidationError for anything else (a failure status, a redirect to another
    host, too many redirects, too large, too slow, unreachable)."""
    first = allowed_url(url, hosts)
    origin = (first.scheme.lower(), first.hostname, first.port)
    try:
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=timeout_s) as client:
            async with asyncio.timeout(timeout_s):
                for _ in range(MAX_REDIRECTS + 1):
                    async with client.stream("GET", url) as response:
                        if response.status_code in _REDIRECTS:
                            target = urllib.parse.urljoin(url, response.headers.get("location", ""))
                            parts = urllib.parse.urlsplit(target)
                            if (parts.scheme.lower(), parts.hostname, parts.port) != origin:
                                raise ValidationError("image URL redirects to another host; redirects are followed "
                                                      "only within the same host")
                            url = target
                            continue
                        if response.status_code != 200:
                            raise ValidationError(f"image URL answered HTTP {response.status_code}")
                        declared = response.headers.get("content-length")
                        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                            raise ValidationError(f"image at the URL is {declared} bytes, more than the limit "
                                                  f"of {max_bytes}")
                        body = bytearray()
                        async for chunk in response.aiter_bytes():
                            body += chunk
                            if len(body) > max_bytes:
                                raise ValidationError(f"image at the URL is more than the limit of {max_bytes} bytes")
                        return bytes(body)
                raise ValidationError(f"image URL redirects more than {MAX_REDIRECTS} times")
    except TimeoutError:
        raise ValidationError(f"image URL took longer than {timeout_s:g}s to fetch (--image-url-timeout)") from None
    except httpx.TimeoutException:
        raise ValidationError(f"image URL took longer than {timeout_s:g}s to fetch (--image-url-timeout)") from None
    except httpx.HTTPError as exc:
        raise ValidationError(f"image URL could not be fetched ({type(exc).__name__})") from None


def image_error(index: int, exc: ImageInputError) -> ValidationError:
    """The 422 of an image that cannot be embedded, naming the input."""
    return ValidationError(f"input {index}: {exc}")
