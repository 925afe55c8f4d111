from chat.common.v1 import common_pb2 as _common_pb2
from chat.common.v1 import conversation_pb2 as _conversation_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StartTurn(_message.Message):
    __slots__ = ("conversation_id", "text", "options", "request_id", "coalesce_tokens", "background")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    COALESCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    text: str
    options: _common_pb2.GenerationOptions
    request_id: str
    coalesce_tokens: bool
    background: bool
    def __init__(self, conversation_id: _Optional[str] = ..., text: _Optional[str] = ..., options: _Optional[_Union[_common_pb2.GenerationOptions, _Mapping]] = ..., request_id: _Optional[str] = ..., coalesce_tokens: _Optional[bool] = ..., background: _Optional[bool] = ...) -> None: ...

class CancelTurn(_message.Message):
    __slots__ = ("turn_id",)
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    def __init__(self, turn_id: _Optional[str] = ...) -> None: ...

class ResumeTurn(_message.Message):
    __slots__ = ("turn_id", "after_seq", "coalesce_tokens")
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    COALESCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    after_seq: int
    coalesce_tokens: bool
    def __init__(self, turn_id: _Optional[str] = ..., after_seq: _Optional[int] = ..., coalesce_tokens: _Optional[bool] = ...) -> None: ...

class FlowCredit(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    def __init__(self, tokens: _Optional[int] = ...) -> None: ...

class TurnAccepted(_message.Message):
    __slots__ = ("turn_id", "conversation_id", "queue_position")
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    conversation_id: str
    queue_position: int
    def __init__(self, turn_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., queue_position: _Optional[int] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("turn_id", "seq", "text")
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    seq: int
    text: str
    def __init__(self, turn_id: _Optional[str] = ..., seq: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class TokenRun(_message.Message):
    __slots__ = ("turn_id", "first_seq", "texts")
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    first_seq: int
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, turn_id: _Optional[str] = ..., first_seq: _Optional[int] = ..., texts: _Optional[_Iterable[str]] = ...) -> None: ...

class TurnFinished(_message.Message):
    __slots__ = ("turn_id", "finish_reason", "usage", "timings", "last_seq", "context_skipped", "error")
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.TokenUsage
    timings: _common_pb2.TurnTimings
    last_seq: int
    context_skipped: _containers.RepeatedCompositeFieldContainer[_common_pb2.ContextSkipped]
    error: _status_pb2.Status
    def __init__(self, turn_id: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.TokenUsage, _Mapping]] = ..., timings: _Optional[_Union[_common_pb2.TurnTimings, _Mapping]] = ..., last_seq: _Optional[int] = ..., context_skipped: _Optional[_Iterable[_Union[_common_pb2.ContextSkipped, _Mapping]]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class ChatError(_message.Message):
    __slots__ = ("status", "turn_id")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    turn_id: str
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., turn_id: _Optional[str] = ...) -> None: ...

class ChatRequest(_message.Message):
    __slots__ = ("start", "cancel", "resume", "credit")
    START_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    start: StartTurn
    cancel: CancelTurn
    resume: ResumeTurn
    credit: FlowCredit
    def __init__(self, start: _Optional[_Union[StartTurn, _Mapping]] = ..., cancel: _Optional[_Union[CancelTurn, _Mapping]] = ..., resume: _Optional[_Union[ResumeTurn, _Mapping]] = ..., credit: _Optional[_Union[FlowCredit, _Mapping]] = ...) -> None: ...

class ChatResponse(_message.Message):
    __slots__ = ("accepted", "token", "finished", "error", "token_run")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TOKEN_RUN_FIELD_NUMBER: _ClassVar[int]
    accepted: TurnAccepted
    token: Token
    finished: TurnFinished
    error: ChatError
    token_run: TokenRun
    def __init__(self, accepted: _Optional[_Union[TurnAccepted, _Mapping]] = ..., token: _Optional[_Union[Token, _Mapping]] = ..., finished: _Optional[_Union[TurnFinished, _Mapping]] = ..., error: _Optional[_Union[ChatError, _Mapping]] = ..., token_run: _Optional[_Union[TokenRun, _Mapping]] = ...) -> None: ...

class StreamTurnRequest(_message.Message):
    __slots__ = ("start",)
    START_FIELD_NUMBER: _ClassVar[int]
    start: StartTurn
    def __init__(self, start: _Optional[_Union[StartTurn, _Mapping]] = ...) -> None: ...

class StreamTurnResponse(_message.Message):
    __slots__ = ("accepted", "token", "finished", "token_run")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_RUN_FIELD_NUMBER: _ClassVar[int]
    accepted: TurnAccepted
    token: Token
    finished: TurnFinished
    token_run: TokenRun
    def __init__(self, accepted: _Optional[_Union[TurnAccepted, _Mapping]] = ..., token: _Optional[_Union[Token, _Mapping]] = ..., finished: _Optional[_Union[TurnFinished, _Mapping]] = ..., token_run: _Optional[_Union[TokenRun, _Mapping]] = ...) -> None: ...

class ResumeTurnRequest(_message.Message):
    __slots__ = ("turn_id", "after_seq", "coalesce_tokens")
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    COALESCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    after_seq: int
    coalesce_tokens: bool
    def __init__(self, turn_id: _Optional[str] = ..., after_seq: _Optional[int] = ..., coalesce_tokens: _Optional[bool] = ...) -> None: ...

class ResumeTurnResponse(_message.Message):
    __slots__ = ("accepted", "token", "finished", "token_run")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_RUN_FIELD_NUMBER: _ClassVar[int]
    accepted: TurnAccepted
    token: Token
    finished: TurnFinished
    token_run: TokenRun
    def __init__(self, accepted: _Optional[_Union[TurnAccepted, _Mapping]] = ..., token: _Optional[_Union[Token, _Mapping]] = ..., finished: _Optional[_Union[TurnFinished, _Mapping]] = ..., token_run: _Optional[_Union[TokenRun, _Mapping]] = ...) -> None: ...

class CancelTurnRequest(_message.Message):
    __slots__ = ("turn_id",)
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    def __init__(self, turn_id: _Optional[str] = ...) -> None: ...

class CancelTurnResponse(_message.Message):
    __slots__ = ("turn_id",)
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    def __init__(self, turn_id: _Optional[str] = ...) -> None: ...

class GetConversationRequest(_message.Message):
    __slots__ = ("conversation_id",)
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    def __init__(self, conversation_id: _Optional[str] = ...) -> None: ...

class GetConversationResponse(_message.Message):
    __slots__ = ("conversation",)
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    conversation: _conversation_pb2.Conversation
    def __init__(self, conversation: _Optional[_Union[_conversation_pb2.Conversation, _Mapping]] = ...) -> None: ...

class ListConversationsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListConversationsResponse(_message.Message):
    __slots__ = ("conversations", "next_page_token")
    CONVERSATIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    conversations: _containers.RepeatedCompositeFieldContainer[_conversation_pb2.Conversation]
    next_page_token: str
    def __init__(self, conversations: _Optional[_Iterable[_Union[_conversation_pb2.Conversation, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
