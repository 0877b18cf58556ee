from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Error(_message.Message):
    __slots__ = ("code", "type", "message", "param")
    CODE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PARAM_FIELD_NUMBER: _ClassVar[int]
    code: int
    type: str
    message: str
    param: str
    def __init__(self, code: _Optional[int] = ..., type: _Optional[str] = ..., message: _Optional[str] = ..., param: _Optional[str] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("ack", "data", "heartbeat", "end", "error")
    ACK_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ack: bool
    data: bytes
    heartbeat: bool
    end: bool
    error: Error
    def __init__(self, ack: _Optional[bool] = ..., data: _Optional[bytes] = ..., heartbeat: _Optional[bool] = ..., end: _Optional[bool] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class ProcessorRequest(_message.Message):
    __slots__ = ("request_id", "endpoint", "body")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    endpoint: str
    body: bytes
    def __init__(self, request_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., body: _Optional[bytes] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("index", "text", "finish_reason", "usage", "token_ids", "prompt_token_ids", "logprobs")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    finish_reason: str
    usage: Usage
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[Logprob]
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., token_ids: _Optional[_Iterable[int]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[_Union[Logprob, _Mapping]]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed", "max_tokens", "stop_token_ids", "repetition_penalty", "presence_penalty", "frequency_penalty", "logprobs", "n")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    max_tokens: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    logprobs: int
    n: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., max_tokens: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., repetition_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., logprobs: _Optional[int] = ..., n: _Optional[int] = ...) -> None: ...

class Logprob(_message.Message):
    __slots__ = ("token_id", "token", "logprob", "top")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token: str
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[Logprob]
    def __init__(self, token_id: _Optional[int] = ..., token: _Optional[str] = ..., logprob: _Optional[float] = ..., top: _Optional[_Iterable[_Union[Logprob, _Mapping]]] = ...) -> None: ...

class MediaItem(_message.Message):
    __slots__ = ("modality", "hash", "offset", "length", "data", "embedding", "in_ec_storage", "embed_mask", "grid", "mm_kwargs")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    IN_EC_STORAGE_FIELD_NUMBER: _ClassVar[int]
    EMBED_MASK_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    MM_KWARGS_FIELD_NUMBER: _ClassVar[int]
    modality: str
    hash: str
    offset: int
    length: int
    data: bytes
    embedding: RemoteTensor
    in_ec_storage: bool
    embed_mask: bytes
    grid: _containers.RepeatedScalarFieldContainer[int]
    mm_kwargs: str
    def __init__(self, modality: _Optional[str] = ..., hash: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., data: _Optional[bytes] = ..., embedding: _Optional[_Union[RemoteTensor, _Mapping]] = ..., in_ec_storage: _Optional[bool] = ..., embed_mask: _Optional[bytes] = ..., grid: _Optional[_Iterable[int]] = ..., mm_kwargs: _Optional[str] = ...) -> None: ...

class RemoteTensor(_message.Message):
    __slots__ = ("addr", "nbytes", "dtype", "shape")
    ADDR_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    addr: int
    nbytes: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, addr: _Optional[int] = ..., nbytes: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class EmbeddingHandoff(_message.Message):
    __slots__ = ("agent", "agent_metadata", "notif", "mem_type", "device_id")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    AGENT_METADATA_FIELD_NUMBER: _ClassVar[int]
    NOTIF_FIELD_NUMBER: _ClassVar[int]
    MEM_TYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    agent: str
    agent_metadata: bytes
    notif: bytes
    mem_type: str
    device_id: int
    def __init__(self, agent: _Optional[str] = ..., agent_metadata: _Optional[bytes] = ..., notif: _Optional[bytes] = ..., mem_type: _Optional[str] = ..., device_id: _Optional[int] = ...) -> None: ...

class KVLayout(_message.Message):
    __slots__ = ("base", "num_layers", "num_blocks", "block_bytes")
    BASE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    base: int
    num_layers: int
    num_blocks: int
    block_bytes: int
    def __init__(self, base: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_blocks: _Optional[int] = ..., block_bytes: _Optional[int] = ...) -> None: ...

class KVHandoff(_message.Message):
    __slots__ = ("holder", "layout", "blocks", "first_token", "hold_ms", "rope_delta")
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HOLD_MS_FIELD_NUMBER: _ClassVar[int]
    ROPE_DELTA_FIELD_NUMBER: _ClassVar[int]
    holder: EmbeddingHandoff
    layout: KVLayout
    blocks: _containers.RepeatedScalarFieldContainer[int]
    first_token: int
    hold_ms: int
    rope_delta: int
    def __init__(self, holder: _Optional[_Union[EmbeddingHandoff, _Mapping]] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., blocks: _Optional[_Iterable[int]] = ..., first_token: _Optional[int] = ..., hold_ms: _Optional[int] = ..., rope_delta: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "token_ids", "sampling", "media", "handoff", "kv", "media_mailbox_key")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    MEDIA_MAILBOX_KEY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    media: _containers.RepeatedCompositeFieldContainer[MediaItem]
    handoff: EmbeddingHandoff
    kv: KVHandoff
    media_mailbox_key: str
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., media: _Optional[_Iterable[_Union[MediaItem, _Mapping]]] = ..., handoff: _Optional[_Union[EmbeddingHandoff, _Mapping]] = ..., kv: _Optional[_Union[KVHandoff, _Mapping]] = ..., media_mailbox_key: _Optional[str] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("request_id", "media", "deliver_to")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    DELIVER_TO_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    media: _containers.RepeatedCompositeFieldContainer[MediaItem]
    deliver_to: str
    def __init__(self, request_id: _Optional[str] = ..., media: _Optional[_Iterable[_Union[MediaItem, _Mapping]]] = ..., deliver_to: _Optional[str] = ...) -> None: ...

class EncodeResult(_message.Message):
    __slots__ = ("media", "handoff")
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_FIELD_NUMBER: _ClassVar[int]
    media: _containers.RepeatedCompositeFieldContainer[MediaItem]
    handoff: EmbeddingHandoff
    def __init__(self, media: _Optional[_Iterable[_Union[MediaItem, _Mapping]]] = ..., handoff: _Optional[_Union[EmbeddingHandoff, _Mapping]] = ...) -> None: ...

class MediaDelivery(_message.Message):
    __slots__ = ("key", "result")
    KEY_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    key: str
    result: EncodeResult
    def __init__(self, key: _Optional[str] = ..., result: _Optional[_Union[EncodeResult, _Mapping]] = ...) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("counters",)
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    counters: _containers.ScalarMap[str, int]
    def __init__(self, counters: _Optional[_Mapping[str, int]] = ...) -> None: ...

class TokenDelta(_message.Message):
    __slots__ = ("token_ids", "finish_reason", "logprobs", "index", "kv")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    logprobs: _containers.RepeatedCompositeFieldContainer[Logprob]
    index: int
    kv: KVHandoff
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[Logprob, _Mapping]]] = ..., index: _Optional[int] = ..., kv: _Optional[_Union[KVHandoff, _Mapping]] = ...) -> None: ...

