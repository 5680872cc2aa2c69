"""Request checks that run before any work is queued, and the resolution of a request's prompt and
task against its model. Every problem is a 4xx naming it (``ValidationError`` 422,
``PayloadTooLarge`` 413); none of these functions touches a tokenizer or a tensor."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .canonical import EmbedInput, EmbedRequest, ImageInput, InputGroup, RerankRequest, SparseEmbedRequest
from .errors import PayloadTooLarge, ValidationError
from .scheduler import LANES

if TYPE_CHECKING:
    from ..models.loader import ServedModel


def check_batch_size(inputs: list, count: int, max_client_batch_size: int) -> None:
    """Some inputs, and at most ``max_client_batch_size`` of them (``count``: the inputs that compute)."""
    if not inputs:
        raise ValidationError("inputs must not be empty")
    if count > max_client_batch_size:
        raise PayloadTooLarge(
            f"batch size {count} is larger than the maximum of {max_client_batch_size} inputs per request "
            "(--max-client-batch-size)"
        )


def check_inputs(inputs: list[str] | list[list[int]], max_client_batch_size: int) -> None:
    """Texts, or rows of token ids: not none, not too many, none empty."""
    check_batch_size(inputs, len(inputs), max_client_batch_size)
    for i, text in enumerate(inputs):
        if not text:
            raise ValidationError(f"input {i} is empty")


def check_embed_inputs(inputs: list[EmbedInput], flat: list[str | ImageInput], max_client_batch_size: int) -> None:
    """``check_inputs`` for an embedding request that may hold images and groups: the texts and images
    of all groups together count against the batch size; no empty text, image or group."""
    check_batch_size(inputs, len(flat), max_client_batch_size)
    for i, item in enumerate(inputs):
        members = item.items if isinstance(item, InputGroup) else (item,)
        if not members:
            raise ValidationError(f"input {i} is an empty group")
        for member in members:
            if isinstance(member, ImageInput):
                if not member.data:
                    raise ValidationError(f"input {i} is an empty image")
            elif not member:
                raise ValidationError(f"input {i} is empty")


def check_rerank_request(request: RerankRequest, max_client_batch_size: int) -> None:
    if not request.query:
        raise ValidationError("query must not be empty")
    if not request.documents:
        raise ValidationError("documents must not be empty")
    if len(request.documents) > max_client_batch_size:
        raise PayloadTooLarge(
            f"{len(request.documents)} documents is more than the maximum of {max_client_batch_size} per request "
            "(--max-client-batch-size)"
        )
    for i, text in enumerate(request.documents):
        if not text:
            raise ValidationError(f"document {i} is empty")
    if request.top_n is not None and request.top_n < 1:
        raise ValidationError(f"top_n must be a positive number of documents, got {request.top_n}")


def check_dimensions(request: EmbedRequest, model: ServedModel) -> None:
    if request.dimensions is not None and not 0 < request.dimensions <= model.dimensions:
        raise ValidationError(
            f"dimensions must be between 1 and {model.dimensions} for model {model.id!r}, got {request.dimensions}"
        )


def check_sparse_options(request: SparseEmbedRequest) -> None:
    if request.top_k is not None and request.top_k < 1:
        raise ValidationError(f"top_k must be a positive number of terms, got {request.top_k}")
    if not request.min_weight >= 0:  # also refuses NaN
        raise ValidationError(f"min_weight must be a non-negative number, got {request.min_weight}")


def check_priority(priority: str | None) -> None:
    if priority is not None and priority not in LANES:
        raise ValidationError(f"priority must be one of {', '.join(LANES)}, got {priority!r}")


def request_deadline(timeout_s: float | None, default_timeout_s: float, started: float) -> float:
    """The request's deadline (a ``time.perf_counter()`` value): ``started`` plus its own timeout, or
    the server's default."""
    if timeout_s is None:
        timeout_s = default_timeout_s
    elif not timeout_s > 0:
        raise ValidationError(f"the request timeout must be a positive number of seconds, got {timeout_s}")
    return started + timeout_s


def resolve_prompt(model: ServedModel, prompt_name: str | None) -> tuple[str | None, str]:
    """(the prompt's name, its text) — the request's prompt, else the model's default; (None, "")
    when neither names one."""
    name = prompt_name if prompt_name is not None else model.default_prompt_name
    if name is None:
        return None, ""
    try:
        return name, model.prompts[name]
    except KeyError:
        available = sorted(model.prompts) or "none"
        raise ValidationError(
            f"prompt_name {name!r} is not defined for model {model.id!r} (prompts: {available})"
        ) from None


def resolve_task(model: ServedModel, task: str | None) -> tuple[str | None, str]:
    """(the task, its instruction prefix) for multi-task models; (None, "") otherwise."""
    if task is None:
        task = model.default_task
        if task is None:
            return None, ""
    if task not in model.tasks:
        known = ", ".join(sorted(model.tasks)) or "none: this model has no tasks"
        raise ValidationError(f"task {task!r} is not a task of model {model.id!r} (tasks: {known})")
    return task, model.tasks[task]
