"""The pieces of observability that need no server: ECS JSON log lines, trace context through
log record headers, and an embedded log written before records had headers."""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from mesh import logs, tracing
from mesh.log.embedded import EmbeddedLog

# A provider of our own: spans with real ids, without touching the process-wide one.
TRACER = TracerProvider().get_tracer("test")


def record(message: str, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("services.agent.worker", logging.INFO, __file__, 1, message, (), None)
    for name, value in extra.items():
        setattr(made, name, value)
    return made


def test_json_lines_carry_ecs_fields_the_turn_and_the_current_trace() -> None:
    formatter = logs.EcsJsonFormatter("mesh-agent", "agent-2")
    with TRACER.start_as_current_span("turn") as span:
        line = formatter.format(record("turn t1 finished", **logs.event("turn-finished", "t1")))
    doc = json.loads(line)
    assert doc["message"] == "turn t1 finished"
    assert doc["log.level"] == "info"
    assert doc["log.logger"] == "services.agent.worker"
    assert doc["service.name"] == "mesh-agent"
    assert doc["service.node.name"] == "agent-2"
    assert doc["event.action"] == "turn-finished"
    assert doc["labels.turn_id"] == "t1"
    assert doc["trace.id"] == format(span.get_span_context().trace_id, "032x")
    assert doc["span.id"] == format(span.get_span_context().span_id, "016x")
    assert doc["@timestamp"].endswith("+00:00")
    assert "\n" not in line


def test_json_lines_outside_a_span_have_no_trace_and_exceptions_are_structured() -> None:
    formatter = logs.EcsJsonFormatter("mesh-gateway")
    try:
        raise ValueError('broken "quote"\nand a newline')
    except ValueError:
        failed = record("it failed")
        failed.exc_info = sys.exc_info()
    doc = json.loads(formatter.format(failed))
    assert "trace.id" not in doc and "service.node.name" not in doc
    assert doc["error.type"] == "ValueError"
    assert doc["error.message"] == 'broken "quote"\nand a newline'
    assert "Traceback" in doc["error.stack_trace"]


def test_an_unknown_log_format_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="MESH_LOG_FORMAT must be one of console, json"):
        logs.configure("agent", environ={"MESH_LOG_FORMAT": "xml"})


def test_user_text_stays_out_of_logs_unless_asked_for() -> None:
    assert not logs.user_text_allowed({})
    assert not logs.user_text_allowed({"MESH_LOG_USER_TEXT": "no"})
    assert logs.user_text_allowed({"MESH_LOG_USER_TEXT": "true"})


def test_a_span_travels_in_record_headers_and_comes_back_as_parent_and_link() -> None:
    with TRACER.start_as_current_span("append") as span:
        headers = tracing.headers_for()
    names = [name for name, _ in headers]
    assert "traceparent" in names
    context = span.get_span_context()
    linked = tracing.span_context_of(headers)
    assert linked is not None
    assert (linked.trace_id, linked.span_id) == (context.trace_id, context.span_id)
    with TRACER.start_as_current_span(
        "consume", context=tracing.context_from_headers(headers)
    ) as child:
        assert child.get_span_context().trace_id == context.trace_id
        assert child.parent is not None and child.parent.span_id == context.span_id


def test_records_without_headers_start_a_new_trace() -> None:
    assert tracing.span_context_of(()) is None
    assert tracing.span_context_of((("traceparent", "garbage"),)) is None
    assert not trace.get_current_span(tracing.context_from_headers(())).get_span_context().is_valid


async def test_an_embedded_log_from_before_headers_opens_and_reads(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE topics (name TEXT PRIMARY KEY, partitions INTEGER NOT NULL);"
        "CREATE TABLE heads (topic TEXT NOT NULL, part INTEGER NOT NULL,"
        " next_pos INTEGER NOT NULL, PRIMARY KEY (topic, part)) WITHOUT ROWID;"
        "CREATE TABLE records (topic TEXT NOT NULL, part INTEGER NOT NULL, pos INTEGER NOT NULL,"
        " key BLOB NOT NULL, value BLOB NOT NULL, ts_ms INTEGER NOT NULL,"
        " PRIMARY KEY (topic, part, pos)) WITHOUT ROWID;"
        "INSERT INTO topics VALUES ('t', 1); INSERT INTO heads VALUES ('t', 0, 1);"
        "INSERT INTO records VALUES ('t', 0, 0, x'6b', x'76', 1700000000000);"
    )
    old.commit()
    old.close()
    async with EmbeddedLog(path, session_timeout_s=5, heartbeat_interval_s=1) as log:
        offset = await log.append("t", 0, b"k", b"w", (("traceparent", "x"),))
        first, second = await log.read_range("t", 0, 0, offset + 1)
    assert (first.value, first.headers) == (b"v", ())
    assert (second.value, second.headers) == (b"w", (("traceparent", "x"),))