class InstanceInfo(_message.Message):
    __slots__ = ("instance_id", "component", "endpoint", "subject", "host", "nixl_agent", "load")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    NIXL_AGENT_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    component: str
    endpoint: str
    subject: str
    host: str
    nixl_agent: str
    load: int
    def __init__(self, instance_id: _Optional[str] = ..., component: _Optional[str] = ..., endpoint: _Optional[str] = ..., subject: _Optional[str] = ..., host: _Optional[str] = ..., nixl_agent: _Optional[str] = ..., load: _Optional[int] = ...) -> None: ...

class ModelCard(_message.Message):
    __slots__ = ("served_model_name", "model_path", "model_type", "input", "context_length", "enable_multimodal", "modalities", "limit_mm_per_prompt", "subject", "instance_id", "component", "created")
    class LimitMmPerPromptEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SERVED_MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ENABLE_MULTIMODAL_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_MM_PER_PROMPT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    served_model_name: str
    model_path: str
    model_type: str
    input: str
    context_length: int
    enable_multimodal: bool
    modalities: _containers.RepeatedScalarFieldContainer[str]
    limit_mm_per_prompt: _containers.ScalarMap[str, int]
    subject: str
    instance_id: str
    component: str
    created: int
    def __init__(self, served_model_name: _Optional[str] = ..., model_path: _Optional[str] = ..., model_type: _Optional[str] = ..., input: _Optional[str] = ..., context_length: _Optional[int] = ..., enable_multimodal: _Optional[bool] = ..., modalities: _Optional[_Iterable[str]] = ..., limit_mm_per_prompt: _Optional[_Mapping[str, int]] = ..., subject: _Optional[str] = ..., instance_id: _Optional[str] = ..., component: _Optional[str] = ..., created: _Optional[int] = ...) -> None: ...
