"""OpenTelemetry tracing: one trace per run, carried to agents in the job's ``traceparent``.

Every job of a run belongs to the trace whose id is the run id (a UUID is 128 bits, exactly a
trace id), so a tracing backend shows a run's jobs together however many services and workers
touched them. The dispatcher writes the W3C ``traceparent`` into the job (and its NATS headers);
the worker SDK continues it around the handler. Export is off unless configured:
``INTERLOCK_TRACING=console`` prints spans; an application may install its own TracerProvider.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from interlock.contracts import headers as h
from interlock.runtime.otel import otlp_protocol, resource

_propagator = TraceContextTextMapPropagator()
_configured = False


def _exporters(export: str) -> list[SpanExporter]:
    """Span exporters asked for by INTERLOCK_TRACING and the standard OTEL_* variables."""
    wanted = {e.strip() for e in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not wanted and endpoint:
        wanted = {"otlp"}
    if export == "console":
        wanted.add("console")
    exporters: list[SpanExporter] = []
    if "console" in wanted:
        exporters.append(ConsoleSpanExporter())
    if "otlp" in wanted:
        if otlp_protocol("TRACES").startswith("http"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
            exporters.append(HttpSpanExporter())
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
            exporters.append(GrpcSpanExporter())
    return exporters


def configure(export: str = "off", *, service: str = "worker", instance: str = "") -> bool:
    """Install a tracer provider once per process (unless the application installed one).

    ``export`` is ``"console"`` (print spans) or ``"off"`` (``INTERLOCK_TRACING``); OTLP export
    follows the standard variables (``OTEL_TRACES_EXPORTER=otlp``, ``OTEL_EXPORTER_OTLP_ENDPOINT``,
    ``OTEL_EXPORTER_OTLP_PROTOCOL=grpc|http/protobuf``). Returns whether spans are exported."""
    global _configured
    if _configured:
        return False
    _configured = True
    exporters = _exporters(export)
    if not exporters:
        return False
    provider = TracerProvider(resource=resource(service, instance))
    for exporter in exporters:
        # console output is for people watching: print as spans end; OTLP batches
        live = isinstance(exporter, ConsoleSpanExporter)
        provider.add_span_processor(SimpleSpanProcessor(exporter) if live else BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return True


def shutdown() -> None:
    """Flush spans still batched before the process exits."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()


def traceparent(run_id: str, job_id: str) -> str:
    """W3C traceparent for a job: the run's trace, a span id derived from the job id."""
    trace_id = uuid.UUID(run_id).hex
    span_id = hashlib.sha256(job_id.encode()).hexdigest()[:16]
    return f"00-{trace_id}-{span_id}-01"


def context_of(traceparent_value: str | None) -> Any:
    """The OpenTelemetry context a ``traceparent`` continues (empty context if absent)."""
    return _propagator.extract({h.TRACEPARENT: traceparent_value} if traceparent_value else {})


tracer = trace.get_tracer("interlock")
