"""Process logs: JSON lines or text, each record carrying the run, step and trace it belongs to.

Every module logs through the standard ``logging`` module; :func:`configure` routes the root
logger through structlog's formatter so the same records come out as JSON (``INTERLOCK_LOG_FORMAT
=json``, for log shippers) or as readable text (the default at a terminal). Handlers bind the
run they are working on with :func:`bound`; the record then carries ``tenant``, ``run_id``,
``step_id``, ``attempt`` and, inside a span, ``trace_id`` and ``span_id``. Values under keys that
look secret (``api_key``, ``password``, ``token``, …) are replaced by a marker before rendering.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any, Literal, TextIO

import structlog
from opentelemetry import trace

LogFormat = Literal["text", "json"]

REDACTED = "[sensitive]"
SECRET_KEY = re.compile(r"api[_-]?key|password|passwd|secret|token|authorization|credential", re.IGNORECASE)
"""Keys whose values never reach a log line, at any depth of a logged mapping."""

CONTEXT_FIELDS = ("tenant", "run_id", "step_id", "attempt")


def _redact(value: Any, depth: int = 0) -> Any:
    if depth > 8:
        return value
    if isinstance(value, Mapping):
        return {k: REDACTED if isinstance(k, str) and SECRET_KEY.search(k) else _redact(v, depth + 1)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v, depth + 1) for v in value]
    return value


def redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: secret-looking keys of the record (and of mappings in it) masked."""
    for key in list(event):
        if key != "event" and SECRET_KEY.search(key):
            event[key] = REDACTED
        else:
            event[key] = _redact(event[key])
    return event


def add_trace_ids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: the current span's trace and span id, when there is one."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event.setdefault("span_id", format(ctx.span_id, "016x"))
    return event


def _static(fields: dict[str, str]) -> structlog.types.Processor:
    def add(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in fields.items():
            if value:
                event.setdefault(key, value)
        return event
    return add


def _processors(service: str, instance: str) -> list[structlog.types.Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _static({"service": service, "service_instance": instance}),
        add_trace_ids,
        structlog.stdlib.ExtraAdder(),  # `extra=` fields of stdlib calls, before they are redacted
        redact_secrets,
    ]


def formatter(fmt: LogFormat, *, service: str, instance: str = "") -> logging.Formatter:
    """The logging formatter that renders records as ``fmt`` with Interlock's context fields."""
    renderer: structlog.types.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False, sort_keys=False)
    chain = _processors(service, instance)
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=chain,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
    )


def configure(fmt: LogFormat = "text", *, service: str, instance: str = "", level: int = logging.INFO,
              stream: TextIO | None = None) -> logging.Handler:
    """Route the root logger through one handler in ``fmt``; returns the handler installed.

    Replaces handlers installed by an earlier call, so a process may reconfigure (tests do)."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_interlock", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt, service=service, instance=instance))
    handler._interlock = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    return handler


@contextlib.contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Log records emitted inside carry ``fields`` (run_id, step_id, …; None values are left out)."""
    present = {k: v for k, v in fields.items() if v is not None}
    with structlog.contextvars.bound_contextvars(**present):
        yield
