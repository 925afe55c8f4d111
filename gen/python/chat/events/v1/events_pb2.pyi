import datetime

from chat.common.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TurnRequested(_message.Message):
    __slots__ = ("turn_id", "conversation_id", "tenant_id", "user_text", "options", "request_id", "accepted_at", "events_start_offset", "events_partition", "background", "key_id")
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_TEXT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_AT_FIELD_NUMBER: _ClassVar[int]
    EVENTS_START_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENTS_PARTITION_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    conversation_id: str
    tenant_id: str
    user_text: str
    options: _common_pb2.GenerationOptions
    request_id: str
    accepted_at: _timestamp_pb2.Timestamp
    events_start_offset: int
    events_partition: int
    background: bool
    key_id: str
    def __init__(self, turn_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., user_text: _Optional[str] = ..., options: _Optional[_Union[_common_pb2.GenerationOptions, _Mapping]] = ..., request_id: _Optional[str] = ..., accepted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., events_start_offset: _Optional[int] = ..., events_partition: _Optional[int] = ..., background: _Optional[bool] = ..., key_id: _Optional[str] = ...) -> None: ...

class TurnStarted(_message.Message):
    __slots__ = ("turn_id", "conversation_id", "tenant_id", "agent_id", "request_partition", "request_offset", "resumed_after_seq", "attempt")
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_PARTITION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_OFFSET_FIELD_NUMBER: _ClassVar[int]
    RESUMED_AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    conversation_id: str
    tenant_id: str
    agent_id: str
    request_partition: int
    request_offset: int
    resumed_after_seq: int
    attempt: int
    def __init__(self, turn_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., request_partition: _Optional[int] = ..., request_offset: _Optional[int] = ..., resumed_after_seq: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class TokenEmitted(_message.Message):
    __slots__ = ("turn_id", "seq", "text", "conversation_id", "tenant_id", "more_texts", "attempt")
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    MORE_TEXTS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    seq: int
    text: str
    conversation_id: str
    tenant_id: str
    more_texts: _containers.RepeatedScalarFieldContainer[str]
    attempt: int
    def __init__(self, turn_id: _Optional[str] = ..., seq: _Optional[int] = ..., text: _Optional[str] = ..., conversation_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., more_texts: _Optional[_Iterable[str]] = ..., attempt: _Optional[int] = ...) -> None: ...

class TurnFinished(_message.Message):
    __slots__ = ("turn_id", "finish_reason", "usage", "timings", "error", "conversation_id", "tenant_id", "last_seq", "model", "cancel_seen_at_seq", "context_skipped", "attempt")
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CANCEL_SEEN_AT_SEQ_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.TokenUsage
    timings: _common_pb2.TurnTimings
    error: _status_pb2.Status
    conversation_id: str
    tenant_id: str
    last_seq: int
    model: str
    cancel_seen_at_seq: int
    context_skipped: _containers.RepeatedCompositeFieldContainer[_common_pb2.ContextSkipped]
    attempt: int
    def __init__(self, turn_id: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.TokenUsage, _Mapping]] = ..., timings: _Optional[_Union[_common_pb2.TurnTimings, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., conversation_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., last_seq: _Optional[int] = ..., model: _Optional[str] = ..., cancel_seen_at_seq: _Optional[int] = ..., context_skipped: _Optional[_Iterable[_Union[_common_pb2.ContextSkipped, _Mapping]]] = ..., attempt: _Optional[int] = ...) -> None: ...

class TurnCancelled(_message.Message):
    __slots__ = ("turn_id", "conversation_id", "tenant_id")
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    conversation_id: str
    tenant_id: str
    def __init__(self, turn_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., tenant_id: _Optional[str] = ...) -> None: ...

class ClientAttached(_message.Message):
    __slots__ = ("turn_id", "conversation_id", "tenant_id", "gateway_id")
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    conversation_id: str
    tenant_id: str
    gateway_id: str
    def __init__(self, turn_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., gateway_id: _Optional[str] = ...) -> None: ...

class ClientDetached(_message.Message):
    __slots__ = ("turn_id", "conversation_id", "tenant_id", "gateway_id")
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    conversation_id: str
    tenant_id: str
    gateway_id: str
    def __init__(self, turn_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., gateway_id: _Optional[str] = ...) -> None: ...

class TurnEvent(_message.Message):
    __slots__ = ("started", "token", "finished", "cancelled", "attached", "detached")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    DETACHED_FIELD_NUMBER: _ClassVar[int]
    started: TurnStarted
    token: TokenEmitted
    finished: TurnFinished
    cancelled: TurnCancelled
    attached: ClientAttached
    detached: ClientDetached
    def __init__(self, started: _Optional[_Union[TurnStarted, _Mapping]] = ..., token: _Optional[_Union[TokenEmitted, _Mapping]] = ..., finished: _Optional[_Union[TurnFinished, _Mapping]] = ..., cancelled: _Optional[_Union[TurnCancelled, _Mapping]] = ..., attached: _Optional[_Union[ClientAttached, _Mapping]] = ..., detached: _Optional[_Union[ClientDetached, _Mapping]] = ...) -> None: ...
