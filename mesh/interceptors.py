"""Server interceptors shared by every service: domain errors to statuses, RPC metrics, spans.

Both wrap the four handler shapes the same way, through ``wrap_handler``; the gateway's auth
interceptor uses it too.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio
from opentelemetry.trace import SpanKind, Status, StatusCode

from mesh import metrics, tracing
from mesh.errors import MeshError, to_grpc_status

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


def _around_unary(inner: Any, unary: Unary) -> Any:
    async def wrapped(arg: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        return await unary(lambda: inner(arg, context), context)

    return wrapped


def _around_streaming(inner: Any, streaming: Streaming) -> Any:
    async def wrapped(arg: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        async for item in streaming(lambda: inner(arg, context), context):
            yield item

    return wrapped


def wrap_handler(handler: Handler, method: str, unary: Unary, streaming: Streaming) -> Handler:
    """Return ``handler`` with its behaviour run inside ``unary`` or ``streaming`` wrappers."""
    if handler is None:
        return None
    serializers = (handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        wrapped = _around_unary(handler.unary_unary, unary)
        return grpc.unary_unary_rpc_method_handler(wrapped, *serializers)
    if handler.stream_unary:
        wrapped = _around_unary(handler.stream_unary, unary)
        return grpc.stream_unary_rpc_method_handler(wrapped, *serializers)
    if handler.unary_stream:
        # A streaming handler written as a coroutine that calls ``context.write`` (the aio
        # health servicer's Watch) is wrapped like a unary one: it has nothing to iterate.
        if inspect.isasyncgenfunction(handler.unary_stream):
            wrapped = _around_streaming(handler.unary_stream, streaming)
        else:
            wrapped = _around_unary(handler.unary_stream, unary)
        return grpc.unary_stream_rpc_method_handler(wrapped, *serializers)
    wrapped = _around_streaming(handler.stream_stream, streaming)
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

        return wrap_handler(handler, method, unary, streaming)


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
                    span.set_attribute("rpc.grpc.status_code", code)
                    if code != "OK":
                        span.set_status(Status(StatusCode.ERROR, code))

        return grpc.unary_unary_rpc_method_handler(
            _around_unary(handler.unary_unary, unary),
            handler.request_deserializer,
            handler.response_serializer,
        )
