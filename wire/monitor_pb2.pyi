from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StepBatch(_message.Message):
    __slots__ = ("bundle_id", "sender_id", "step", "request_ids", "row_offsets", "positions", "token_ids", "is_response", "k", "projections", "finished", "drops", "activated", "mitigation", "mitigated")
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    ROW_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IS_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    PROJECTIONS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    DROPS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATED_FIELD_NUMBER: _ClassVar[int]
    MITIGATION_FIELD_NUMBER: _ClassVar[int]
    MITIGATED_FIELD_NUMBER: _ClassVar[int]
    bundle_id: str
    sender_id: str
    step: int
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    row_offsets: _containers.RepeatedScalarFieldContainer[int]
    positions: bytes
    token_ids: bytes
    is_response: bytes
    k: int
    projections: bytes
    finished: _containers.RepeatedCompositeFieldContainer[FinishedRequest]
    drops: DropCounters
    activated: bool
    mitigation: _containers.RepeatedScalarFieldContainer[str]
    mitigated: bytes
    def __init__(self, bundle_id: _Optional[str] = ..., sender_id: _Optional[str] = ..., step: _Optional[int] = ..., request_ids: _Optional[_Iterable[str]] = ..., row_offsets: _Optional[_Iterable[int]] = ..., positions: _Optional[bytes] = ..., token_ids: _Optional[bytes] = ..., is_response: _Optional[bytes] = ..., k: _Optional[int] = ..., projections: _Optional[bytes] = ..., finished: _Optional[_Iterable[_Union[FinishedRequest, _Mapping]]] = ..., drops: _Optional[_Union[DropCounters, _Mapping]] = ..., activated: _Optional[bool] = ..., mitigation: _Optional[_Iterable[str]] = ..., mitigated: _Optional[bytes] = ...) -> None: ...

class FinishedRequest(_message.Message):
    __slots__ = ("request_id", "client_request_id", "model", "model_version", "finish_reason", "adapter", "traceparent")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    client_request_id: str
    model: str
    model_version: str
    finish_reason: str
    adapter: str
    traceparent: str
    def __init__(self, request_id: _Optional[str] = ..., client_request_id: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., finish_reason: _Optional[str] = ..., adapter: _Optional[str] = ..., traceparent: _Optional[str] = ...) -> None: ...

class DropCounters(_message.Message):
    __slots__ = ("rows_by_reason", "steps_by_reason")
    class RowsByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class StepsByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ROWS_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    STEPS_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    rows_by_reason: _containers.ScalarMap[str, int]
    steps_by_reason: _containers.ScalarMap[str, int]
    def __init__(self, rows_by_reason: _Optional[_Mapping[str, int]] = ..., steps_by_reason: _Optional[_Mapping[str, int]] = ...) -> None: ...

class IngestSummary(_message.Message):
    __slots__ = ("steps", "rows", "finished")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    steps: int
    rows: int
    finished: int
    def __init__(self, steps: _Optional[int] = ..., rows: _Optional[int] = ..., finished: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("bundle_id", "k", "projections", "is_response", "token_ids", "model", "model_version")
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    PROJECTIONS_FIELD_NUMBER: _ClassVar[int]
    IS_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    bundle_id: str
    k: int
    projections: bytes
    is_response: bytes
    token_ids: bytes
    model: str
    model_version: str
    def __init__(self, bundle_id: _Optional[str] = ..., k: _Optional[int] = ..., projections: _Optional[bytes] = ..., is_response: _Optional[bytes] = ..., token_ids: _Optional[bytes] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class GetRequestScoreRequest(_message.Message):
    __slots__ = ("request_id", "wait_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    wait_s: float
    def __init__(self, request_id: _Optional[str] = ..., wait_s: _Optional[float] = ...) -> None: ...

class FeatureScore(_message.Message):
    __slots__ = ("name", "score", "threshold", "has_threshold", "flagged", "z", "prompt_mean", "response_mean", "response_max_rolling")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    HAS_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    PROMPT_MEAN_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_MEAN_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_MAX_ROLLING_FIELD_NUMBER: _ClassVar[int]
    name: str
    score: float
    threshold: float
    has_threshold: bool
    flagged: bool
    z: float
    prompt_mean: float
    response_mean: float
    response_max_rolling: float
    def __init__(self, name: _Optional[str] = ..., score: _Optional[float] = ..., threshold: _Optional[float] = ..., has_threshold: _Optional[bool] = ..., flagged: _Optional[bool] = ..., z: _Optional[float] = ..., prompt_mean: _Optional[float] = ..., response_mean: _Optional[float] = ..., response_max_rolling: _Optional[float] = ...) -> None: ...

class RequestScore(_message.Message):
    __slots__ = ("request_id", "client_request_id", "bundle_id", "model", "model_version", "flagged", "tokens", "features", "finished_at", "scored_at", "mitigation", "mitigated_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    SCORED_AT_FIELD_NUMBER: _ClassVar[int]
    MITIGATION_FIELD_NUMBER: _ClassVar[int]
    MITIGATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    client_request_id: str
    bundle_id: str
    model: str
    model_version: str
    flagged: bool
    tokens: int
    features: _containers.RepeatedCompositeFieldContainer[FeatureScore]
    finished_at: float
    scored_at: float
    mitigation: str
    mitigated_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., client_request_id: _Optional[str] = ..., bundle_id: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., flagged: _Optional[bool] = ..., tokens: _Optional[int] = ..., features: _Optional[_Iterable[_Union[FeatureScore, _Mapping]]] = ..., finished_at: _Optional[float] = ..., scored_at: _Optional[float] = ..., mitigation: _Optional[str] = ..., mitigated_tokens: _Optional[int] = ...) -> None: ...

class DescribeBundleRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FeatureInfo(_message.Message):
    __slots__ = ("name", "method", "kind", "span", "reduce", "window", "threshold", "has_threshold")
    NAME_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    REDUCE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    HAS_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    name: str
    method: str
    kind: str
    span: str
    reduce: str
    window: int
    threshold: float
    has_threshold: bool
    def __init__(self, name: _Optional[str] = ..., method: _Optional[str] = ..., kind: _Optional[str] = ..., span: _Optional[str] = ..., reduce: _Optional[str] = ..., window: _Optional[int] = ..., threshold: _Optional[float] = ..., has_threshold: _Optional[bool] = ...) -> None: ...

class BundleInfo(_message.Message):
    __slots__ = ("bundle_id", "content_hash", "model", "hidden_size", "num_layers", "layer", "hook", "format_version", "features")
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HOOK_FIELD_NUMBER: _ClassVar[int]
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    bundle_id: str
    content_hash: str
    model: str
    hidden_size: int
    num_layers: int
    layer: int
    hook: str
    format_version: int
    features: _containers.RepeatedCompositeFieldContainer[FeatureInfo]
    def __init__(self, bundle_id: _Optional[str] = ..., content_hash: _Optional[str] = ..., model: _Optional[str] = ..., hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., layer: _Optional[int] = ..., hook: _Optional[str] = ..., format_version: _Optional[int] = ..., features: _Optional[_Iterable[_Union[FeatureInfo, _Mapping]]] = ...) -> None: ...
