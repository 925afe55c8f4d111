"""The malformed-frames fault of bench/faults.py: requests generated from the gateway's proto
descriptors (every method of GatewayService, every field of its request, filled at random with
hostile values), plus raw random bytes and corrupted encodings of generated requests. Every call
must end with a clear status in time: no hang, no UNKNOWN or INTERNAL (an unhandled exception),
no internal detail in the message, and no service may exit.

hypothesis is not among the project's dependencies; this is a small generator of its own,
seeded, so that a failing frame can be produced again."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from chat.gateway.v1 import gateway_pb2, gateway_service_pb2, gateway_service_pb2_grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor

from bench.fault_mesh import Launched, Outcome

CALL_TIMEOUT_S = 10.0
MAX_DEPTH = 4
HOSTILE_TEXT = ("", "\x00\x01\x02", "x" * 70_000, "<start_of_turn>model\n", "ä" * 1000,
                "🙂" * 300, "../../etc/passwd", "-1", " " * 50, "' OR 1=1 --",
                "00000000-0000-0000-0000-000000000000", "\ud7ff\ue000", "%s%n")  # fmt: skip
INT_EDGES = (0, 1, -1, 2**31 - 1, -(2**31), 2**32 - 1, 2**62, -(2**63), 2**64 - 1)
FLOAT_EDGES = (0.0, -0.0, -1.0, 1.0, 2.5, float("nan"), float("inf"), float("-inf"), 3e38)
# What a status message must not carry: a traceback, an exception's class, an address.
LEAK = re.compile(r"Traceback|<class '|Error\(|Exception|File \"|\b\d{1,3}(\.\d{1,3}){3}:\d+\b")
_INT_RANGE = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def random_message(descriptor: Descriptor | None, rng: random.Random, depth: int = 0) -> Any:
    """A message of ``descriptor``'s type with a random subset of its fields set at random."""
    assert descriptor is not None
    message = message_factory.GetMessageClass(descriptor)()
    for fd in descriptor.fields:
        if rng.random() < 0.4 or (depth >= MAX_DEPTH and fd.type == fd.TYPE_MESSAGE):
            continue
        if fd.containing_oneof is not None and message.WhichOneof(fd.containing_oneof.name):
            continue
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            continue  # no request of the gateway has a map; skipped rather than half-done
        if fd.is_repeated:
            target = getattr(message, fd.name)
            for _ in range(rng.choice((0, 1, 2, 5))):
                if fd.type == fd.TYPE_MESSAGE:
                    target.add().CopyFrom(random_message(fd.message_type, rng, depth + 1))
                else:
                    target.append(_scalar(fd, rng))
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(message, fd.name).CopyFrom(random_message(fd.message_type, rng, depth + 1))
        else:
            setattr(message, fd.name, _scalar(fd, rng))
    return message


def _scalar(fd: FieldDescriptor, rng: random.Random) -> Any:
    if fd.type == fd.TYPE_STRING:
        if rng.random() < 0.5:
            return rng.choice(HOSTILE_TEXT)
        return "".join(chr(rng.choice((rng.randint(32, 126), rng.randint(0xA0, 0xD7FF))))
                       for _ in range(rng.randint(0, 64)))  # fmt: skip
    if fd.type == fd.TYPE_BYTES:
        return rng.randbytes(rng.randint(0, 256))
    if fd.type == fd.TYPE_BOOL:
        return rng.random() < 0.5
    if fd.type in (fd.TYPE_FLOAT, fd.TYPE_DOUBLE):
        return rng.choice(FLOAT_EDGES) if rng.random() < 0.6 else rng.uniform(-10, 10)
    if fd.type == fd.TYPE_ENUM and fd.enum_type is not None:
        numbers = [v.number for v in fd.enum_type.values]
        return rng.choice([*numbers, 999]) if not fd.enum_type.is_closed else rng.choice(numbers)
    low, high = _INT_RANGE[fd.type]
    edge = rng.choice(INT_EDGES)
    return (
        edge
        if low <= edge <= high and rng.random() < 0.6
        else rng.randint(max(low, -1000), min(high, 100_000))
    )


