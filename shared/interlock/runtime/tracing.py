"""OpenTelemetry tracing: one trace per run, carried to agents in the job's ``traceparent``.

Every job of a run belongs to the trace whose id is the run id (a UUID is 128 bits, exactly a
trace id), so a tracing backend shows a run's jobs together however many services and workers
touched them. The dispatcher writes the W3C ``traceparent`` into the job (and its NATS headers);
the worker SDK continues it around the handler. Export is off unless configured:
``INTERLOCK_TRACING=console`` prints spans; an application may install its own TracerProvider.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from interlock.contracts import headers as h
from interlock.contracts.messages import LlmCall
from interlock.core.eventstore.recorder import ACTED_ATTRIBUTE, APPENDED, mark_acted
from interlock.runtime.otel import otlp_protocol, resource

_propagator = TraceContextTextMapPropagator()
_configured = False
_ours = False  # whether configure() installed the provider (and so the run-trace id generator)

HANDLER_KIND = SpanKind.CONSUMER
"""Kind of a service's message-handling span (from this module's tracer); one that did nothing is
not exported. Worker job spans are INTERNAL, model-call spans CLIENT: always exported."""
PUBLISHED = "published"
PROJECTED = "projected"
ACTED_EVENTS = frozenset({APPENDED, PUBLISHED, PROJECTED})
"""Span events that mean a handler had an effect (the event store and publishers add them)."""

_root_ids: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("interlock_root_ids", default=None)


class _RunTraceIds(IdGenerator):
    """The run's root span gets trace id = run id and a span id derived from it (so any service
    can parent a message that carries no trace context to it); everything else is random."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()

    def generate_span_id(self) -> int:
        ids = _root_ids.get()
        return ids[1] if ids else self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        ids = _root_ids.get()
        return ids[0] if ids else self._random.generate_trace_id()


class _ActedOnly(SpanProcessor):
    """Forwards ended spans except handler spans that had no effect.

    Every commit reaches every service and a redelivered message is handled again; only the
    handling that appended, published or projected something belongs in the run's trace, so a
    redelivery or a replay adds no duplicate span."""

    def __init__(self, inner: SpanProcessor) -> None:
        self._inner = inner

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self._inner.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if span.kind is HANDLER_KIND and _is_ours(span) and not (span.attributes or {}).get(ACTED_ATTRIBUTE):
            return
        self._inner.on_end(span)

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._inner.force_flush(timeout_millis)


class RunTraceIdRatio(TraceIdRatioBased):
    """The SDK's ratio sampler over a trace id's low 56 bits. A run's trace id is its UUID4, whose
    low 64 bits begin with the variant bits (always 0b10): compared over 64 bits, as the SDK does,
    no run would be kept below a ratio of 0.5. The low 56 bits are random (as W3C's random trace
    id flag promises of the rightmost 7 bytes)."""

    TRACE_ID_LIMIT = (1 << 56) - 1


def _sampler() -> Sampler | None:
    """``OTEL_TRACES_SAMPLER`` (``OTEL_TRACES_SAMPLER_ARG``): the ratio samplers over run ids (see
    :class:`RunTraceIdRatio`); None for any other, which the SDK reads itself (default:
    ``parentbased_always_on``, every run traced)."""
    name = os.environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if name not in ("traceidratio", "parentbased_traceidratio"):
        return None
    try:
        rate = min(1.0, max(0.0, float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))))
    except ValueError:
        rate = 1.0
    ratio = RunTraceIdRatio(rate)
    return ParentBased(ratio) if name.startswith("parentbased") else ratio


def _is_ours(span: ReadableSpan) -> bool:
    scope = span.instrumentation_scope
    return scope is not None and scope.name == TRACER_NAME


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
    global _ours
    _ours = True
    # the sampler follows OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (default
    # parentbased_always_on: every run is traced); a ratio keeps or drops whole runs, since a
    # run's trace id is its run id in every process
    provider = TracerProvider(resource=resource(service, instance), id_generator=_RunTraceIds(), sampler=_sampler())
    for exporter in exporters:
        # console output is for people watching: print as spans end; OTLP batches (its queue,
        # batch size and delay from OTEL_BSP_*), encoding and sending on the processor's thread
        live = isinstance(exporter, ConsoleSpanExporter)
        provider.add_span_processor(_ActedOnly(SimpleSpanProcessor(exporter) if live else BatchSpanProcessor(exporter)))
    trace.set_tracer_provider(provider)
    global tracer
    tracer = provider.get_tracer(TRACER_NAME)  # the SDK's tracer itself, not the proxy in front of it
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


_VERSION_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
"""A version-00 ``traceparent`` as this module writes it (W3C Trace Context, level 1)."""


def context_of(traceparent_value: str | None) -> Any:
    """The OpenTelemetry context a ``traceparent`` continues (empty context if absent).

    The version-00 form every Interlock process writes is read here with one precompiled match
    (it is read on every message handled); anything else goes to the SDK's propagator."""
    if not traceparent_value:
        return Context()
    match = _VERSION_00.fullmatch(traceparent_value)
    if match is None:
        return _propagator.extract({h.TRACEPARENT: traceparent_value})
    trace_id, span_id = int(match.group(1), 16), int(match.group(2), 16)
    if not trace_id or not span_id:
        return Context()  # all zeros: invalid, as the propagator would say
    return trace.set_span_in_context(trace.NonRecordingSpan(trace.SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(int(match.group(3), 16)))))


