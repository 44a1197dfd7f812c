"""OpenTelemetry tracing: one trace per run, carried to agents in the job's ``traceparent``.

Every job of a run belongs to the trace whose id is the run id (a UUID is 128 bits, exactly a
trace id), so a tracing backend shows a run's jobs together however many services and workers
touched them. The dispatcher writes the W3C ``traceparent`` into the job (and its NATS headers);
the worker SDK continues it around the handler. Export is off unless configured:
``INTERLOCK_TRACING=console`` prints spans; an application may install its own TracerProvider.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from interlock.contracts import headers as h

_propagator = TraceContextTextMapPropagator()
_configured = False


def configure(export: str = "off") -> None:
    """Install a tracer provider once per process (unless the application installed one).

    ``export`` is ``"console"`` (print spans) or ``"off"``; processes pass their settings'
    ``tracing`` (``INTERLOCK_TRACING``)."""
    global _configured
    if _configured:
        return
    _configured = True
    if export == "console":
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        trace.set_tracer_provider(provider)


def traceparent(run_id: str, job_id: str) -> str:
    """W3C traceparent for a job: the run's trace, a span id derived from the job id."""
    trace_id = uuid.UUID(run_id).hex
    span_id = hashlib.sha256(job_id.encode()).hexdigest()[:16]
    return f"00-{trace_id}-{span_id}-01"


def context_of(traceparent_value: str | None) -> Any:
    """The OpenTelemetry context a ``traceparent`` continues (empty context if absent)."""
    return _propagator.extract({h.TRACEPARENT: traceparent_value} if traceparent_value else {})


tracer = trace.get_tracer("interlock")