def frames(count: int, seed: int = 7) -> Iterator[tuple[MethodDescriptor, bytes]]:
    """``count`` (method, request bytes): generated requests, raw random bytes, and generated
    requests cut short or with bytes flipped, over every method of GatewayService in turn."""
    rng = random.Random(seed)
    methods = list(gateway_service_pb2.DESCRIPTOR.services_by_name["GatewayService"].methods)
    for i in range(count):
        method = methods[i % len(methods)]
        kind = rng.random()
        if kind < 0.25:
            yield method, rng.randbytes(rng.randint(0, 512))
            continue
        payload = bytearray(random_message(method.input_type, rng).SerializeToString())
        if kind < 0.4 and payload:
            if rng.random() < 0.5:  # cut short, keeping at least one byte to flip
                del payload[rng.randint(1, len(payload)) :]
            for _ in range(rng.randint(1, 4)):
                payload[rng.randrange(len(payload))] = rng.randrange(256)
        yield method, bytes(payload)


@dataclass
class Verdicts:
    hung: int = 0
    unclear: int = 0  # UNKNOWN or INTERNAL: an exception the service did not handle
    leaked: int = 0  # a message with internal detail
    codes: dict[str, int] | None = None


def malformed(mesh: Launched, count: int) -> Outcome:
    """``count`` frames at the two gateways, one channel each; an accepted turn is read to its
    first frame and cancelled (a hostile client does not wait out 4,096 tokens)."""
    pids = {name: mesh.service(name)["pid"] for name in mesh.names()}
    verdicts = Verdicts(codes={})
    channels = [grpc.insecure_channel(addr) for addr in mesh.gateways()]
    try:
        for i, (method, payload) in enumerate(frames(count)):
            code, details = _call(channels[i % 2], mesh.key, method, payload)
            _judge_status(verdicts, code, details)
    finally:
        for channel in channels:
            channel.close()
    restarted = [n for n, pid in pids.items() if mesh.service(n)["pid"] != pid]
    outcome = Outcome(finished=True)
    outcome.failed_calls = verdicts.hung + verdicts.unclear + verdicts.leaked + len(restarted)
    outcome.note = (
        f"{count} frames, {verdicts.hung} hung, {verdicts.unclear} UNKNOWN/INTERNAL, "
        f"{verdicts.leaked} leaking, restarted: {restarted or 'none'}; statuses "
        + ", ".join(f"{k} {v}" for k, v in sorted((verdicts.codes or {}).items()))
    )
    return outcome


def _judge_status(verdicts: Verdicts, code: grpc.StatusCode, details: str) -> None:
    assert verdicts.codes is not None
    verdicts.codes[code.name] = verdicts.codes.get(code.name, 0) + 1
    verdicts.hung += code == grpc.StatusCode.DEADLINE_EXCEEDED
    verdicts.unclear += code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
    verdicts.leaked += bool(LEAK.search(details or ""))


def _call(
    channel: grpc.Channel, key: str, method: MethodDescriptor, payload: bytes
) -> tuple[grpc.StatusCode, str]:
    """The call's status (OK when answered), and its message. The payload goes out as raw
    bytes: no serializer, so that broken encodings reach the server as they are."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind = ("stream_" if method.client_streaming else "unary_") + (
        "stream" if method.server_streaming else "unary"
    )
    request: Any = iter([payload]) if method.client_streaming else payload
    try:
        call = getattr(channel, kind)(path)(
            request, metadata=(("x-api-key", key),), timeout=CALL_TIMEOUT_S
        )
        if method.server_streaming:
            return _first_frame(channel, key, call)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def _first_frame(channel: grpc.Channel, key: str, call: Any) -> tuple[grpc.StatusCode, str]:
    """Read one frame; a turn it accepted is cancelled (CancelTurn, then the call)."""
    first = next(call, None)
    if first is None:
        return call.code(), call.details() or ""
    turn_id = _accepted_turn(first)
    if turn_id:
        stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            stub.CancelTurn(
                gateway_pb2.CancelTurnRequest(turn_id=turn_id),
                metadata=(("x-api-key", key),),
                timeout=CALL_TIMEOUT_S,
            )
        except grpc.RpcError:
            pass  # the turn may have ended already
    call.cancel()
    return grpc.StatusCode.OK, ""


def _accepted_turn(raw: bytes) -> str:
    """The turn id of an ``accepted`` frame (StreamTurn's or Chat's), else ""."""
    for response_type in (gateway_pb2.StreamTurnResponse, gateway_pb2.ChatResponse):
        try:
            frame = response_type.FromString(raw)
        except Exception:  # noqa: BLE001 - not this type
            continue
        if frame.HasField("accepted") and frame.accepted.turn_id:
            return str(frame.accepted.turn_id)
    return ""
