"""Bounded JSON decoding of request bodies: every way a body can fail gets a defined 4xx.

``decode_body`` is what every HTTP dialect decodes with (through ``server/http.py::decode_json``):

1. **Shape bounds, before any decoder runs.** Nesting deeper than ``max_depth`` levels is refused
   with 400 and more than ``max_elements`` JSON values with 413, each message naming its limit. The
   C decoders recurse once per nesting level and raise ``RecursionError`` near Python's recursion
   limit (a 500 before this module), and every value costs a Python object, so both are bounded
   before they decode a byte. The scan is C-speed byte counting: first over the raw bytes, which
   over-counts (brackets and commas inside strings count too) and so can only clear a body; only a
   body the raw counts cannot clear is counted again with its strings blanked out (a split on
   quotes, or a regular expression when a quote is escaped), which gives the exact figures.
2. **Typed decoding** into the dialect's msgspec struct: malformed JSON (NaN / Infinity literals,
   invalid UTF-8 or control characters in a string, lone UTF-16 surrogate escapes, NUL bytes,
   trailing data) is 400; well-formed JSON of the wrong types, an unknown field of a struct that
   forbids them, or a number out of its field's range, is 422 (``ValidationError``). Typed decoding
   stops at the first wrong value, so a refused body is read once more untyped (and strictly, 3.):
   malformed JSON after an unknown field is still 400.
3. **A strict second reading** with the standard library's parser, which msgspec's typed decoding
   cannot replace: a key given twice in one object (msgspec keeps the last, so a proxy that
   checked the first would see another request than the server) is 400, and so is invalid UTF-8 in
   a field the struct does not know (msgspec skips such fields without validating their strings);
   an integer of more digits than Python converts (4,300) anywhere is 422.

Escaped NUL characters (``"\\u0000"``) are valid JSON text and pass as text; a raw NUL byte is
malformed JSON (400). Error messages name the limit or the problem and never echo request text,
except the repeated key's name (cut to ``KEY_ECHO_CHARS``), which the client wrote as a field name.

The limits in force for a request come from ``active_limits`` (``server/http.py::endpoint`` sets it
from the server's settings for the duration of each request), or are passed explicitly.
"""

from __future__ import annotations

import contextvars
import json
import re
import sys
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import numpy as np

from .errors import MalformedRequest, PayloadTooLarge, ValidationError

T = TypeVar("T")

# Our request bodies nest at most 4 levels ({"documents": [{"text": ...}]}, task_settings); 64 leaves
# room for any client's extras and stays far below the C decoders' recursion limit (~1000 frames,
# the request handler's own frames included).
DEFAULT_MAX_DEPTH = 64
# The largest legitimate body is /decode's id lists (2048 rows of up to 512 ids is 1.05M values;
# 8 MiB of JSON can hold at most ~4M); a million values is ~50-100 MB of Python objects at most.
DEFAULT_MAX_ELEMENTS = 1_000_000
# --json-max-depth may not go beyond this: deeper bodies would reach the decoders' recursion limit.
MAX_DEPTH_CEILING = 256
KEY_ECHO_CHARS = 64

# A JSON string: a quote, then runs of anything but quote and backslash, or escapes. Possessive, so
# an unterminated string fails in linear time. DOTALL: a raw newline in a string is still inside it.
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
_LONE_HIGH_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])")
_WHITESPACE = b" \t\r\n"
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
# Opening brackets → +1, closing → -1 (255 as int8), for the running nesting level.
_LEVEL_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_DEPTH_CHUNK = 1 << 20


@dataclass(frozen=True)
class JsonLimits:
    """Bounds on one request body's JSON: nesting levels and values (every string, number, literal,
    array and object, the top level included; an object member counts as its value)."""

    max_depth: int = DEFAULT_MAX_DEPTH
    max_elements: int = DEFAULT_MAX_ELEMENTS

    def __post_init__(self) -> None:
        if not 1 <= self.max_depth <= MAX_DEPTH_CEILING:
            raise ValueError(f"--json-max-depth must be between 1 and {MAX_DEPTH_CEILING}, got {self.max_depth}")
        if self.max_elements < 1:
            raise ValueError(f"--json-max-elements must be a positive number of values, got {self.max_elements}")


DEFAULT_LIMITS = JsonLimits()
active_limits: contextvars.ContextVar[JsonLimits] = contextvars.ContextVar("json_limits", default=DEFAULT_LIMITS)


