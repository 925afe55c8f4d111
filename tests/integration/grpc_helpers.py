"""Small helpers for talking to a running mesh from tests with the real generated stubs."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
from chat.common.v1 import common_pb2
from chat.gateway.v1 import gateway_pb2, gateway_service_pb2_grpc
from google.rpc import error_details_pb2, status_pb2


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", key),)


def gateway(channel: grpc.Channel) -> gateway_service_pb2_grpc.GatewayServiceStub:
    return gateway_service_pb2_grpc.GatewayServiceStub(channel)


def rich_status(error: grpc.RpcError) -> status_pb2.Status:
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "grpc-status-details-bin":
            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    raise AssertionError(f"no rich status on {error!r}")


def error_reason(status: status_pb2.Status) -> str:
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    raise AssertionError(f"no ErrorInfo in {status}")


def retry_delay_s(status: status_pb2.Status) -> float | None:
    for detail in status.details:
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(retry):
            return retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    return None


def start_request(text: str, conversation_id: str = "", **options: object) -> gateway_pb2.StartTurn:
    return gateway_pb2.StartTurn(
        conversation_id=conversation_id,
        text=text,
        options=common_pb2.GenerationOptions(**options),  # type: ignore[arg-type]
    )


@dataclass
class TurnResult:
    """What a client saw of one turn."""

    turn_id: str = ""
    conversation_id: str = ""
    tokens: list[gateway_pb2.Token] = field(default_factory=list)
    finished: gateway_pb2.TurnFinished | None = None
    positions: list[int] = field(default_factory=list)
    # Frames that carried tokens: one per token, fewer when the stream coalesces.
    token_frames: int = 0

    @property
    def text(self) -> str:
        return "".join(token.text for token in self.tokens)

    @property
    def seqs(self) -> list[int]:
        return [token.seq for token in self.tokens]

    def add(self, frame: object) -> None:
        which = frame.WhichOneof("frame")  # type: ignore[attr-defined]
        if which == "accepted":
            self.turn_id = frame.accepted.turn_id  # type: ignore[attr-defined]
            self.conversation_id = frame.accepted.conversation_id  # type: ignore[attr-defined]
            self.positions.append(frame.accepted.queue_position)  # type: ignore[attr-defined]
        elif which == "token":
            self.tokens.append(frame.token)  # type: ignore[attr-defined]
            self.token_frames += 1
        elif which == "token_run":
            run = frame.token_run  # type: ignore[attr-defined]
            self.tokens.extend(
                gateway_pb2.Token(turn_id=run.turn_id, seq=run.first_seq + i, text=text)
                for i, text in enumerate(run.texts)
            )
            self.token_frames += 1
        elif which == "finished":
            self.finished = frame.finished  # type: ignore[attr-defined]


def stream_turn(
    stub: object, key: str, start: gateway_pb2.StartTurn, timeout: float = 60
) -> TurnResult:
    result = TurnResult()
    for frame in stub.StreamTurn(  # type: ignore[attr-defined]
        gateway_pb2.StreamTurnRequest(start=start), metadata=auth(key), timeout=timeout
    ):
        result.add(frame)
    return result


class ChatSession:
    """A Chat bidi stream driven frame by frame from a test."""

    def __init__(
        self, stub: gateway_service_pb2_grpc.GatewayServiceStub, key: str, timeout: float = 60
    ) -> None:
        self._outbox: queue.Queue[gateway_pb2.ChatRequest | None] = queue.Queue()
        self.call = stub.Chat(self._requests(), metadata=auth(key), timeout=timeout)
        self._lock = threading.Lock()

    def _requests(self) -> Iterator[gateway_pb2.ChatRequest]:
        while True:
            item = self._outbox.get()
            if item is None:
                return
            yield item

    def send(self, request: gateway_pb2.ChatRequest) -> None:
        self._outbox.put(request)

    def next(self) -> gateway_pb2.ChatResponse:
        return next(self.call)  # type: ignore[no-any-return]

    def close(self) -> None:
        self._outbox.put(None)

    def cancel(self) -> None:
        self.call.cancel()
