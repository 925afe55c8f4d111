from chat.common.v1 import conversation_pb2 as _conversation_pb2
from chat.events.v1 import events_pb2 as _events_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StoredTurnState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STORED_TURN_STATE_UNSPECIFIED: _ClassVar[StoredTurnState]
    STORED_TURN_STATE_UNKNOWN: _ClassVar[StoredTurnState]
    STORED_TURN_STATE_RUNNING: _ClassVar[StoredTurnState]
    STORED_TURN_STATE_FINISHED: _ClassVar[StoredTurnState]
STORED_TURN_STATE_UNSPECIFIED: StoredTurnState
STORED_TURN_STATE_UNKNOWN: StoredTurnState
STORED_TURN_STATE_RUNNING: StoredTurnState
STORED_TURN_STATE_FINISHED: StoredTurnState

class GetConversationRequest(_message.Message):
    __slots__ = ("tenant_id", "conversation_id", "consistent", "consistent_before_turn_id", "last_messages")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    CONSISTENT_FIELD_NUMBER: _ClassVar[int]
    CONSISTENT_BEFORE_TURN_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    conversation_id: str
    consistent: bool
    consistent_before_turn_id: str
    last_messages: int
    def __init__(self, tenant_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., consistent: _Optional[bool] = ..., consistent_before_turn_id: _Optional[str] = ..., last_messages: _Optional[int] = ...) -> None: ...

class GetConversationResponse(_message.Message):
    __slots__ = ("conversation",)
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    conversation: _conversation_pb2.Conversation
    def __init__(self, conversation: _Optional[_Union[_conversation_pb2.Conversation, _Mapping]] = ...) -> None: ...

class ListConversationsRequest(_message.Message):
    __slots__ = ("tenant_id", "page_size", "page_token")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    page_size: int
    page_token: str
    def __init__(self, tenant_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListConversationsResponse(_message.Message):
    __slots__ = ("conversations", "next_page_token")
    CONVERSATIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    conversations: _containers.RepeatedCompositeFieldContainer[_conversation_pb2.Conversation]
    next_page_token: str
    def __init__(self, conversations: _Optional[_Iterable[_Union[_conversation_pb2.Conversation, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListMessagesRequest(_message.Message):
    __slots__ = ("tenant_id", "conversation_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    conversation_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., conversation_id: _Optional[str] = ...) -> None: ...

class ListMessagesResponse(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: _conversation_pb2.Message
    def __init__(self, message: _Optional[_Union[_conversation_pb2.Message, _Mapping]] = ...) -> None: ...

class FlushRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FlushResponse(_message.Message):
    __slots__ = ("rows_written",)
    ROWS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    rows_written: int
    def __init__(self, rows_written: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("events_consumed", "batches_committed", "tokens_written", "messages_written", "duplicates_ignored", "pending_events")
    EVENTS_CONSUMED_FIELD_NUMBER: _ClassVar[int]
    BATCHES_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_IGNORED_FIELD_NUMBER: _ClassVar[int]
    PENDING_EVENTS_FIELD_NUMBER: _ClassVar[int]
    events_consumed: int
    batches_committed: int
    tokens_written: int
    messages_written: int
    duplicates_ignored: int
    pending_events: int
    def __init__(self, events_consumed: _Optional[int] = ..., batches_committed: _Optional[int] = ..., tokens_written: _Optional[int] = ..., messages_written: _Optional[int] = ..., duplicates_ignored: _Optional[int] = ..., pending_events: _Optional[int] = ...) -> None: ...

class DeleteConversationRequest(_message.Message):
    __slots__ = ("tenant_id", "conversation_id", "force")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    conversation_id: str
    force: bool
    def __init__(self, tenant_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class DeleteConversationResponse(_message.Message):
    __slots__ = ("counts", "already_deleted")
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    ALREADY_DELETED_FIELD_NUMBER: _ClassVar[int]
    counts: ErasureCounts
    already_deleted: bool
    def __init__(self, counts: _Optional[_Union[ErasureCounts, _Mapping]] = ..., already_deleted: _Optional[bool] = ...) -> None: ...

class EraseTenantRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class EraseTenantResponse(_message.Message):
    __slots__ = ("counts",)
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    counts: ErasureCounts
    def __init__(self, counts: _Optional[_Union[ErasureCounts, _Mapping]] = ...) -> None: ...

class ErasureCounts(_message.Message):
    __slots__ = ("conversations", "messages", "tokens", "chunks")
    CONVERSATIONS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    conversations: int
    messages: int
    tokens: int
    chunks: int
    def __init__(self, conversations: _Optional[int] = ..., messages: _Optional[int] = ..., tokens: _Optional[int] = ..., chunks: _Optional[int] = ...) -> None: ...

class LookupTurnRequest(_message.Message):
    __slots__ = ("tenant_id", "turn_id", "after_seq")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    turn_id: str
    after_seq: int
    def __init__(self, tenant_id: _Optional[str] = ..., turn_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class LookupTurnResponse(_message.Message):
    __slots__ = ("state", "conversation_id", "request_offset", "applied_request_offset", "finished", "first_seq", "token_texts", "tokens_complete")
    STATE_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_OFFSET_FIELD_NUMBER: _ClassVar[int]
    APPLIED_REQUEST_OFFSET_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TEXTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    state: StoredTurnState
    conversation_id: str
    request_offset: int
    applied_request_offset: int
    finished: _events_pb2.TurnFinished
    first_seq: int
    token_texts: _containers.RepeatedScalarFieldContainer[str]
    tokens_complete: bool
    def __init__(self, state: _Optional[_Union[StoredTurnState, str]] = ..., conversation_id: _Optional[str] = ..., request_offset: _Optional[int] = ..., applied_request_offset: _Optional[int] = ..., finished: _Optional[_Union[_events_pb2.TurnFinished, _Mapping]] = ..., first_seq: _Optional[int] = ..., token_texts: _Optional[_Iterable[str]] = ..., tokens_complete: _Optional[bool] = ...) -> None: ...

class ClaimRequestIdRequest(_message.Message):
    __slots__ = ("tenant_id", "request_id", "turn_id", "conversation_id", "fingerprint", "replace_turn_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    REPLACE_TURN_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    request_id: str
    turn_id: str
    conversation_id: str
    fingerprint: str
    replace_turn_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., request_id: _Optional[str] = ..., turn_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., fingerprint: _Optional[str] = ..., replace_turn_id: _Optional[str] = ...) -> None: ...

class ClaimRequestIdResponse(_message.Message):
    __slots__ = ("won", "turn_id", "conversation_id", "fingerprint", "age_ms")
    WON_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    AGE_MS_FIELD_NUMBER: _ClassVar[int]
    won: bool
    turn_id: str
    conversation_id: str
    fingerprint: str
    age_ms: int
    def __init__(self, won: _Optional[bool] = ..., turn_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., fingerprint: _Optional[str] = ..., age_ms: _Optional[int] = ...) -> None: ...