def decode_body(body: bytes, struct: type[T], limits: JsonLimits | None = None) -> T:
    """``body`` decoded into ``struct`` within ``limits`` (default: ``active_limits``), or the
    ``InferenceError`` that says why not (400 malformed, 413 too many values, 422 wrong types)."""
    if not body.strip():
        raise MalformedRequest("request body is empty; expected a JSON object")
    check_shape(body, limits or active_limits.get())
    try:
        decoded = msgspec.json.decode(body, type=struct)
    except msgspec.ValidationError as exc:
        # Typed decoding stops at the first wrong value (an unknown field of a struct that forbids
        # them, a wrong type) without reading the rest: a body that is malformed as well is still a
        # 400, whatever struct it was meant for.
        try:
            msgspec.json.decode(body)
        except msgspec.ValidationError:
            pass  # well-formed (an integer past msgspec's range): check_strict names it
        except msgspec.DecodeError as malformed:
            raise _not_valid_json(body, malformed) from None
        check_strict(body)
        raise ValidationError(f"invalid request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise _not_valid_json(body, exc) from None
    check_strict(body)
    return decoded


def _not_valid_json(body: bytes, exc: msgspec.DecodeError) -> MalformedRequest:
    # msgspec calls a high surrogate escape without its low half "truncated" input: say what it is.
    detail = "a UTF-16 surrogate escape without its pair" if _LONE_HIGH_SURROGATE.search(body) else exc
    return MalformedRequest(f"request body is not valid JSON: {detail}")


def check_shape(body: bytes, limits: JsonLimits) -> None:
    """Refuse ``body`` if it nests deeper than ``limits.max_depth`` (400) or holds more than
    ``limits.max_elements`` values (413). Never decodes; invalid JSON is left to the decoder."""
    opens = body.count(b"[") + body.count(b"{")
    commas = body.count(b",")
    # Raw counts include brackets and commas inside strings, so they bound the real figures from above.
    if opens <= limits.max_depth and commas + opens + 1 <= limits.max_elements:
        return
    structure = _without_strings(body)
    opens = structure.count(b"[") + structure.count(b"{")
    if opens > limits.max_depth and _deeper_than(structure, limits.max_depth):
        raise MalformedRequest(
            f"request body nests JSON more than {limits.max_depth} levels deep, the limit (--json-max-depth)"
        )
    compact = structure.translate(None, _WHITESPACE)
    empty_containers = compact.count(b"[]") + compact.count(b"{}")
    # Values = separators + 1 (the top level) + containers holding at least one value.
    elements = compact.count(b",") + 1 + opens - empty_containers
    if elements > limits.max_elements:
        raise PayloadTooLarge(
            f"request body holds {elements} JSON values, more than the limit of {limits.max_elements} "
            "(--json-max-elements)"
        )


def check_strict(body: bytes) -> None:
    """What the typed decoding let through: a repeated key in any object, invalid UTF-8 in a field
    the struct skipped, an integer too long to convert. Call only after ``check_shape`` (the standard
    parser recurses per nesting level)."""
    try:
        text = body.decode("utf-8")  # strict: UTF-8-encoded surrogates are invalid too
    except UnicodeDecodeError as exc:
        raise MalformedRequest(f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        json.loads(text, object_pairs_hook=_unique_keys)
    except _RepeatedKey as exc:
        raise MalformedRequest(f"request body has the key {exc.key!r} twice in one JSON object") from None
    except json.JSONDecodeError as exc:  # msgspec accepted it: not expected, but a client's fault all the same
        raise MalformedRequest(f"request body is not valid JSON: {exc.msg} (character {exc.pos})") from None
    except ValueError:  # Python's limit on integer digits; the typed decoding refused everything else
        raise ValidationError(
            f"invalid request: an integer in the request body has more than {sys.get_int_max_str_digits()} digits"
        ) from None


class _RepeatedKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key[:KEY_ECHO_CHARS]


def _unique_keys(pairs: list[tuple[str, Any]]) -> None:
    # The decoded value is thrown away: only whether every object's keys are unique matters.
    if len(pairs) > 1 and len({key for key, _ in pairs}) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(key)
            seen.add(key)


def _without_strings(body: bytes) -> bytes:
    """``body`` with every string's content removed (``""`` stays); after an unterminated string,
    nothing (it is all string content, and the decoder will refuse the body)."""
    if b'\\"' not in body:
        # No quote is escaped, so every quote opens or closes a string: split on them (5x the regex).
        return b'""'.join(body.split(b'"')[::2])
    blanked = _STRING.sub(b'""', body)
    stray_quote = blanked.find(b'"', 0)
    while stray_quote != -1 and blanked[stray_quote:stray_quote + 2] == b'""':
        stray_quote = blanked.find(b'"', stray_quote + 2)
    return blanked if stray_quote == -1 else blanked[:stray_quote]


def _deeper_than(structure: bytes, max_depth: int) -> bool:
    """Whether the running bracket level of ``structure`` (no strings) ever exceeds ``max_depth``."""
    steps = np.frombuffer(structure.translate(None, _NOT_BRACKETS).translate(_LEVEL_STEPS), dtype=np.int8)
    level = 0
    for start in range(0, len(steps), _DEPTH_CHUNK):
        running = np.cumsum(steps[start:start + _DEPTH_CHUNK], dtype=np.int64) + level
        if running.max() > max_depth:
            return True
        level = int(running[-1])
    return False
