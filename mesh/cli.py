"""``mesh``: chat with the mesh from a terminal, inspect it, and manage API keys.

    mesh chat [--conversation ID] [--max-tokens N] [--temperature T] [--seed S]
    mesh resume TURN_ID [--after N]
    mesh history [CONVERSATION_ID]
    mesh health [--state [FILE]]
    mesh keys create --tenant T [--expires-in 30d | --expires-at TIME] [--tokens-per-minute N]
        [--max-streams N] [--max-queued-turns N] [--rate-per-s R --burst B] [--file F]
    mesh keys list [--tenant T] [--file F]
    mesh keys revoke KEY_ID [--file F]
    mesh keys rotate KEY_ID [--expires-in D] [--old-expires-in D] [--file F]
    mesh certs init [--dir D] [--force]
    mesh certs issue NAME [--dns NAME]... [--ip IP]... [--days N] [--dir D]
    mesh certs rotate [NAME...] [--ca] [--days N] [--dir D]
    mesh certs list [--dir D]

The gateway address comes from ``--gateway`` or ``MESH_GATEWAY_ADDR`` (default
127.0.0.1:50051) and the key from ``--api-key`` or ``MESH_API_KEY``. A gateway serving TLS is
reached with ``--ca FILE`` (``MESH_GATEWAY_CA``: the CA bundle its certificate chains to) or
``--tls`` (the system's CAs). Failures print one line (the reason and what to do), never a
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import queue
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import grpc
from chat.common.v1 import common_pb2, conversation_pb2
from chat.gateway.v1 import gateway_pb2, gateway_service_pb2_grpc
from chat.persister.v1 import persister_pb2, persister_service_pb2_grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.auth import (
    API_KEY_HEADER,
    KeyFileError,
    KeyInfo,
    UnknownKeyError,
    add_key_to_file,
    default_keys_file,
    list_keys,
    revoke_key,
    rotate_key,
)
from mesh.certs import CertDir, default_cert_dir
from mesh.errors import MeshError, rich_status
from mesh.settings import default_state_dir
from mesh.tls import CertificateError, Identity, channel_credentials, load_identity

DEFAULT_GATEWAY = "127.0.0.1:50051"
# Where `mesh health` looks when no address is configured (docs/protocol.md's default ports).
SERVICE_ADDRS = (
    ("gateway", "MESH_GATEWAY_ADDR", "127.0.0.1:50051"),
    ("agent", "MESH_AGENT_ADDR", "127.0.0.1:50052"),
    ("memory", "MESH_MEMORY_ADDR", "127.0.0.1:50053"),
    ("persister", "MESH_PERSISTER_ADDR", "127.0.0.1:50054"),
)
# Credit granted back to the gateway after this many printed tokens (the Chat flow control).
CREDIT_BATCH = 32
# Reconnect attempts after a dropped stream before the turn is given up.
MAX_RECONNECTS = 5
# Errors after which resuming on a fresh stream can help.
TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
_FINISH_NOTES = {
    common_pb2.FINISH_REASON_LENGTH: "[stopped: max tokens reached]",
    common_pb2.FINISH_REASON_STOP_SEQUENCE: "",
    common_pb2.FINISH_REASON_CANCELLED: "[cancelled]",
    common_pb2.FINISH_REASON_ERROR: "[generation failed]",
}


class CliError(Exception):
    """A failure to report as one line (exit status 1)."""


# -- describing errors --------------------------------------------------------------------------


def describe_status(status: status_pb2.Status) -> str:
    """One readable line for a google.rpc.Status: reason, message and retry hint."""
    try:
        code = str(code_pb2.Code.Name(status.code))
    except ValueError:
        code = str(status.code)
    reason = ""
    retry = ""
    fields: list[str] = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
            reason = info.reason
            continue
        retry_info = error_details_pb2.RetryInfo()
        if detail.Is(retry_info.DESCRIPTOR) and detail.Unpack(retry_info):
            delay = retry_info.retry_delay.seconds + retry_info.retry_delay.nanos / 1e9
            retry = f" (retry in {delay:.1f}s)"
            continue
        bad = error_details_pb2.BadRequest()
        if detail.Is(bad.DESCRIPTOR) and detail.Unpack(bad):
            fields.extend(violation.field for violation in bad.field_violations)
    label = f"{reason} ({code})" if reason else code
    field_note = f" [field: {', '.join(fields)}]" if fields else ""
    return f"{label}: {status.message or 'no details'}{field_note}{retry}"


def describe_rpc_error(error: grpc.RpcError) -> str:
    """One readable line for a failed call, using its rich status when the server sent one."""
    status = rich_status(error)
    if status is not None:
        return describe_status(status)
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    name = code.name if isinstance(code, grpc.StatusCode) else "ERROR"
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"UNAVAILABLE: cannot reach the service ({details})"
    return f"{name}: {details or 'no details'}"


# -- the chat loop --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatOptions:
    conversation_id: str = ""
    max_tokens: int = 0
    temperature: float | None = None
    seed: int | None = None


class _Requests:
    """The client half of a Chat stream: frames queued here are sent by gRPC's sender thread."""

    def __init__(self) -> None:
        self._queue: queue.Queue[gateway_pb2.ChatRequest | None] = queue.Queue()

    def send(self, request: gateway_pb2.ChatRequest) -> None:
        self._queue.put(request)

    def close(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[gateway_pb2.ChatRequest]:
        while True:
            item = self._queue.get()
            if item is None:
                return
            yield item


class _Stream:
    """One open Chat stream."""

    def __init__(self, stub: Any, metadata: Sequence[tuple[str, str]]) -> None:
        self.requests = _Requests()
        self.responses: Iterator[gateway_pb2.ChatResponse] = stub.Chat(
            iter(self.requests), metadata=metadata
        )

    def close(self) -> None:
        self.requests.close()
        cancel = getattr(self.responses, "cancel", None)
        if cancel is not None:
            cancel()


class _TurnInterrupted(Exception):
    """The user gave up waiting for a cancelled turn (a second Ctrl-C)."""


class ChatApp:
    """Interactive chat over one Chat stream, reconnecting and resuming when it drops."""

    def __init__(
        self,
        connect: Callable[[], grpc.Channel],
        *,
        api_key: str,
        options: ChatOptions,
        read_line: Callable[[str], str] = input,
        out: TextIO = sys.stdout,
        err: TextIO = sys.stderr,
        handle_sigint: bool = True,
    ) -> None:
        # A fresh channel per reconnect: an old one may sit in its own reconnect backoff.
        self._connect = connect
        self._channel: grpc.Channel | None = None
        self._metadata = ((API_KEY_HEADER, api_key),)
        self._options = options
        self._conversation_id = options.conversation_id
        self._read_line = read_line
        self._out = out
        self._err = err
        self._handle_sigint = (
            handle_sigint and threading.current_thread() is threading.main_thread()
        )
        self._stream: _Stream | None = None
        self._interrupts = 0
        self._cancel_sent = False
        self.last_turn_id = ""

    @property
    def conversation_id(self) -> str:
        return self._conversation_id

    def run(self) -> int:
        self._note(
            "Chatting with the mesh. /new starts a new conversation, /quit (or Ctrl-D) exits."
        )
        try:
            while True:
                try:
                    line = self._read_line("you> ")
                except (EOFError, KeyboardInterrupt):
                    self._out.write("\n")
                    return 0
                text = line.strip()
                if not text:
                    continue
                if text in ("/quit", "/exit"):
                    return 0
                if text == "/new":
                    self._conversation_id = ""
                    self._note("(new conversation)")
                    continue
                if text == "/help":
                    self._note("/new: new conversation  /quit: exit  Ctrl-C: cancel the answer")
                    continue
                self.turn(line)
        finally:
            self.close()

    def _note(self, message: str) -> None:
        self._err.write(message + "\n")
        self._err.flush()

    def _open_stream(self) -> _Stream:
        if self._stream is None:
            if self._channel is None:
                self._channel = self._connect()
            self._stream = _Stream(_stub(self._channel), self._metadata)
        return self._stream

    def _close_stream(self, *, reconnect: bool = False) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if reconnect and self._channel is not None:
            self._channel.close()
            self._channel = None

    def close(self) -> None:
        self._close_stream(reconnect=True)

    def _start_request(self, text: str, request_id: str) -> gateway_pb2.ChatRequest:
        options = common_pb2.GenerationOptions(max_tokens=self._options.max_tokens)
        if self._options.temperature is not None:
            options.temperature = self._options.temperature
        if self._options.seed is not None:
            options.seed = self._options.seed
        return gateway_pb2.ChatRequest(
            start=gateway_pb2.StartTurn(
                conversation_id=self._conversation_id,
                text=text,
                options=options,
                request_id=request_id,
            )
        )

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if not self.interrupt():
            raise _TurnInterrupted()

    def interrupt(self) -> bool:
        """What Ctrl-C does during a turn.

        The first call cancels the turn and returns True; later ones return False, meaning the
        user wants to stop waiting for the cancelled turn.
        """
        self._interrupts += 1
        if self._interrupts > 1:
            return False
        stream = self._stream
        if stream is not None:
            # The turn then ends with FINISH_REASON_CANCELLED from the agent.
            stream.requests.send(
                gateway_pb2.ChatRequest(cancel=gateway_pb2.CancelTurn(turn_id=self.last_turn_id))
            )
            self._cancel_sent = True
        return True

    def turn(self, text: str) -> bool:
        """Send one message and print the answer; True if the turn finished."""
        request_id = uuid.uuid4().hex
        self._interrupts = 0
        self._cancel_sent = False
        self.last_turn_id = ""
        previous = None
        if self._handle_sigint:
            previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            return self._turn(text, request_id)
        except _TurnInterrupted:
            # The stream still carries the abandoned turn; a fresh one starts clean.
            self._close_stream()
            self._out.write("\n")
            self._note("[stopped waiting]")
            return False
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _turn(self, text: str, request_id: str) -> bool:
        last_seq = 0
        printed_since_credit = 0
        showing_queue = False
        reconnects = 0
        attached = False
        stream = self._open_stream()
        stream.requests.send(self._start_request(text, request_id))
        while True:
            try:
                for response in stream.responses:
                    kind = response.WhichOneof("frame")
                    if kind == "token":
                        token = response.token
                        if token.seq <= last_seq:
                            continue
                        if showing_queue:
                            self._clear_queue_note()
                            showing_queue = False
                        self._out.write(token.text)
                        self._out.flush()
                        last_seq = token.seq
                        printed_since_credit += 1
                        if printed_since_credit >= CREDIT_BATCH:
                            stream.requests.send(
                                gateway_pb2.ChatRequest(
                                    credit=gateway_pb2.FlowCredit(tokens=printed_since_credit)
                                )
                            )
                            printed_since_credit = 0
                        reconnects = 0
                    elif kind == "accepted":
                        accepted = response.accepted
                        attached = True
                        self.last_turn_id = accepted.turn_id
                        self._conversation_id = accepted.conversation_id
                        if self._interrupts and not self._cancel_sent:
                            # Ctrl-C came before the turn had an id: cancel it now.
                            stream.requests.send(
                                gateway_pb2.ChatRequest(
                                    cancel=gateway_pb2.CancelTurn(turn_id=accepted.turn_id)
                                )
                            )
                            self._cancel_sent = True
                        if accepted.queue_position > 0 and last_seq == 0:
                            self._show_queue_note(accepted.queue_position)
                            showing_queue = True
                        elif showing_queue:
                            self._clear_queue_note()
                            showing_queue = False
                    elif kind == "finished":
                        if showing_queue:
                            self._clear_queue_note()
                        self._out.write("\n")
                        self._out.flush()
                        note = _FINISH_NOTES.get(response.finished.finish_reason, "")
                        if note:
                            self._note(note)
                        return True
                    elif kind == "error":
                        if last_seq:
                            self._out.write("\n")
                        self._note("error: " + describe_status(response.error.status))
                        if not attached:
                            return False  # the start (or resume) itself was refused
                        # Otherwise the turn goes on (a cancel that failed, an agent error
                        # followed by its TurnFinished).
                # The server ended the stream without finishing the turn (it is draining).
                raise _Dropped("the gateway closed the stream")
            except (grpc.RpcError, _Dropped) as error:
                if isinstance(error, grpc.RpcError):
                    code = error.code() if hasattr(error, "code") else None
                    if code not in TRANSIENT or (
                        code == grpc.StatusCode.CANCELLED and self._stream is None
                    ):
                        self._close_stream()
                        if last_seq:
                            self._out.write("\n")
                        self._note("error: " + describe_rpc_error(error))
                        return False
                    reason = describe_rpc_error(error)
                else:
                    reason = str(error)
                reconnects += 1
                self._close_stream(reconnect=True)
                if reconnects > MAX_RECONNECTS:
                    if last_seq:
                        self._out.write("\n")
                    self._note(f"error: connection lost ({reason}); gave up after retries")
                    if self.last_turn_id:
                        self._note(
                            f"resume later with: mesh resume {self.last_turn_id} --after {last_seq}"
                        )
                    return False
                time.sleep(min(0.25 * 2 ** (reconnects - 1), 4.0))
                stream = self._open_stream()
                attached = False
                if self.last_turn_id:
                    # Resume with the last seq printed: nothing is lost, nothing repeats.
                    stream.requests.send(
                        gateway_pb2.ChatRequest(
                            resume=gateway_pb2.ResumeTurn(
                                turn_id=self.last_turn_id, after_seq=last_seq
                            )
                        )
                    )
                else:
                    # Not accepted yet: the same request_id lets the gateway dedupe the retry.
                    stream.requests.send(self._start_request(text, request_id))
                printed_since_credit = 0

    def _show_queue_note(self, position: int) -> None:
        ahead = "turn" if position == 1 else "turns"
        self._err.write(f"\r[queued: {position} {ahead} ahead]")
        self._err.flush()

    def _clear_queue_note(self) -> None:
        self._err.write("\r\033[K")
        self._err.flush()


class _Dropped(Exception):
    """The stream ended before the turn did."""


# -- other commands -------------------------------------------------------------------------------


def _stub(channel: grpc.Channel) -> Any:
    return gateway_service_pb2_grpc.GatewayServiceStub(channel)  # type: ignore[no-untyped-call]


def resume(
    stub: Any, *, api_key: str, turn_id: str, after_seq: int, out: TextIO, err: TextIO
) -> int:
    # A replay of a finished turn is all on the log: coalesced, it comes in a few frames.
    responses = stub.ResumeTurn(
        gateway_pb2.ResumeTurnRequest(turn_id=turn_id, after_seq=after_seq, coalesce_tokens=True),
        metadata=((API_KEY_HEADER, api_key),),
    )
    for response in responses:
        kind = response.WhichOneof("frame")
        if kind == "token":
            out.write(response.token.text)
            out.flush()
        elif kind == "token_run":
            out.write("".join(response.token_run.texts))
            out.flush()
        elif kind == "accepted" and response.accepted.queue_position > 0:
            err.write(f"[queued: {response.accepted.queue_position} ahead]\n")
        elif kind == "finished":
            out.write("\n")
            note = _FINISH_NOTES.get(response.finished.finish_reason, "")
            if note:
                err.write(note + "\n")
            err.write(f"[last seq {response.finished.last_seq}]\n")
            return 0
    return 0


def _format_time(message: Any) -> str:
    if not message.seconds and not message.nanos:
        return "-"
    return str(message.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"))


def history(
    stub: Any,
    *,
    api_key: str,
    conversation_id: str,
    page_size: int,
    page_token: str,
    out: TextIO,
    err: TextIO,
) -> int:
    metadata = ((API_KEY_HEADER, api_key),)
    if conversation_id:
        reply = stub.GetConversation(
            gateway_pb2.GetConversationRequest(conversation_id=conversation_id),
            metadata=metadata,
        )
        conversation = reply.conversation
        out.write(f"# {conversation.title or conversation.conversation_id}\n")
        for message in conversation.messages:
            who = "you" if message.role == conversation_pb2.ROLE_USER else "assistant"
            out.write(f"{who}> {message.text}\n")
        return 0
    reply = stub.ListConversations(
        gateway_pb2.ListConversationsRequest(page_size=page_size, page_token=page_token),
        metadata=metadata,
    )
    if not reply.conversations:
        err.write("no conversations\n")
    for conversation in reply.conversations:
        out.write(
            f"{conversation.conversation_id}  {_format_time(conversation.update_time)}  "
            f"{conversation.title}\n"
        )
    if reply.next_page_token:
        err.write(f"more: mesh history --page-token {reply.next_page_token}\n")
    return 0


def gateway_channel(
    addr: str, *, ca: Path | None = None, tls: bool = False, server_name: str = ""
) -> grpc.Channel:
    """A channel to the gateway's public port: TLS when ``ca`` (or ``tls``: system CAs) is set.

    Raises:
        CliError: the CA file cannot be read.
    """
    if ca is None and not tls:
        return grpc.insecure_channel(addr)
    roots = None
    if ca is not None:
        try:
            roots = ca.read_bytes()
        except OSError as error:
            raise CliError(f"cannot read the CA file {ca}: {error.strerror}") from None
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(addr, grpc.ssl_channel_credentials(roots), options=options)


def started_services(state_file: Path) -> dict[str, str]:
    """Name -> address of every service `make up` started, from the mesh.json it wrote."""
    try:
        described = json.loads(state_file.read_text())
        services = described["services"]
        return {str(name): str(info["addr"]) for name, info in services.items()}
    except FileNotFoundError:
        raise CliError(f"{state_file} does not exist: is a mesh running (`make up`)?") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CliError(f"{state_file} is not a mesh description: {error}") from None


def health_addresses(
    environ: Mapping[str, str],
    gateway: str | None,
    extra: Sequence[str],
    state_file: Path | None = None,
) -> list[tuple[str, str]]:
    """Every service address to probe: the services in ``state_file`` if given, else the
    defaults/env and ``--gateway``; then NAME=ADDR pairs."""
    if state_file is not None:
        targets = started_services(state_file)
    else:
        targets = {name: environ.get(var) or default for name, var, default in SERVICE_ADDRS}
        if gateway:
            targets["gateway"] = gateway
    for item in extra:
        name, sep, addr = item.partition("=")
        if not sep or not name or not addr:
            raise CliError(f"--service expects NAME=HOST:PORT, got {item!r}")
        targets[name] = addr
    return list(targets.items())


# Each kind's readiness name (docs/reliability.md): "" is liveness, these say "can do its job".
READINESS_NAMES = {
    "gateway": "chat.gateway.v1.GatewayService",
    "agent": "chat.agent.v1.AgentService",
    "memory": "chat.memory.v1.MemoryService",
    "persister": "chat.persister.v1.PersisterService",
}


def _readiness_name(target: str) -> str | None:
    """The readiness name of a target called ``gateway``, ``agent-2``, ... (None if unknown)."""
    kind = target.rstrip("0123456789").rstrip("-")
    return READINESS_NAMES.get(kind)


def _ready(stub: health_pb2_grpc.HealthStub, name: str | None, timeout_s: float) -> bool:
    """False only when the service says its readiness name is NOT_SERVING."""
    if name is None:
        return True
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=timeout_s)
    except grpc.RpcError:
        return True  # not that kind of service after all: liveness is all there is to say
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def started_tls(state_file: Path) -> tuple[Identity | None, bool]:
    """The operator identity in a mesh.json (None: plaintext mesh) and whether its gateways
    serve TLS."""
    try:
        tls = json.loads(state_file.read_text()).get("tls") or {}
        if not tls:
            return None, False
        identity = load_identity(
            Path(tls["MESH_TLS_CA"]), Path(tls["MESH_TLS_CERT"]), Path(tls["MESH_TLS_KEY"])
        )
        return identity, bool(tls.get("edge"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CliError(f"{state_file}: no usable TLS identity: {error}") from None


def _health_channel(
    name: str, addr: str, identity: Identity | None, edge_ca: bytes | None
) -> grpc.Channel:
    kind = name.split("-")[0]
    if kind == "gateway" or kind == "envoy" or identity is None:
        if edge_ca is None or kind not in ("gateway", "envoy"):
            return grpc.insecure_channel(addr)
        return grpc.secure_channel(addr, grpc.ssl_channel_credentials(edge_ca))
    # The services take mutual TLS only: present our certificate, check theirs names them.
    return grpc.secure_channel(
        addr,
        channel_credentials(identity),
        options=[("grpc.ssl_target_name_override", kind)],
    )


def health(
    targets: Sequence[tuple[str, str]],
    *,
    timeout_s: float,
    out: TextIO,
    identity: Identity | None = None,
    edge_ca: bytes | None = None,
) -> int:
    """grpc.health.v1 Check of each address, liveness ("") and then readiness (the service's
    name); exit 1 unless every one is SERVING. A live service that is not ready (a dependency
    down) shows as NOT_READY.

    With ``identity`` the internal services are checked over mutual TLS; with ``edge_ca`` the
    gateway over TLS.
    """
    worst = 0
    width = max(len(name) for name, _ in targets)
    for name, addr in targets:
        try:
            with _health_channel(name, addr, identity, edge_ca) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
                state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                if state == "SERVING" and not _ready(stub, _readiness_name(name), timeout_s):
                    state = "NOT_READY"
        except grpc.RpcError as error:
            code = error.code() if hasattr(error, "code") else None
            state = "UNREACHABLE" if code in (None, grpc.StatusCode.UNAVAILABLE) else code.name
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                state = "TIMEOUT"
        if state != "SERVING":
            worst = 1
        out.write(f"{name:<{width}}  {addr:<21}  {state}\n")
    return worst


def erase(
    channel: grpc.Channel,
    *,
    tenant_id: str,
    conversation_id: str,
    force: bool,
    timeout_s: float,
    out: TextIO,
) -> int:
    """``mesh erase``: the persister's ``EraseTenant``, or ``DeleteConversation`` with one."""
    if not tenant_id:
        raise CliError("--tenant is required (and may not be empty)")
    stub: Any = persister_service_pb2_grpc.PersisterServiceStub(channel)  # type: ignore[no-untyped-call]
    if conversation_id:
        reply = stub.DeleteConversation(
            persister_pb2.DeleteConversationRequest(
                tenant_id=tenant_id, conversation_id=conversation_id, force=force
            ),
            timeout=timeout_s,
        )
        what = f"conversation {conversation_id} of tenant {tenant_id}"
        if reply.already_deleted:
            what += " (already deleted before)"
    else:
        reply = stub.EraseTenant(
            persister_pb2.EraseTenantRequest(tenant_id=tenant_id), timeout=timeout_s
        )
        what = f"tenant {tenant_id}"
    c = reply.counts
    out.write(
        f"erased {what}: {c.conversations} conversations, {c.messages} messages, "
        f"{c.tokens} tokens, {c.chunks} memory chunks. Log records go with the log's "
        "retention (MESH_LOG_RETENTION_HOURS).\n"
    )
    return 0


def persister_address(
    environ: Mapping[str, str], given: str | None, state_file: Path | None
) -> str:
    """--persister, else the persister in a mesh.json, else MESH_PERSISTER_ADDR or the default."""
    if given:
        return given
    if state_file is not None:
        started = started_services(state_file)
        for name, addr in started.items():
            if name.split("-")[0] == "persister":
                return addr
        raise CliError(f"{state_file} lists no persister")
    return environ.get("MESH_PERSISTER_ADDR") or "127.0.0.1:50054"


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``12h``, ``30d`` or ``2w`` in seconds (argparse type)."""
    value = text.strip().lower()
    unit = _DURATION_UNITS.get(value[-1:]) if value else None
    try:
        amount = float(value[:-1]) if unit else float("nan")
    except ValueError:
        amount = float("nan")
    if unit is None or not amount > 0 or amount == float("inf"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: a positive number with s, m, h, d or w, like 30d"
        )
    return amount * unit


def parse_time(text: str) -> float:
    """An ISO 8601 time (UTC when it has no offset) in seconds since the epoch."""
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: use ISO 8601, like 2026-07-01T00:00:00+00:00"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _expiry(args: argparse.Namespace, now: float) -> float | None:
    if getattr(args, "expires_at", None) is not None:
        expires = float(args.expires_at)
        if expires <= now:
            raise CliError("--expires-at is in the past: the key would never work")
        return expires
    if getattr(args, "expires_in", None) is not None:
        return now + float(args.expires_in)
    return None


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def keys_create(
    path: Path,
    tenant: str,
    rate_per_s: float | None,
    burst: int | None,
    out: TextIO,
    err: TextIO,
    *,
    expires_at: float | None = None,
    tokens_per_minute: int | None = None,
    max_streams: int | None = None,
    max_queued_turns: int | None = None,
) -> int:
    key = add_key_to_file(
        path,
        tenant,
        rate_per_s=rate_per_s,
        burst=burst,
        expires_at=expires_at,
        tokens_per_minute=tokens_per_minute,
        max_streams=max_streams,
        max_queued_turns=max_queued_turns,
    )
    out.write(key + "\n")
    out.flush()
    until = f", valid until {_when(expires_at)}" if expires_at is not None else ""
    err.write(
        f"created an API key for tenant {tenant!r}{until}; only its hash is stored in {path}. "
        "It is shown once: keep it now.\n"
    )
    return 0


def keys_list(path: Path, tenant: str | None, out: TextIO, *, now: float | None = None) -> int:
    """One line per key: its id, tenant, dates and state; never the key."""
    now = time.time() if now is None else now
    infos = [info for info in list_keys(path) if tenant is None or info.tenant_id == tenant]
    out.write(f"{'KEY ID':<12}  {'TENANT':<20}  {'CREATED':<20}  {'EXPIRES':<20}  STATE    RATE\n")
    for info in infos:
        state = "expired" if info.expires_at is not None and info.expires_at <= now else "active"
        rate = "-" if info.rate_per_s is None else f"{info.rate_per_s:g}/s"
        if info.burst is not None:
            rate += f" burst {info.burst}"
        if info.tokens_per_minute is not None:
            rate += f" {info.tokens_per_minute} tokens/min"
        if info.max_streams is not None:
            rate += f" {info.max_streams} streams"
        if info.max_queued_turns is not None:
            rate += f" {info.max_queued_turns} queued turns"
        out.write(
            f"{info.key_id:<12}  {info.tenant_id:<20}  {_when(info.created_at):<20}  "
            f"{_when(info.expires_at):<20}  {state:<7}  {rate}\n"
        )
    return 0


def _describe(info: KeyInfo) -> str:
    return f"key {info.key_id} of tenant {info.tenant_id!r}"


def keys_revoke(path: Path, key_id: str, err: TextIO) -> int:
    info = revoke_key(path, key_id)
    err.write(
        f"revoked {_describe(info)}; gateways refuse it within seconds, on open streams too.\n"
    )
    return 0


def keys_rotate(
    path: Path,
    key_id: str,
    expires_at: float | None,
    old_expires_at: float | None,
    out: TextIO,
    err: TextIO,
) -> int:
    key, info = rotate_key(path, key_id, expires_at=expires_at, old_expires_at=old_expires_at)
    out.write(key + "\n")
    out.flush()
    old = key_id.strip().lower()
    if old_expires_at is not None:
        then = f"the old key {old} stops working at {_when(old_expires_at)}"
    else:
        then = f"the old key {old} works until `mesh keys revoke {old}`"
    err.write(f"created {_describe(info)} (shown once: keep it now); move clients to it, {then}.\n")
    return 0


def run_keys(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    now = time.time()
    if args.keys_command == "list":
        return keys_list(args.file, args.tenant, out, now=now)
    if args.keys_command == "revoke":
        return keys_revoke(args.file, args.key_id, err)
    if args.keys_command == "rotate":
        old = None if args.old_expires_in is None else now + float(args.old_expires_in)
        return keys_rotate(args.file, args.key_id, _expiry(args, now), old, out, err)
    return keys_create(
        args.file,
        args.tenant,
        args.rate_per_s,
        args.burst,
        out,
        err,
        expires_at=_expiry(args, now),
        tokens_per_minute=args.tokens_per_minute,
        max_streams=args.max_streams,
        max_queued_turns=args.max_queued_turns,
    )


# -- arguments ------------------------------------------------------------------------------------


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mesh", description="Chat with the llm-mesh and manage it."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--gateway",
        default=environ.get("MESH_GATEWAY_ADDR") or DEFAULT_GATEWAY,
        help="gateway address (env MESH_GATEWAY_ADDR, default %(default)s)",
    )
    client.add_argument(
        "--api-key",
        default=environ.get("MESH_API_KEY", ""),
        help="API key (env MESH_API_KEY)",
    )
    client.add_argument(
        "--ca",
        type=Path,
        default=Path(environ["MESH_GATEWAY_CA"]) if environ.get("MESH_GATEWAY_CA") else None,
        help="TLS to the gateway, trusting this CA bundle (env MESH_GATEWAY_CA)",
    )
    client.add_argument(
        "--tls",
        action="store_true",
        default=(environ.get("MESH_GATEWAY_TLS", "").lower() in ("1", "true", "yes", "on")),
        help="TLS to the gateway, trusting the system's CAs (env MESH_GATEWAY_TLS=1)",
    )
    client.add_argument(
        "--server-name",
        default=environ.get("MESH_GATEWAY_SERVER_NAME", ""),
        help="the name the gateway's certificate must carry, when not the address's host",
    )

    chat = sub.add_parser("chat", parents=[client], help="interactive chat in the terminal")
    chat.add_argument("--conversation", default="", help="continue this conversation")
    chat.add_argument("--max-tokens", type=int, default=0, help="most tokens per answer")
    chat.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    chat.add_argument("--seed", type=int, default=None, help="sampling seed")

    resume_cmd = sub.add_parser("resume", parents=[client], help="stream a turn's answer again")
    resume_cmd.add_argument("turn_id", metavar="TURN_ID")
    resume_cmd.add_argument(
        "--after", type=int, default=0, metavar="N", help="skip tokens up to seq N"
    )

    history_cmd = sub.add_parser(
        "history", parents=[client], help="list conversations, or show one"
    )
    history_cmd.add_argument("conversation_id", nargs="?", default="", metavar="CONVERSATION_ID")
    history_cmd.add_argument("--page-size", type=int, default=0)
    history_cmd.add_argument("--page-token", default="")

    health_cmd = sub.add_parser("health", help="grpc.health.v1 check of every service")
    health_cmd.add_argument("--gateway", default=None, help="gateway address to check")
    health_cmd.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="NAME=ADDR",
        help="check another (or override a) service address",
    )
    health_cmd.add_argument(
        "--state",
        nargs="?",
        type=Path,
        const=default_state_dir(environ) / "mesh.json",
        default=None,
        metavar="FILE",
        help="check every service `make up` started, as listed in FILE "
        "(default: $MESH_STATE_DIR/mesh.json)",
    )
    health_cmd.add_argument("--timeout", type=float, default=2.0, help="seconds per check")
    health_cmd.add_argument(
        "--ca", type=Path, default=None, help="CA bundle (else MESH_TLS_CA, or --state's)"
    )
    health_cmd.add_argument("--cert", type=Path, default=None, help="else MESH_TLS_CERT")
    health_cmd.add_argument("--key", type=Path, default=None, help="else MESH_TLS_KEY")

    erase_cmd = sub.add_parser(
        "erase",
        help="erase a tenant's (or one conversation's) text from PostgreSQL and memory",
        description="Deletes the rows at once and leaves a tombstone, then has memory forget; "
        "the logs' copies go within the log retention (MESH_LOG_RETENTION_HOURS). Calls the "
        "persister with the operator certificate (mutual TLS).",
    )
    erase_cmd.add_argument("--tenant", required=True, help="the tenant")
    erase_cmd.add_argument("--conversation", default="", help="only this conversation")
    erase_cmd.add_argument(
        "--force",
        action="store_true",
        help="with --conversation: erase even while one of its turns runs (a whole tenant is "
        "always erased that way)",
    )
    erase_cmd.add_argument(
        "--persister", default=None, help="persister address (else --state, env, default)"
    )
    erase_cmd.add_argument(
        "--state",
        nargs="?",
        type=Path,
        const=default_state_dir(environ) / "mesh.json",
        default=None,
        metavar="FILE",
        help="the persister and operator identity `make up` started, from FILE",
    )
    erase_cmd.add_argument("--timeout", type=float, default=60.0, help="seconds")
    erase_cmd.add_argument(
        "--ca", type=Path, default=None, help="CA bundle (else MESH_TLS_CA, or --state's)"
    )
    erase_cmd.add_argument("--cert", type=Path, default=None, help="else MESH_TLS_CERT")
    erase_cmd.add_argument("--key", type=Path, default=None, help="else MESH_TLS_KEY")

    certs = sub.add_parser("certs", help="the project CA and the services' certificates")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    cert_dir = argparse.ArgumentParser(add_help=False)
    cert_dir.add_argument(
        "--dir",
        type=Path,
        default=(
            Path(environ["MESH_CERTS_DIR"])
            if environ.get("MESH_CERTS_DIR")
            else default_cert_dir(default_state_dir(environ))
        ),
        help="certificates directory (env MESH_CERTS_DIR, default %(default)s)",
    )
    init = certs_sub.add_parser("init", parents=[cert_dir], help="create the project CA")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    issue = certs_sub.add_parser(
        "issue", parents=[cert_dir], help="issue (or reissue) a service's certificate"
    )
    issue.add_argument("name", metavar="NAME", help="gateway, agent, memory, persister, operator")
    issue.add_argument("--dns", action="append", default=[], help="another DNS name (repeat)")
    issue.add_argument("--ip", action="append", default=[], help="another IP address (repeat)")
    issue.add_argument("--days", type=int, default=None, help="validity (default 90)")
    rotate_certs = certs_sub.add_parser(
        "rotate",
        parents=[cert_dir],
        help="reissue certificates with new keys; running services pick them up",
    )
    rotate_certs.add_argument("names", nargs="*", metavar="NAME", help="default: all")
    rotate_certs.add_argument(
        "--ca", action="store_true", help="replace the CA too (the old one stays trusted)"
    )
    rotate_certs.add_argument("--days", type=int, default=None, help="validity (default 90)")
    certs_sub.add_parser("list", parents=[cert_dir], help="the certificates and their expiry")

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    key_file = argparse.ArgumentParser(add_help=False)
    key_file.add_argument(
        "--file",
        type=Path,
        default=default_keys_file(environ),
        help="keys file (env MESH_GATEWAY_API_KEYS_FILE, default %(default)s)",
    )
    expiry = argparse.ArgumentParser(add_help=False)
    when = expiry.add_mutually_exclusive_group()
    when.add_argument(
        "--expires-in", type=parse_duration, default=None, metavar="D", help="valid for D (30d)"
    )
    when.add_argument(
        "--expires-at", type=parse_time, default=None, metavar="TIME", help="valid until TIME"
    )
    create = keys_sub.add_parser(
        "create",
        parents=[key_file, expiry],
        help="create a key; prints it once, stores its hash",
    )
    create.add_argument("--tenant", required=True)
    create.add_argument("--rate-per-s", type=float, default=None, help="own turn rate limit")
    create.add_argument("--burst", type=int, default=None, help="own burst")
    create.add_argument(
        "--tokens-per-minute",
        type=int,
        default=None,
        metavar="N",
        help="own budget of generated tokens per minute, on top of the tenant's",
    )
    create.add_argument(
        "--max-streams",
        type=int,
        default=None,
        metavar="N",
        help="most streams the key may hold open per gateway, on top of the tenant's limit",
    )
    create.add_argument(
        "--max-queued-turns",
        type=int,
        default=None,
        metavar="N",
        help="most unfinished turns the key may hold on all partitions together, on top of the "
        "tenant's share",
    )
    listing = keys_sub.add_parser("list", parents=[key_file], help="list keys (ids, never keys)")
    listing.add_argument("--tenant", default=None, help="only this tenant's keys")
    revoke = keys_sub.add_parser("revoke", parents=[key_file], help="revoke a key by its id")
    revoke.add_argument("key_id", metavar="KEY_ID", help="id from `mesh keys list`")
    rotate = keys_sub.add_parser(
        "rotate",
        parents=[key_file, expiry],
        help="a new key for the same tenant; the old one works until revoked",
    )
    rotate.add_argument("key_id", metavar="KEY_ID", help="id of the key being replaced")
    rotate.add_argument(
        "--old-expires-in",
        type=parse_duration,
        default=None,
        metavar="D",
        help="also let the old key expire after D (a grace period for clients to switch)",
    )
    return parser


def _health_tls(
    args: argparse.Namespace, environ: Mapping[str, str]
) -> tuple[Identity | None, bytes | None]:
    """The identity `mesh health` presents to the services, and the gateway's CA if TLS."""
    paths = [
        args.ca or environ.get("MESH_TLS_CA"),
        args.cert or environ.get("MESH_TLS_CERT"),
        args.key or environ.get("MESH_TLS_KEY"),
    ]
    if all(paths):
        return load_identity(*(Path(str(p)) for p in paths)), None
    if any(paths):
        raise CliError("--ca, --cert and --key (or MESH_TLS_CA/CERT/KEY) go together")
    if args.state is not None:
        started, edge = started_tls(args.state)
        return started, (started.ca_pem if started is not None and edge else None)
    return None, None


def run_certs(args: argparse.Namespace, out: TextIO) -> int:
    """``mesh certs init | issue | rotate | list``."""
    certs = CertDir(args.dir)
    if args.certs_command == "init":
        if not certs.init(force=args.force):
            raise CliError(
                f"a CA already exists in {certs.path}; `mesh certs rotate --ca` replaces it "
                "without breaking running services (--force starts over)"
            )
        out.write(f"created the CA: {certs.ca_cert} (key {certs.ca_key}, keep it private)\n")
        out.write(f"next: mesh certs issue <service> --dir {certs.path}\n")
        return 0
    days = {} if getattr(args, "days", None) is None else {"days": args.days}
    if args.certs_command == "issue":
        path = certs.issue(args.name, dns=args.dns, ips=args.ip, **days)
        out.write(f"{certs.describe(args.name)}\n")
        out.write(
            f"MESH_TLS_CA={certs.ca_cert} MESH_TLS_CERT={path} "
            f"MESH_TLS_KEY={certs.key(args.name)}\n"
        )
        return 0
    if args.certs_command == "rotate":
        names = certs.rotate(args.names, ca=args.ca, **days)
        for name in names:
            out.write(f"reissued {certs.describe(name)}\n")
        out.write("running services load the new files within seconds; open streams carry on\n")
        return 0
    if not certs.exists():
        raise CliError(f"no CA in {certs.path}: `mesh certs init` creates one")
    for name in certs.issued():
        out.write(f"{certs.describe(name)}\n")
    return 0


def _require_key(args: argparse.Namespace) -> str:
    if not args.api_key:
        raise CliError(
            "no API key: pass --api-key or set MESH_API_KEY (create one with "
            "`mesh keys create --tenant NAME`)"
        )
    return str(args.api_key)


def _readline_input(prompt: str) -> str:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - line editing and history for input()
    return input(prompt)


def main(
    argv: Sequence[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    environ = os.environ if environ is None else environ
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser(environ).parse_args(argv)
    try:
        if args.command == "keys":
            return run_keys(args, out, err)
        if args.command == "certs":
            return run_certs(args, out)
        if args.command == "health":
            targets = health_addresses(environ, args.gateway, args.service, args.state)
            identity, edge_ca = _health_tls(args, environ)
            return health(
                targets, timeout_s=args.timeout, out=out, identity=identity, edge_ca=edge_ca
            )
        if args.command == "erase":
            identity, _ = _health_tls(args, environ)
            addr = persister_address(environ, args.persister, args.state)
            with _health_channel("persister", addr, identity, None) as channel:
                return erase(
                    channel,
                    tenant_id=args.tenant,
                    conversation_id=args.conversation,
                    force=args.force,
                    timeout_s=args.timeout,
                    out=out,
                )
        api_key = _require_key(args)
        if args.command == "chat":
            if args.max_tokens < 0:
                raise CliError("--max-tokens must be >= 0")
            gateway = args.gateway
            app = ChatApp(
                functools.partial(
                    gateway_channel, gateway, ca=args.ca, tls=args.tls, server_name=args.server_name
                ),
                api_key=api_key,
                options=ChatOptions(
                    args.conversation, args.max_tokens, args.temperature, args.seed
                ),
                read_line=_readline_input,
                out=out,
                err=err,
            )
            return app.run()
        with gateway_channel(
            args.gateway, ca=args.ca, tls=args.tls, server_name=args.server_name
        ) as channel:
            stub = _stub(channel)
            if args.command == "resume":
                return resume(
                    stub,
                    api_key=api_key,
                    turn_id=args.turn_id,
                    after_seq=args.after,
                    out=out,
                    err=err,
                )
            return history(
                stub,
                api_key=api_key,
                conversation_id=args.conversation_id,
                page_size=args.page_size,
                page_token=args.page_token,
                out=out,
                err=err,
            )
    except grpc.RpcError as error:
        err.write("error: " + describe_rpc_error(error) + "\n")
        return 1
    except (
        CliError,
        KeyFileError,
        UnknownKeyError,
        MeshError,
        CertificateError,
        OSError,
    ) as error:
        err.write(f"error: {error}\n")
        return 1
    except KeyboardInterrupt:
        err.write("\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
