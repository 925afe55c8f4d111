"""Log output: readable lines on a console, or one ECS JSON object per line for a log pipeline.

``MESH_LOG_FORMAT=json`` writes Elastic Common Schema fields, which Elasticsearch (and so an ELK
stack) indexes without mapping work: ``@timestamp``, ``log.level``, ``log.logger``, ``message``,
``service.name``, ``service.node.name``, ``trace.id`` and ``span.id`` (the current span's, so a
log line leads to its trace), ``event.action`` and ``labels.turn_id`` where the line has them, and
``error.*`` for exceptions. ``console`` (the default, and what ``make run`` shows) is plain text.

A log call says what happened and to which turn through ``extra``::

    log.info("turn %s finished", turn_id, extra=event("turn-finished", turn_id))

User text never goes into a log line unless ``MESH_LOG_USER_TEXT`` is set (``user_text``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

FORMATS = ("console", "json")


def event(action: str, turn_id: str | None = None, **fields: Any) -> dict[str, Any]:
    """``extra`` for a log call: the ECS ``event.action`` and the turn it concerns."""
    extra: dict[str, Any] = {"event_action": action}
    if turn_id:
        extra["turn_id"] = turn_id
    if fields:
        extra["mesh_fields"] = fields
    return extra


def user_text_allowed(environ: Mapping[str, str] = os.environ) -> bool:
    """``MESH_LOG_USER_TEXT``: whether log lines may quote what users wrote (off by default)."""
    return environ.get("MESH_LOG_USER_TEXT", "").strip().lower() in ("1", "true", "yes", "on")


class EcsJsonFormatter(logging.Formatter):
    """One JSON object per record, with ECS field names (flat, dotted keys)."""

    def __init__(self, service: str, node: str | None = None) -> None:
        super().__init__()
        self._service = service
        self._node = node

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "@timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "log.level": record.levelname.lower(),
            "log.logger": record.name,
            "message": record.getMessage(),
            "service.name": self._service,
            "ecs.version": "8.11.0",
        }
        if self._node:
            doc["service.node.name"] = self._node
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            doc["trace.id"] = format(span_context.trace_id, "032x")
            doc["span.id"] = format(span_context.span_id, "016x")
        action = getattr(record, "event_action", None)
        if action:
            doc["event.action"] = action
        turn_id = getattr(record, "turn_id", None)
        if turn_id:
            doc["labels.turn_id"] = turn_id
        fields = getattr(record, "mesh_fields", None)
        if isinstance(fields, dict):
            for name, value in fields.items():
                doc[f"mesh.{name}"] = value
        if record.exc_info and record.exc_info[0] is not None:
            kind, error, tb = record.exc_info
            doc["error.type"] = kind.__name__
            doc["error.message"] = str(error)
            doc["error.stack_trace"] = "".join(traceback.format_exception(kind, error, tb))
        return json.dumps(doc, ensure_ascii=False, default=str)


def configure(service: str, level: str = "INFO", environ: Mapping[str, str] = os.environ) -> None:
    """Set up the root logger for ``service`` from ``MESH_LOG_FORMAT`` (console or json)."""
    fmt = environ.get("MESH_LOG_FORMAT", "console").strip().lower() or "console"
    if fmt not in FORMATS:
        raise ValueError(f"MESH_LOG_FORMAT must be one of {', '.join(FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(EcsJsonFormatter(f"mesh-{service}", environ.get("MESH_INSTANCE")))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
