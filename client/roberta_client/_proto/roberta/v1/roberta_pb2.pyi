from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]

class Pooling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOLING_NONE: _ClassVar[Pooling]
    POOLING_CLS: _ClassVar[Pooling]
    POOLING_MEAN: _ClassVar[Pooling]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
POOLING_NONE: Pooling
POOLING_CLS: Pooling
POOLING_MEAN: Pooling

class Input(_message.Message):
    __slots__ = ("text", "pair", "ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PAIR_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    pair: TextPair
    ids: TokenIds
    def __init__(self, text: _Optional[str] = ..., pair: _Optional[_Union[TextPair, _Mapping]] = ..., ids: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class TextPair(_message.Message):
    __slots__ = ("text", "text_pair")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TEXT_PAIR_FIELD_NUMBER: _ClassVar[int]
    text: str
    text_pair: str
    def __init__(self, text: _Optional[str] = ..., text_pair: _Optional[str] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class EncodeOptions(_message.Message):
    __slots__ = ("truncate", "no_separator")
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    NO_SEPARATOR_FIELD_NUMBER: _ClassVar[int]
    truncate: bool
    no_separator: bool
    def __init__(self, truncate: bool = ..., no_separator: bool = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("tokens", "truncated_items", "tokenize_ms", "queue_ms", "inference_ms")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    truncated_items: int
    tokenize_ms: float
    queue_ms: float
    inference_ms: float
    def __init__(self, tokens: _Optional[int] = ..., truncated_items: _Optional[int] = ..., tokenize_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("inputs", "options")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[Input]
    options: EncodeOptions
    def __init__(self, inputs: _Optional[_Iterable[_Union[Input, _Mapping]]] = ..., options: _Optional[_Union[EncodeOptions, _Mapping]] = ...) -> None: ...

class Tokenization(_message.Message):
    __slots__ = ("ids", "tokens", "segments", "starts", "ends", "special", "truncated")
    IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    STARTS_FIELD_NUMBER: _ClassVar[int]
    ENDS_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    segments: _containers.RepeatedScalarFieldContainer[int]
    starts: _containers.RepeatedScalarFieldContainer[int]
    ends: _containers.RepeatedScalarFieldContainer[int]
    special: _containers.RepeatedScalarFieldContainer[bool]
    truncated: bool
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[str]] = ..., segments: _Optional[_Iterable[int]] = ..., starts: _Optional[_Iterable[int]] = ..., ends: _Optional[_Iterable[int]] = ..., special: _Optional[_Iterable[bool]] = ..., truncated: bool = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("results", "usage")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Tokenization]
    usage: Usage
    def __init__(self, results: _Optional[_Iterable[_Union[Tokenization, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("sequences",)
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[TokenIds]
    def __init__(self, sequences: _Optional[_Iterable[_Union[TokenIds, _Mapping]]] = ...) -> None: ...

class DecodedText(_message.Message):
    __slots__ = ("segments",)
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    segments: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, segments: _Optional[_Iterable[str]] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[DecodedText]
    def __init__(self, results: _Optional[_Iterable[_Union[DecodedText, _Mapping]]] = ...) -> None: ...

class FeatureOptions(_message.Message):
    __slots__ = ("layers", "all_layers", "pooling", "dtype", "encode")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    ALL_LAYERS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ENCODE_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedScalarFieldContainer[int]
    all_layers: bool
    pooling: Pooling
    dtype: DType
    encode: EncodeOptions
    def __init__(self, layers: _Optional[_Iterable[int]] = ..., all_layers: bool = ..., pooling: _Optional[_Union[Pooling, str]] = ..., dtype: _Optional[_Union[DType, str]] = ..., encode: _Optional[_Union[EncodeOptions, _Mapping]] = ...) -> None: ...

class ExtractFeaturesRequest(_message.Message):
    __slots__ = ("inputs", "options")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[Input]
    options: FeatureOptions
    def __init__(self, inputs: _Optional[_Iterable[_Union[Input, _Mapping]]] = ..., options: _Optional[_Union[FeatureOptions, _Mapping]] = ...) -> None: ...

class Features(_message.Message):
    __slots__ = ("tensor", "layers", "num_tokens", "truncated")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    layers: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: int
    truncated: bool
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., layers: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[int] = ..., truncated: bool = ...) -> None: ...

class ExtractFeaturesResponse(_message.Message):
    __slots__ = ("results", "usage")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Features]
    usage: Usage
    def __init__(self, results: _Optional[_Iterable[_Union[Features, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("head", "inputs", "options")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    head: str
    inputs: _containers.RepeatedCompositeFieldContainer[Input]
    options: EncodeOptions
    def __init__(self, head: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[Input, _Mapping]]] = ..., options: _Optional[_Union[EncodeOptions, _Mapping]] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("logits", "log_probs", "label_index", "label", "truncated")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    LABEL_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    logits: _containers.RepeatedScalarFieldContainer[float]
    log_probs: _containers.RepeatedScalarFieldContainer[float]
    label_index: int
    label: str
    truncated: bool
    def __init__(self, logits: _Optional[_Iterable[float]] = ..., log_probs: _Optional[_Iterable[float]] = ..., label_index: _Optional[int] = ..., label: _Optional[str] = ..., truncated: bool = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("results", "usage")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Classification]
    usage: Usage
    def __init__(self, results: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class FillMaskRequest(_message.Message):
    __slots__ = ("texts", "topk")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    topk: int
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., topk: _Optional[int] = ...) -> None: ...

class MaskCandidate(_message.Message):
    __slots__ = ("sequence", "score", "token", "token_id")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    sequence: str
    score: float
    token: str
    token_id: int
    def __init__(self, sequence: _Optional[str] = ..., score: _Optional[float] = ..., token: _Optional[str] = ..., token_id: _Optional[int] = ...) -> None: ...

class FillMaskResult(_message.Message):
    __slots__ = ("candidates",)
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[MaskCandidate]
    def __init__(self, candidates: _Optional[_Iterable[_Union[MaskCandidate, _Mapping]]] = ...) -> None: ...

class FillMaskResponse(_message.Message):
    __slots__ = ("results", "usage")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[FillMaskResult]
    usage: Usage
    def __init__(self, results: _Optional[_Iterable[_Union[FillMaskResult, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class RegisterClassificationHeadRequest(_message.Message):
    __slots__ = ("name", "num_classes", "labels")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_classes: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., num_classes: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...

class RegisterClassificationHeadResponse(_message.Message):
    __slots__ = ("head",)
    HEAD_FIELD_NUMBER: _ClassVar[int]
    head: HeadInfo
    def __init__(self, head: _Optional[_Union[HeadInfo, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeadInfo(_message.Message):
    __slots__ = ("name", "num_classes", "labels")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_classes: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., num_classes: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_batch_tokens", "max_batch_size", "max_items_per_request", "max_message_bytes", "stream_window")
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEMS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STREAM_WINDOW_FIELD_NUMBER: _ClassVar[int]
    max_batch_tokens: int
    max_batch_size: int
    max_items_per_request: int
    max_message_bytes: int
    stream_window: int
    def __init__(self, max_batch_tokens: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_items_per_request: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., stream_window: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "source", "untrained", "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_size", "max_positions", "dtype", "device", "heads", "limits", "server_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    UNTRAINED_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_ATTENTION_HEADS_FIELD_NUMBER: _ClassVar[int]
    FFN_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    source: str
    untrained: bool
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    ffn_size: int
    max_positions: int
    dtype: str
    device: str
    heads: _containers.RepeatedCompositeFieldContainer[HeadInfo]
    limits: ServerLimits
    server_version: str
    def __init__(self, name: _Optional[str] = ..., source: _Optional[str] = ..., untrained: bool = ..., vocab_size: _Optional[int] = ..., hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_attention_heads: _Optional[int] = ..., ffn_size: _Optional[int] = ..., max_positions: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., heads: _Optional[_Iterable[_Union[HeadInfo, _Mapping]]] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., server_version: _Optional[str] = ...) -> None: ...

class StreamItem(_message.Message):
    __slots__ = ("id", "input")
    ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    id: str
    input: Input
    def __init__(self, id: _Optional[str] = ..., input: _Optional[_Union[Input, _Mapping]] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class StreamWindow(_message.Message):
    __slots__ = ("max_in_flight", "max_items_per_message")
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEMS_PER_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    max_in_flight: int
    max_items_per_message: int
    def __init__(self, max_in_flight: _Optional[int] = ..., max_items_per_message: _Optional[int] = ...) -> None: ...

class ExtractFeaturesStreamRequest(_message.Message):
    __slots__ = ("items", "options")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[StreamItem]
    options: FeatureOptions
    def __init__(self, items: _Optional[_Iterable[_Union[StreamItem, _Mapping]]] = ..., options: _Optional[_Union[FeatureOptions, _Mapping]] = ...) -> None: ...

class FeaturesStreamResult(_message.Message):
    __slots__ = ("id", "features", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    features: Features
    error: ItemError
    def __init__(self, id: _Optional[str] = ..., features: _Optional[_Union[Features, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class ExtractFeaturesStreamResponse(_message.Message):
    __slots__ = ("results", "window")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[FeaturesStreamResult]
    window: StreamWindow
    def __init__(self, results: _Optional[_Iterable[_Union[FeaturesStreamResult, _Mapping]]] = ..., window: _Optional[_Union[StreamWindow, _Mapping]] = ...) -> None: ...

class ClassifyStreamRequest(_message.Message):
    __slots__ = ("items", "head", "options")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[StreamItem]
    head: str
    options: EncodeOptions
    def __init__(self, items: _Optional[_Iterable[_Union[StreamItem, _Mapping]]] = ..., head: _Optional[str] = ..., options: _Optional[_Union[EncodeOptions, _Mapping]] = ...) -> None: ...

class ClassifyStreamResult(_message.Message):
    __slots__ = ("id", "classification", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    CLASSIFICATION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    classification: Classification
    error: ItemError
    def __init__(self, id: _Optional[str] = ..., classification: _Optional[_Union[Classification, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class ClassifyStreamResponse(_message.Message):
    __slots__ = ("results", "window")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ClassifyStreamResult]
    window: StreamWindow
    def __init__(self, results: _Optional[_Iterable[_Union[ClassifyStreamResult, _Mapping]]] = ..., window: _Optional[_Union[StreamWindow, _Mapping]] = ...) -> None: ...
