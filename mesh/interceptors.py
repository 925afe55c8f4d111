"""Server interceptors shared by every service: domain errors to statuses, RPC metrics, spans.

Errors and metrics wrap the four handler shapes the same way, through ``wrap_handler`` (the
gateway's auth interceptor uses it too); spans wrap unary handlers only.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc import aio
from opentelemetry.trace import SpanKind, Status, StatusCode

from mesh import metrics, tracing
from mesh.errors import InvalidArgument, MeshError, to_grpc_status

log = logging.getLogger(__name__)

# Called around every RPC: (method, context, run) -> result; ``run`` runs the handler.
Around = Callable[[str, aio.ServicerContext[Any, Any], Callable[[], Any]], Any]


def _method_name(full: str) -> tuple[str, str]:
    service, _, method = full.rpartition("/")
    return service.lstrip("/").rsplit(".", 1)[-1], method


# grpc's stubs type method handlers for the sync server; under grpc.aio the same objects hold
# coroutine functions, so handlers and continuations are typed as Any here.
Handler = Any


Unary = Callable[[Callable[[], Awaitable[Any]], aio.ServicerContext[Any, Any]], Awaitable[Any]]
Streaming = Callable[
    [Callable[[], AsyncIterator[Any]], aio.ServicerContext[Any, Any]], AsyncIterator[Any]
]


class Undecodable:
    """A request grpc could not decode, handed on in its place. grpc.aio itself would answer
    UNKNOWN with the decoder's exception in the message; ErrorInterceptor answers
    INVALID_ARGUMENT instead, naming only the expected message type."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)  # ``Message.FromString``: its class
    type_name = owner.DESCRIPTOR.full_name if owner is not None else "request"

    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError:
            return Undecodable(type_name)

    return decode


def _refused(request: Undecodable) -> InvalidArgument:
    return InvalidArgument(
        f"the request is not a valid {request.type_name} message", reason="MALFORMED_REQUEST"
    )


def _refuse_undecodable(arg: Any) -> Any:
    """``arg`` as it is, or InvalidArgument if grpc could not decode it; a request stream
    raises it at its first undecodable message."""
    if isinstance(arg, Undecodable):
        raise _refused(arg)
    if hasattr(arg, "__aiter__"):
        return _checked_stream(arg)
    return arg


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Undecodable):
            raise _refused(request)
        yield request


def _as_is(arg: Any) -> Any:
    return arg


