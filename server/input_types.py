"""What a request's declared use of its inputs means for a model: Cohere's ``input_type`` mapped onto
the prompt and task each model defines for it.

Cohere (``/v1/embed``, ``/v2/embed``, and as an extension on ``/v1/embeddings``) names four uses:
``search_query``, ``search_document``, ``classification``, ``clustering``. A model that embeds queries
and documents differently has its own names for them: e5's ``query: ``/``passage: `` prompts,
jina-embeddings-v5's ``query``/``document`` prompts and ``retrieval`` / ``classification`` /
``clustering`` adapters, jina-embeddings-v3's ``retrieval.query`` / ``retrieval.passage`` /
``classification`` / ``separation`` adapters. Each use takes the first of its candidates the model
has; a model with none of them embeds the text as it is (with its default prompt, if any).
"""

from __future__ import annotations

from .errors import ValidationError
from .info import ModelInfo

# input_type → (task candidates, prompt candidates), first match wins.
COHERE_INPUT_TYPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "search_query": (("retrieval.query", "retrieval"), ("query",)),
    "search_document": (("retrieval.passage", "retrieval"), ("passage", "document")),
    "classification": (("classification",), ("classification",)),
    "clustering": (("clustering", "separation"), ("clustering",)),
}


def cohere_input_type(model: ModelInfo, input_type: str) -> tuple[str | None, str | None]:
    """(task, prompt name) for Cohere's ``input_type`` on ``model``; None where the model has no such
    task or prompt (the request then gets the model's defaults). Unknown values are a 422."""
    try:
        tasks, prompts = COHERE_INPUT_TYPES[input_type]
    except KeyError:
        raise ValidationError(
            f"input_type must be one of {', '.join(COHERE_INPUT_TYPES)}, got {input_type!r}"
        ) from None
    task = next((t for t in tasks if t in model.tasks), None)
    prompt = next((p for p in prompts if p in model.prompts), None)
    return task, prompt