@functools.lru_cache(maxsize=4096)
def _run_trace_id(run_id: str | None) -> int | None:
    """The trace id of a run (its UUID), for every message of the run a process handles."""
    try:
        return uuid.UUID(run_id).int if run_id else None
    except ValueError:
        return None


def _root_span_id(trace_id: int) -> int:
    return (trace_id & 0xFFFF_FFFF_FFFF_FFFF) or 1


def _run_context(trace_id: int) -> Context:
    """A context whose parent is the run's root span (known from the run id alone)."""
    return trace.set_span_in_context(trace.NonRecordingSpan(trace.SpanContext(
        trace_id, _root_span_id(trace_id), is_remote=True, trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))))


@contextlib.contextmanager
def handling(service: str, what: str, message_headers: Mapping[str, str] | None, *,
             run_id: str | None = None, **attributes: Any) -> Iterator[trace.Span]:
    """A span around one message a service handles, continuing the trace in its ``traceparent``
    (a run's message without one, such as a person's command, is parented to the run's root span).

    Exported only if the handler appended, published or projected something (see ``_ActedOnly``)."""
    traceparent_value = (message_headers or {}).get(h.TRACEPARENT)
    parent = context_of(traceparent_value) if traceparent_value else Context()
    with _span(service, what, parent, run_id, attributes) as span:
        yield span


@contextlib.contextmanager
def run_root(service: str, what: str, run_id: str, **attributes: Any) -> Iterator[trace.Span]:
    """The first span of a run's trace (the planner starting it): trace id = run id, no parent."""
    with _span(service, what, None, run_id, attributes) as span:
        yield span


@contextlib.contextmanager
def _span(service: str, what: str, parent: Context | None, run_id: str | None, attributes: dict[str, Any]
          ) -> Iterator[trace.Span]:
    """``parent`` None: the run's root span (ids from the run id where this module's provider
    is installed; under an application's own provider, a child of the run's derived root)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        # nobody records spans (no exporter configured, no application provider): skip the
        # context work a no-op span would cost on every message
        yield trace.INVALID_SPAN
        return
    # the service and its instance are the resource's (service.name, service.instance.id): not
    # repeated on every span
    fields = {"messaging.system": "nats", **{f"interlock.{k}": v for k, v in attributes.items() if v is not None}}
    if run_id:
        fields["interlock.run_id"] = run_id
    run_trace = _run_trace_id(run_id)
    token = None
    if parent is None:
        parent = Context()
        if run_trace is not None:
            if _ours and isinstance(trace.get_tracer_provider(), TracerProvider):
                token = _root_ids.set((run_trace, _root_span_id(run_trace)))
            else:
                parent = _run_context(run_trace)
    elif run_trace is not None and not trace.get_current_span(parent).get_span_context().is_valid:
        parent = _run_context(run_trace)  # e.g. a command from outside: under the run's root span
    try:
        span = tracer.start_span(f"{service} {what}", context=parent, kind=HANDLER_KIND, attributes=fields)
    finally:
        if token is not None:
            _root_ids.reset(token)  # only the root itself takes the derived ids
    with trace.use_span(span, end_on_exit=True):
        yield span


@contextlib.contextmanager
def under_run_root(run_id: str) -> Iterator[None]:
    """Publish what the block publishes as the run's, not the current message's: its messages carry
    the run's root span as their parent, and they do not count as the handler's effect (e.g. the
    lease a heartbeat renews: a heartbeat that only renews its job's lease exports no span, and a
    lease that later times the job out is parented to the run's root)."""
    run_trace = _run_trace_id(run_id)
    if run_trace is None or not trace.get_current_span().is_recording():
        yield
        return
    with trace.use_span(trace.get_current_span(_run_context(run_trace)), end_on_exit=False):
        yield


def annotate(**attributes: Any) -> None:
    """Add ``interlock.*`` attributes (step_id, attempt, …) to the span being handled."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attributes({f"interlock.{key}": value for key, value in attributes.items() if value is not None})


def acted(what: str, **attributes: Any) -> None:
    """Record on the current span that the handler had an effect (``what`` in ACTED_EVENTS): the
    span's ``interlock.acted`` lists them; ``attributes`` become ``interlock.{what}_{key}``."""
    mark_acted(trace.get_current_span(), what,
               {f"interlock.{what}_{k}": v for k, v in attributes.items() if v is not None})


def current_traceparent() -> str | None:
    """The current span's ``traceparent``, or None outside a span with a valid context."""
    return inject({}).get(h.TRACEPARENT)


def inject(carrier: dict[str, str]) -> dict[str, str]:
    """``carrier`` with the current span's ``traceparent`` (unchanged outside a recording span)."""
    if trace.get_current_span().get_span_context().is_valid:
        _propagator.inject(carrier)
    return carrier


TRACER_NAME = "interlock"
tracer = trace.get_tracer(TRACER_NAME)


def llm_call_span(call: LlmCall) -> None:
    """A span for one model call inside the job's span, with the OpenTelemetry GenAI attributes."""
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": call.operation, "gen_ai.provider.name": call.provider,
        "gen_ai.system": call.provider, "gen_ai.request.model": call.model,
        "gen_ai.usage.input_tokens": call.input_tokens, "gen_ai.usage.output_tokens": call.output_tokens,
        "interlock.cost_usd": call.cost_usd,
    }
    if call.temperature is not None:
        attributes["gen_ai.request.temperature"] = call.temperature
    if call.prompt_ref:
        attributes["interlock.prompt_ref"] = call.prompt_ref
    with tracer.start_as_current_span(f"{call.operation} {call.model}", kind=SpanKind.CLIENT, attributes=attributes):
        pass