def _around_unary(inner: Any, unary: Unary, decoded: Callable[[Any], Any] = _as_is) -> Any:
    async def wrapped(arg: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        return await unary(lambda: inner(decoded(arg), context), context)

    return wrapped


def _around_streaming(
    inner: Any, streaming: Streaming, decoded: Callable[[Any], Any] = _as_is
) -> Any:
    async def wrapped(arg: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        async for item in streaming(lambda: inner(decoded(arg), context), context):
            yield item

    return wrapped


def wrap_handler(
    handler: Handler,
    method: str,
    unary: Unary,
    streaming: Streaming,
    *,
    refuse_undecodable: bool = False,
) -> Handler:
    """Return ``handler`` with its behaviour run inside ``unary`` or ``streaming`` wrappers.

    ``refuse_undecodable`` (the innermost wrapper, ErrorInterceptor's): requests grpc cannot
    decode reach the wrappers as ``Undecodable`` and are refused inside them, so that ``unary``
    or ``streaming`` turns the refusal into its status."""
    if handler is None:
        return None
    deserializer = handler.request_deserializer
    decoded: Callable[[Any], Any] = _as_is
    if refuse_undecodable:
        deserializer, decoded = _tolerant(deserializer), _refuse_undecodable
    serializers = (deserializer, handler.response_serializer)
    if handler.unary_unary:
        wrapped = _around_unary(handler.unary_unary, unary, decoded)
        return grpc.unary_unary_rpc_method_handler(wrapped, *serializers)
    if handler.stream_unary:
        wrapped = _around_unary(handler.stream_unary, unary, decoded)
        return grpc.stream_unary_rpc_method_handler(wrapped, *serializers)
    if handler.unary_stream:
        # A streaming handler written as a coroutine that calls ``context.write`` (the aio
        # health servicer's Watch) is wrapped like a unary one: it has nothing to iterate.
        if inspect.isasyncgenfunction(handler.unary_stream):
            wrapped = _around_streaming(handler.unary_stream, streaming, decoded)
        else:
            wrapped = _around_unary(handler.unary_stream, unary, decoded)
        return grpc.unary_stream_rpc_method_handler(wrapped, *serializers)
    wrapped = _around_streaming(handler.stream_stream, streaming, decoded)
    return grpc.stream_stream_rpc_method_handler(wrapped, *serializers)


async def abort_with(context: aio.ServicerContext[Any, Any], error: MeshError) -> None:
    """Abort the RPC with the rich status of ``error`` (raises ``grpc.aio.AbortError``)."""
    status = to_grpc_status(error)
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)


async def _abort_for(ctx: aio.ServicerContext[Any, Any], error: Exception, method: str) -> None:
    """Abort with ``error``'s status; an abort already under way passes through; anything else
    is logged (with its traceback: call this from the ``except`` block) and becomes INTERNAL."""
    if isinstance(error, MeshError):
        await abort_with(ctx, error)
    elif isinstance(error, (aio.AbortError, grpc.RpcError)):
        raise error
    else:
        log.exception("unhandled error in %s", method)
        await abort_with(ctx, MeshError(f"internal error in {method}; see server log"))


class _WrappingInterceptor(aio.ServerInterceptor):
    """An interceptor that wraps every method's handler; ``wrap`` says how."""

    async def intercept_service(
        self,
        continuation: Any,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        return self.wrap(await continuation(handler_call_details), handler_call_details.method)

    def wrap(self, handler: Handler, method: str) -> Handler:
        """``handler`` of the RPC ``method`` (``/package.Service/Method``), wrapped."""
        raise NotImplementedError


class ErrorInterceptor(_WrappingInterceptor):
    """Maps ``MeshError`` to its status; any other exception becomes INTERNAL without details."""

    def wrap(self, handler: Handler, method: str) -> Handler:

        async def unary(
            run: Callable[[], Awaitable[Any]], ctx: aio.ServicerContext[Any, Any]
        ) -> Any:
            try:
                return await run()
            except Exception as error:
                await _abort_for(ctx, error, method)

        async def streaming(
            run: Callable[[], AsyncIterator[Any]], ctx: aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            try:
                async for item in run():
                    yield item
            except Exception as error:
                await _abort_for(ctx, error, method)

        return wrap_handler(handler, method, unary, streaming, refuse_undecodable=True)


def _code_of(ctx: aio.ServicerContext[Any, Any], error: BaseException | None) -> str:
    if isinstance(error, MeshError):
        return error.code.name
    code = ctx.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if error is not None:
        return (
            "CANCELLED"
            if isinstance(error, BaseException) and not isinstance(error, Exception)
            else "INTERNAL"
        )
    return "OK"


class MetricsInterceptor(_WrappingInterceptor):
    """Counts RPCs by final code and tracks open streams. Put it before ErrorInterceptor."""

    def __init__(self, service: str) -> None:
        self._service = service

    def wrap(self, handler: Handler, method: str) -> Handler:
        _, name = _method_name(method)
        service = self._service

        def record(ctx: aio.ServicerContext[Any, Any], error: BaseException | None) -> None:
            code = _code_of(ctx, error)
            metrics.RPCS_HANDLED.labels(service, name, code).inc()
            if code != "OK":
                metrics.RPC_ERRORS.labels(service, name, code).inc()

        async def unary(
            run: Callable[[], Awaitable[Any]], ctx: aio.ServicerContext[Any, Any]
        ) -> Any:
            try:
                result = await run()
            except BaseException as error:
                record(ctx, error)
                raise
            record(ctx, None)
            return result

        async def streaming(
            run: Callable[[], AsyncIterator[Any]], ctx: aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            gauge = metrics.ACTIVE_STREAMS.labels(service, name)
            gauge.inc()
            try:
                async for item in run():
                    yield item
            except BaseException as error:
                record(ctx, error)
                raise
            else:
                record(ctx, None)
            finally:
                gauge.dec()

        return wrap_handler(handler, method, unary, streaming)


# Probes and reflection: no spans, they would drown the turns.
_UNTRACED = ("/grpc.health.v1.", "/grpc.reflection.")
# The codes OpenTelemetry's gRPC conventions count as a server span's error.
_SERVER_ERRORS = frozenset(
    ("UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS")
)


class TracingInterceptor(_WrappingInterceptor):
    """A server span per unary RPC, child of the caller's span (``traceparent`` metadata).

    Streaming RPCs get none: a Chat stream lives for many turns, and each turn is its own trace,
    started by the gateway's accept span (services/gateway). Put it after MetricsInterceptor.
    """

    def wrap(self, handler: Handler, method: str) -> Handler:
        # Streaming handlers are returned as they are: no extra layer on every streamed message.
        if handler is None or not handler.unary_unary or method.startswith(_UNTRACED):
            return handler
        rpc_service = method.lstrip("/").rpartition("/")[0]
        _, name = _method_name(method)
        span_name = f"{rpc_service}/{name}"

        async def unary(
            run: Callable[[], Awaitable[Any]], ctx: aio.ServicerContext[Any, Any]
        ) -> Any:
            with tracing.tracer().start_as_current_span(
                span_name,
                context=tracing.remote_context(ctx.invocation_metadata()),
                kind=SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.service": rpc_service, "rpc.method": name},
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                error: BaseException | None = None
                try:
                    return await run()
                except BaseException as failure:
                    error = failure
                    raise
                finally:
                    code = _code_of(ctx, error)
                    span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[code].value[0])
                    if code in _SERVER_ERRORS:  # a client's mistake is not the server's error
                        span.set_status(Status(StatusCode.ERROR, code))

        return grpc.unary_unary_rpc_method_handler(
            _around_unary(handler.unary_unary, unary),
            handler.request_deserializer,
            handler.response_serializer,
        )
