"""OpenTelemetry traces: one trace per turn, across the services and through the log.

Tracing is off (every span a no-op) unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` names an OTLP/gRPC collector. The SDK's standard variables
do the rest: ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` choose the sampling (the default
follows the parent, else samples everything), ``OTEL_EXPORTER_OTLP_*`` the transport.

How a turn becomes one trace (docs/observability.md has the span tree):
- gRPC calls carry the W3C ``traceparent`` in their metadata (``ClientTracing`` on our channels,
  ``remote_context`` on the servers);
- log records carry it in their headers (``headers_for`` / ``context_from_headers``): the
  gateway's request record points at its accept span, each agent record at the agent's turn
  span, so the persister and an agent that takes a turn over find the turn's trace in the log.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from grpc import aio
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, Span, SpanContext

from mesh.log.base import Headers

log = logging.getLogger(__name__)

TRACER_NAME = "llm-mesh"
# The OpenTelemetry GenAI semantic conventions' attribute names (gen_ai.*).
GEN_AI_OPERATION = "gen_ai.operation.name"
GEN_AI_PROVIDER = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_FINISH_REASONS = "gen_ai.response.finish_reasons"
TURN_ID = "mesh.turn.id"

_provider: TracerProvider | None = None


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    names = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    return any(environ.get(name) for name in names)


def configure(service: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Export this process's spans over OTLP if an endpoint is configured; True if so.

    ``service`` becomes ``service.name`` (``mesh-<service>``): one name per kind of service, so a
    backend groups the replicas, which ``service.instance.id`` (``MESH_INSTANCE``) tells apart.
    """
    global _provider
    if not enabled(environ) or _provider is not None:
        return _provider is not None
    # Imported here: the exporter pulls in its own gRPC machinery, needed only when tracing.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    attributes = {"service.name": f"mesh-{service}", "service.namespace": "llm-mesh"}
    instance = environ.get("MESH_INSTANCE")
    if instance:
        attributes["service.instance.id"] = instance
    _provider = TracerProvider(resource=Resource.create(attributes))
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(_provider)
    log.info("tracing: exporting spans over OTLP as %s", attributes["service.name"])
    return True


def shutdown() -> None:
    """Flush the spans still queued (at exit); harmless when tracing is off."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def headers_for(span: Span | None = None) -> Headers:
    """The trace context of ``span`` (default: the current one) as log record headers."""
    carrier: dict[str, str] = {}
    ctx = trace.set_span_in_context(span) if span is not None else None
    propagate.inject(carrier, context=ctx)
    return tuple(carrier.items())


def context_from_headers(headers: Iterable[tuple[str, str]]) -> Context:
    """The context a log record's headers carry (empty if none: the span starts a new trace)."""
    return propagate.extract(dict(headers))


def span_context_of(headers: Iterable[tuple[str, str]]) -> SpanContext | None:
    """The remote span a record's headers point at, if any (for a link)."""
    span_context = trace.get_current_span(context_from_headers(headers)).get_span_context()
    return span_context if span_context.is_valid else None


def links_to(*span_contexts: SpanContext | None) -> list[Link]:
    return [Link(sc) for sc in span_contexts if sc is not None and sc.is_valid]


def remote_context(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context:
    """The caller's trace context from gRPC invocation metadata (or HTTP headers)."""
    carrier = {
        key.lower(): value.decode() if isinstance(value, bytes) else value
        for key, value in metadata or ()
    }
    return propagate.extract(carrier)


def _with_trace_metadata(details: aio.ClientCallDetails) -> aio.ClientCallDetails:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        return details
    metadata = aio.Metadata(*(details.metadata or ()))
    for key, value in carrier.items():
        metadata.add(key, value)
    return aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _UnaryUnaryTracing(aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_with_trace_metadata(details), request)


class _UnaryStreamTracing(aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_with_trace_metadata(details), request)


def client_interceptors() -> list[aio.ClientInterceptor]:
    """Channel interceptors that pass the current trace context on with every call we make."""
    return [_UnaryUnaryTracing(), _UnaryStreamTracing()]
