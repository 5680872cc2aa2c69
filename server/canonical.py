"""The one internal request/result shape every dialect parses into and formats from.

Dialect adapters (native/TEI, OpenAI, ...) never talk to the engine in their own terms: they build
these objects, and the engine has no idea which wire format a request came in on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ValidationError


@dataclass(frozen=True, slots=True)
class ImageInput:
    """An image to embed: its encoded bytes (PNG, JPEG, WebP or GIF), or as text bare base64, a
    ``data:image/...;base64,`` URI, or an ``http(s)://`` URL (fetched only from the hosts the server
    allows, ``--image-url-hosts``). Its repr never shows the data (it may reach a log line)."""

    data: bytes | str

    def __repr__(self) -> str:
        kind = "bytes" if isinstance(self.data, bytes) else "characters"
        return f"ImageInput(<{len(self.data)} {kind}>)"

    @property
    def is_url(self) -> bool:
        return isinstance(self.data, str) and self.data[:8].lower().startswith(("http://", "https://"))


@dataclass(frozen=True, slots=True)
class InputGroup:
    """Several inputs (texts and images) that make ONE vector, as Elasticsearch's multimodal
    ``embedding`` task sends them (a ``content`` list). A group of one item is that item's vector;
    with several items, each item's L2-normalised vector is computed (same dimensions), their mean
    taken, and the mean normalised when the request normalises (``EmbedRequest.normalize``): every
    item weighs the same, whatever its modality or length."""

    items: tuple[str | ImageInput, ...]


# One input of an embedding request: a text, an image, or a group of them making one vector.
EmbedInput = str | ImageInput | InputGroup


@dataclass(frozen=True)
class EmbedRequest:
    """Texts and images (``ImageInput``) in any order, one vector each, in that order; images only
    for models that take them (``ModelInfo.image_input``)."""

    inputs: list[EmbedInput]
    model: str | None = None
    normalize: bool = True
    truncate: bool | None = None  # None: the server's --auto-truncate setting
    truncate_left: bool = False
    prompt_name: str | None = None
    dimensions: int | None = None
    # Task of multi-task models (jina-embeddings-v3: retrieval.query, retrieval.passage, ...):
    # picks the task's adapter and instruction; None: the model's default task.
    task: str | None = None
    # Token ids in the model's own vocabulary instead of text (OpenAI's token-array input, as TEI and
    # vLLM take it): each row is the model's whole input as given, special tokens included; no prompt
    # or task instruction is added. ``inputs`` is then empty.
    input_ids: list[list[int]] | None = None
    # Every token's last hidden state instead of one pooled vector (TEI's /embed_all): ``vectors``
    # then holds [tokens, hidden] arrays; normalize and dimensions do not apply.
    per_token: bool = False
    # Scheduling: lane ("search" | "ingest" | "batch"; None picks one from the request's size)
    # and how long the client waits, in seconds (None: the server's --request-timeout).
    priority: str | None = None
    timeout_s: float | None = None


@dataclass(frozen=True)
class SparseEmbedRequest:
    """Learned sparse expansion. Terms with weight <= ``min_weight`` are dropped, then the
    ``top_k`` heaviest kept (None: every positive term)."""

    inputs: list[str]
    model: str | None = None
    truncate: bool | None = None
    truncate_left: bool = False
    top_k: int | None = None
    min_weight: float = 0.0
    priority: str | None = None
    timeout_s: float | None = None
    # Also spell each term as a token (``EmbedResult.terms``), for dialects that answer tokens.
    return_terms: bool = False


@dataclass(frozen=True)
class RerankRequest:
    """Score ``documents`` against ``query``; sigmoid of the cross-encoder's logit unless
    ``raw_scores`` (a listwise model's cosine either way). ``truncate`` None: the model's default
    (windows for models that use them; cuts at a listwise model's caps)."""

    query: str
    documents: list[str]
    model: str | None = None
    top_n: int | None = None
    raw_scores: bool = False
    truncate: bool | None = None
    priority: str | None = None
    timeout_s: float | None = None


@dataclass(frozen=True)
class PredictRequest:
    """A cross-encoder as a sequence classifier (TEI's /predict): one logit per input, each input a
    text or a (text, text_pair) pair laid out by the model's pair template. Cut to the model's limit
    when ``truncate`` (None: the server's --auto-truncate), else a 413."""

    inputs: list[str | tuple[str, str]]
    model: str | None = None
    truncate: bool | None = None
    priority: str | None = None
    timeout_s: float | None = None


@dataclass
class Timings:
    """Seconds spent per stage for one request (the slowest input counts for queue/inference)."""

    tokenization_s: float = 0.0
    queue_s: float = 0.0
    inference_s: float = 0.0
    total_s: float = 0.0


@dataclass
class EmbedResult:
    """Dense vectors (float32 arrays), or for sparse requests ``SparseVector``s (``ids`` and
    ``weights`` arrays, heaviest first) and, when the request asked for them, ``terms``: each
    vector's tokens in ``ids`` order, spelled by ``spell_token``."""

    model: str
    vectors: list[Any]
    input_tokens: int
    input_chars: int
    truncated: list[bool]
    lane: str = "ingest"
    timings: Timings = field(default_factory=Timings)
    terms: list[list[str]] | None = None

    def term_weights(self) -> list[dict[str, float]]:
        """{token: weight} per sparse vector, heaviest first (needs ``return_terms``)."""
        if self.terms is None:
            raise ValueError("the request did not ask for terms (SparseEmbedRequest.return_terms)")
        return [dict(zip(tokens, vector.weights.tolist())) for tokens, vector in zip(self.terms, self.vectors)]


def spell_token(token: str) -> str:
    """A vocabulary entry as every dialect answers it: as Elasticsearch stores it, the WordPiece
    string with each "." written "__" (a dot would be a field path separator in a sparse_vector
    field). The one spelling rule of sparse terms."""
    return token.replace(".", "__")


def as_list(inputs: str | list[str]) -> list[str]:
    """One input or a list of them, as a list: the ``"input": "text" | ["text", ...]`` of most dialects."""
    return [inputs] if isinstance(inputs, str) else inputs


def text_or_image(value: object, where: str) -> str | ImageInput:
    """One input as Jina's API and the native API spell it: a string (text), ``{"text": "..."}`` or
    ``{"image": "<base64 | data URI | URL>"}``; ValidationError naming ``where`` otherwise."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and len(value) == 1:
        (key, item), = value.items()
        if key == "text" and isinstance(item, str):
            return item
        if key == "image" and isinstance(item, str):
            return ImageInput(item)
    raise ValidationError(
        f'{where} must be a string, {{"text": "..."}} or {{"image": "<base64, data URI or URL>"}}'
    )


# Elasticsearch's InferenceString types and formats (server/.../inference/DataType, DataFormat).
_CONTENT_FORMATS = {"text": ("text",), "image": ("base64",)}
_DEFAULT_FORMAT = {"text": "text", "image": "base64"}


def content_groups(inputs: object, where: str = "input") -> list[EmbedInput]:
    """The ``input`` of Elasticsearch's multimodal ``embedding`` task (``EmbeddingRequest`` /
    ``InferenceStringGroup``), which both its inference API and the EIS ``/api/v1/embed/dense``
    route take: a string, a group ``{"content": item | [item, ...]}``, or a list of those; an item is
    ``{"type": "text" | "image", "format"?: "text" | "base64", "value": str}`` (format defaults by
    type). One group is one vector: a one-item group becomes that item, a larger one an
    ``InputGroup``. ValidationError naming the first bad entry; types other than text and image
    (audio, video, pdf) are refused."""
    values = inputs if isinstance(inputs, list) else [inputs]
    out: list[EmbedInput] = []
    for i, value in enumerate(values):
        at = f"{where}[{i}]" if isinstance(inputs, list) else where
        if isinstance(value, str):
            out.append(value)
            continue
        if not isinstance(value, dict) or "content" not in value:
            raise ValidationError(f'{at} must be a string or an object {{"content": ...}}')
        unknown = sorted(set(value) - {"content"})
        if unknown:
            raise ValidationError(f"{at} has unknown fields {unknown}")
        content = value["content"]
        items = content if isinstance(content, list) else [content]
        if not items:
            raise ValidationError(f"{at}.content must not be an empty array")
        parsed = tuple(_content_item(item, f"{at}.content[{j}]") for j, item in enumerate(items))
        out.append(parsed[0] if len(parsed) == 1 else InputGroup(parsed))
    return out


def _content_item(item: object, at: str) -> str | ImageInput:
    if not isinstance(item, dict) or not isinstance(item.get("type"), str) or not isinstance(item.get("value"), str):
        raise ValidationError(f'{at} must be an object {{"type", "format"?, "value"}} with string values')
    unknown = sorted(set(item) - {"type", "format", "value"})
    if unknown:
        raise ValidationError(f"{at} has unknown fields {unknown}")
    kind = item["type"].lower()
    if kind not in _CONTENT_FORMATS:
        raise ValidationError(f"{at}: input type [{item['type'][:32]}] is not supported here (text, image)")
    data_format = item.get("format", _DEFAULT_FORMAT[kind])
    if not isinstance(data_format, str) or data_format.lower() not in _CONTENT_FORMATS[kind]:
        raise ValidationError(
            f"{at}: format [{str(data_format)[:32]}] is not valid for type [{kind}] "
            f"(expected {', '.join(_CONTENT_FORMATS[kind])})"
        )
    return item["value"] if kind == "text" else ImageInput(item["value"])


@dataclass(frozen=True)
class TokenizeRequest:
    inputs: list[str]
    model: str | None = None
    add_special_tokens: bool = True
    prompt_name: str | None = None


@dataclass(frozen=True)
class DecodeRequest:
    ids: list[list[int]]
    model: str | None = None
    skip_special_tokens: bool = True


@dataclass(frozen=True, slots=True)
class Ranked:
    index: int
    score: float


@dataclass
class RerankResult:
    """Documents by descending score (cut to ``top_n``); ``truncated`` per document."""

    model: str
    ranked: list[Ranked]
    input_tokens: int
    input_chars: int
    truncated: list[bool]
    lane: str = "search"
    timings: Timings = field(default_factory=Timings)
