from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Lane(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LANE_UNSPECIFIED: _ClassVar[Lane]
    LANE_SEARCH: _ClassVar[Lane]
    LANE_INGEST: _ClassVar[Lane]
    LANE_BATCH: _ClassVar[Lane]

class TruncationDirection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRUNCATION_DIRECTION_UNSPECIFIED: _ClassVar[TruncationDirection]
    TRUNCATION_DIRECTION_RIGHT: _ClassVar[TruncationDirection]
    TRUNCATION_DIRECTION_LEFT: _ClassVar[TruncationDirection]

class VectorEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VECTOR_ENCODING_UNSPECIFIED: _ClassVar[VectorEncoding]
    VECTOR_ENCODING_FLOAT32: _ClassVar[VectorEncoding]
    VECTOR_ENCODING_FLOAT16: _ClassVar[VectorEncoding]
    VECTOR_ENCODING_BFLOAT16: _ClassVar[VectorEncoding]

class ModelTask(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_TASK_UNSPECIFIED: _ClassVar[ModelTask]
    MODEL_TASK_TEXT_EMBEDDING: _ClassVar[ModelTask]
    MODEL_TASK_SPARSE_EMBEDDING: _ClassVar[ModelTask]
    MODEL_TASK_RERANK: _ClassVar[ModelTask]
LANE_UNSPECIFIED: Lane
LANE_SEARCH: Lane
LANE_INGEST: Lane
LANE_BATCH: Lane
TRUNCATION_DIRECTION_UNSPECIFIED: TruncationDirection
TRUNCATION_DIRECTION_RIGHT: TruncationDirection
TRUNCATION_DIRECTION_LEFT: TruncationDirection
VECTOR_ENCODING_UNSPECIFIED: VectorEncoding
VECTOR_ENCODING_FLOAT32: VectorEncoding
VECTOR_ENCODING_FLOAT16: VectorEncoding
VECTOR_ENCODING_BFLOAT16: VectorEncoding
MODEL_TASK_UNSPECIFIED: ModelTask
MODEL_TASK_TEXT_EMBEDDING: ModelTask
MODEL_TASK_SPARSE_EMBEDDING: ModelTask
MODEL_TASK_RERANK: ModelTask

class ResponseMetadata(_message.Message):
    __slots__ = ("input_tokens", "input_chars", "lane", "tokenization_time_ns", "queue_time_ns", "inference_time_ns", "total_time_ns")
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INPUT_CHARS_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZATION_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    input_chars: int
    lane: Lane
    tokenization_time_ns: int
    queue_time_ns: int
    inference_time_ns: int
    total_time_ns: int
    def __init__(self, input_tokens: _Optional[int] = ..., input_chars: _Optional[int] = ..., lane: _Optional[_Union[Lane, str]] = ..., tokenization_time_ns: _Optional[int] = ..., queue_time_ns: _Optional[int] = ..., inference_time_ns: _Optional[int] = ..., total_time_ns: _Optional[int] = ...) -> None: ...

class DenseVectors(_message.Message):
    __slots__ = ("count", "dimensions", "encoding", "data")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    count: int
    dimensions: int
    encoding: VectorEncoding
    data: bytes
    def __init__(self, count: _Optional[int] = ..., dimensions: _Optional[int] = ..., encoding: _Optional[_Union[VectorEncoding, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class EmbedInput(_message.Message):
    __slots__ = ("text", "image")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: bytes
    def __init__(self, text: _Optional[str] = ..., image: _Optional[bytes] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("inputs", "model", "lane", "timeout_ms", "normalize", "truncate", "truncation_direction", "dimensions", "prompt_name", "task", "encoding", "items")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_DIRECTION_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_NAME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedScalarFieldContainer[str]
    model: str
    lane: Lane
    timeout_ms: int
    normalize: bool
    truncate: bool
    truncation_direction: TruncationDirection
    dimensions: int
    prompt_name: str
    task: str
    encoding: VectorEncoding
    items: _containers.RepeatedCompositeFieldContainer[EmbedInput]
    def __init__(self, inputs: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., lane: _Optional[_Union[Lane, str]] = ..., timeout_ms: _Optional[int] = ..., normalize: _Optional[bool] = ..., truncate: _Optional[bool] = ..., truncation_direction: _Optional[_Union[TruncationDirection, str]] = ..., dimensions: _Optional[int] = ..., prompt_name: _Optional[str] = ..., task: _Optional[str] = ..., encoding: _Optional[_Union[VectorEncoding, str]] = ..., items: _Optional[_Iterable[_Union[EmbedInput, _Mapping]]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("model", "embeddings", "truncated", "metadata")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    model: str
    embeddings: DenseVectors
    truncated: _containers.RepeatedScalarFieldContainer[bool]
    metadata: ResponseMetadata
    def __init__(self, model: _Optional[str] = ..., embeddings: _Optional[_Union[DenseVectors, _Mapping]] = ..., truncated: _Optional[_Iterable[bool]] = ..., metadata: _Optional[_Union[ResponseMetadata, _Mapping]] = ...) -> None: ...

class EmbedSparseRequest(_message.Message):
    __slots__ = ("inputs", "model", "lane", "timeout_ms", "truncate", "truncation_direction", "top_k", "min_weight", "return_tokens")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_DIRECTION_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    RETURN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedScalarFieldContainer[str]
    model: str
    lane: Lane
    timeout_ms: int
    truncate: bool
    truncation_direction: TruncationDirection
    top_k: int
    min_weight: float
    return_tokens: bool
    def __init__(self, inputs: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., lane: _Optional[_Union[Lane, str]] = ..., timeout_ms: _Optional[int] = ..., truncate: _Optional[bool] = ..., truncation_direction: _Optional[_Union[TruncationDirection, str]] = ..., top_k: _Optional[int] = ..., min_weight: _Optional[float] = ..., return_tokens: _Optional[bool] = ...) -> None: ...

class SparseVector(_message.Message):
    __slots__ = ("ids", "weights", "tokens")
    IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    weights: _containers.RepeatedScalarFieldContainer[float]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., weights: _Optional[_Iterable[float]] = ..., tokens: _Optional[_Iterable[str]] = ...) -> None: ...

class EmbedSparseResponse(_message.Message):
    __slots__ = ("model", "embeddings", "truncated", "metadata")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    model: str
    embeddings: _containers.RepeatedCompositeFieldContainer[SparseVector]
    truncated: _containers.RepeatedScalarFieldContainer[bool]
    metadata: ResponseMetadata
    def __init__(self, model: _Optional[str] = ..., embeddings: _Optional[_Iterable[_Union[SparseVector, _Mapping]]] = ..., truncated: _Optional[_Iterable[bool]] = ..., metadata: _Optional[_Union[ResponseMetadata, _Mapping]] = ...) -> None: ...

class RerankRequest(_message.Message):
    __slots__ = ("query", "documents", "model", "lane", "timeout_ms", "top_n", "raw_scores", "truncate", "return_documents")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    RAW_SCORES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    RETURN_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    query: str
    documents: _containers.RepeatedScalarFieldContainer[str]
    model: str
    lane: Lane
    timeout_ms: int
    top_n: int
    raw_scores: bool
    truncate: bool
    return_documents: bool
    def __init__(self, query: _Optional[str] = ..., documents: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., lane: _Optional[_Union[Lane, str]] = ..., timeout_ms: _Optional[int] = ..., top_n: _Optional[int] = ..., raw_scores: _Optional[bool] = ..., truncate: _Optional[bool] = ..., return_documents: _Optional[bool] = ...) -> None: ...

class RankedDocument(_message.Message):
    __slots__ = ("index", "score", "truncated", "document")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    index: int
    score: float
    truncated: bool
    document: str
    def __init__(self, index: _Optional[int] = ..., score: _Optional[float] = ..., truncated: _Optional[bool] = ..., document: _Optional[str] = ...) -> None: ...

class RerankResponse(_message.Message):
    __slots__ = ("model", "results", "metadata")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    model: str
    results: _containers.RepeatedCompositeFieldContainer[RankedDocument]
    metadata: ResponseMetadata
    def __init__(self, model: _Optional[str] = ..., results: _Optional[_Iterable[_Union[RankedDocument, _Mapping]]] = ..., metadata: _Optional[_Union[ResponseMetadata, _Mapping]] = ...) -> None: ...

class RequestError(_message.Message):
    __slots__ = ("code", "message", "retry_after_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    retry_after_ms: int
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class EmbedStreamResponse(_message.Message):
    __slots__ = ("response", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: EmbedResponse
    error: RequestError
    def __init__(self, response: _Optional[_Union[EmbedResponse, _Mapping]] = ..., error: _Optional[_Union[RequestError, _Mapping]] = ...) -> None: ...

class EmbedSparseStreamResponse(_message.Message):
    __slots__ = ("response", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: EmbedSparseResponse
    error: RequestError
    def __init__(self, response: _Optional[_Union[EmbedSparseResponse, _Mapping]] = ..., error: _Optional[_Union[RequestError, _Mapping]] = ...) -> None: ...

class RerankStreamResponse(_message.Message):
    __slots__ = ("response", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: RerankResponse
    error: RequestError
    def __init__(self, response: _Optional[_Union[RerankResponse, _Mapping]] = ..., error: _Optional[_Union[RequestError, _Mapping]] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("inputs", "model", "add_special_tokens", "prompt_name")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADD_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_NAME_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedScalarFieldContainer[str]
    model: str
    add_special_tokens: bool
    prompt_name: str
    def __init__(self, inputs: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., add_special_tokens: _Optional[bool] = ..., prompt_name: _Optional[str] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("id", "text", "special", "start", "stop")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    special: bool
    start: int
    stop: int
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., special: _Optional[bool] = ..., start: _Optional[int] = ..., stop: _Optional[int] = ...) -> None: ...

class TokenizedInput(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    def __init__(self, tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("model", "inputs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: _containers.RepeatedCompositeFieldContainer[TokenizedInput]
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TokenizedInput, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("inputs", "model", "skip_special_tokens")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[TokenIds]
    model: str
    skip_special_tokens: bool
    def __init__(self, inputs: _Optional[_Iterable[_Union[TokenIds, _Mapping]]] = ..., model: _Optional[str] = ..., skip_special_tokens: _Optional[bool] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("texts",)
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Optional[_Iterable[str]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_client_batch_size", "max_concurrent_requests", "max_stream_in_flight", "max_receive_message_bytes", "auto_truncate", "default_timeout_ms")
    MAX_CLIENT_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAM_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_RECEIVE_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    AUTO_TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    max_client_batch_size: int
    max_concurrent_requests: int
    max_stream_in_flight: int
    max_receive_message_bytes: int
    auto_truncate: bool
    default_timeout_ms: int
    def __init__(self, max_client_batch_size: _Optional[int] = ..., max_concurrent_requests: _Optional[int] = ..., max_stream_in_flight: _Optional[int] = ..., max_receive_message_bytes: _Optional[int] = ..., auto_truncate: _Optional[bool] = ..., default_timeout_ms: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("id", "task", "is_default", "family", "description", "dimensions", "matryoshka_dimensions", "max_input_tokens", "pooling", "prompts", "default_prompt_name", "tasks", "default_task", "end_of_life_date", "max_batch_tokens", "dtype", "device", "reranker_kind", "embedding_model", "max_query_tokens", "rerank_windows", "image_input", "image_tokens")
    class PromptsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    MATRYOSHKA_DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PROMPT_NAME_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TASK_FIELD_NUMBER: _ClassVar[int]
    END_OF_LIFE_DATE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    RERANKER_KIND_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RERANK_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_INPUT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    id: str
    task: ModelTask
    is_default: bool
    family: str
    description: str
    dimensions: int
    matryoshka_dimensions: _containers.RepeatedScalarFieldContainer[int]
    max_input_tokens: int
    pooling: str
    prompts: _containers.ScalarMap[str, str]
    default_prompt_name: str
    tasks: _containers.RepeatedScalarFieldContainer[str]
    default_task: str
    end_of_life_date: str
    max_batch_tokens: int
    dtype: str
    device: str
    reranker_kind: str
    embedding_model: str
    max_query_tokens: int
    rerank_windows: bool
    image_input: bool
    image_tokens: int
    def __init__(self, id: _Optional[str] = ..., task: _Optional[_Union[ModelTask, str]] = ..., is_default: _Optional[bool] = ..., family: _Optional[str] = ..., description: _Optional[str] = ..., dimensions: _Optional[int] = ..., matryoshka_dimensions: _Optional[_Iterable[int]] = ..., max_input_tokens: _Optional[int] = ..., pooling: _Optional[str] = ..., prompts: _Optional[_Mapping[str, str]] = ..., default_prompt_name: _Optional[str] = ..., tasks: _Optional[_Iterable[str]] = ..., default_task: _Optional[str] = ..., end_of_life_date: _Optional[str] = ..., max_batch_tokens: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., reranker_kind: _Optional[str] = ..., embedding_model: _Optional[str] = ..., max_query_tokens: _Optional[int] = ..., rerank_windows: _Optional[bool] = ..., image_input: _Optional[bool] = ..., image_tokens: _Optional[int] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("version", "limits", "models")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    version: str
    limits: ServerLimits
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, version: _Optional[str] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: ModelTask
    def __init__(self, task: _Optional[_Union[ModelTask, str]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
