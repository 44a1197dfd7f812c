"""Process metrics: OpenTelemetry instruments, exported on a Prometheus ``/metrics`` endpoint and,
when the standard ``OTEL_*`` variables ask for it, over OTLP.

The instruments are declared once here (names follow Prometheus conventions once exported:
``interlock_runs_started_total``, ``interlock_step_duration_seconds``, …) so services, the worker
SDK and the Grafana dashboard in deploy/ agree on them. Until :func:`configure` installs a meter
provider the instruments are no-ops, so library code may record unconditionally.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import (
    AlwaysOffExemplarFilter,
    AlwaysOnExemplarFilter,
    ExemplarFilter,
    MeterProvider,
    TraceBasedExemplarFilter,
)
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from interlock.runtime.otel import otlp_protocol

_meter = metrics.get_meter("interlock")
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

def _counter(name: str, description: str, unit: str = "1") -> metrics.Counter:
    return _meter.create_counter(name, unit=unit, description=description)


def _seconds(name: str, description: str) -> metrics.Histogram:
    return _meter.create_histogram(name, unit="s", description=description,
                                   explicit_bucket_boundaries_advisory=SECONDS_BUCKETS)


runs_started = _counter("interlock.runs.started", "runs started, by tenant and workflow")
runs_ended = _counter("interlock.runs.ended", "runs ended, by tenant, workflow and status")
step_duration = _seconds("interlock.step.duration", "a job's run time from dispatch to outcome, by topic and status")
scheduling_delay = _seconds("interlock.step.scheduling_delay", "from a step becoming ready to its dispatch, by topic")
retries = _counter("interlock.step.retries", "attempts scheduled after a failure, by topic")
timeouts = _counter("interlock.step.timeouts", "attempts that ran out of time, by topic")
dead_letters = _counter("interlock.dead_letters", "messages dead-lettered, by subject kind")
approvals_requested = _counter("interlock.approvals.requested", "approval requests, by tenant and workflow")
approval_wait = _seconds("interlock.approvals.wait", "from an approval request to its decision, by outcome")
policy_decisions = _counter("interlock.policy.decisions", "policy decisions, by action, outcome and rule")


class Tally:
    """A count kept in the process's memory and reported by an observable counter when metrics
    are collected (a scrape, an OTLP export): recording one is one dict update, with none of the
    SDK's per-measurement work. For counts bumped on every message."""

    def __init__(self, name: str, description: str, unit: str = "1") -> None:
        self._counts: dict[tuple[tuple[str, str], ...], float] = {}
        _meter.create_observable_counter(name, [self._observe], unit=unit, description=description)

    def add(self, amount: float = 1, attributes: dict[str, str] | None = None) -> None:
        key = tuple(sorted((attributes or {}).items()))
        self._counts[key] = self._counts.get(key, 0) + amount

    def _observe(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(value, dict(key)) for key, value in list(self._counts.items())]


messages_handled = Tally("interlock.messages.handled", "messages a service handled, by consumer and result")
llm_tokens = _counter("interlock.llm.tokens", "model tokens, by tenant, workflow, topic, model, direction", "{token}")
alerts_raised = _counter("interlock.alerts.changes", "alert state changes, by rule, state and tenant")
llm_cost = _counter("interlock.llm.cost_usd", "model cost in US dollars, by tenant, workflow and agent topic")


@dataclass(frozen=True)
class BoundCounter:
    """A counter with its labels fixed (the hot path builds no label dict per message)."""

    counter: metrics.Counter | Tally
    labels: dict[str, str]

    def add(self, amount: int = 1) -> None:
        self.counter.add(amount, self.labels)


def bound_counter(counter: metrics.Counter | Tally, labels: dict[str, str]) -> BoundCounter:
    return BoundCounter(counter, labels)


@dataclass
class Gauges:
    """Values read by a background task (consumer lag, pending approvals), reported on scrape.

    Observable instruments call back synchronously; the service's async poll updates these dicts."""

    consumer_pending: dict[tuple[str, str], int] = field(default_factory=dict)
    consumer_ack_pending: dict[tuple[str, str], int] = field(default_factory=dict)
    approvals_pending: dict[str, int] = field(default_factory=dict)
    oldest_approval_age: dict[str, float] = field(default_factory=dict)
    alerts_firing: dict[tuple[str, str], int] = field(default_factory=dict)  # (rule, tenant) -> firing
    queue_depth: dict[tuple[str, str], int] = field(default_factory=dict)  # (tenant, topic) -> jobs queued


gauges = Gauges()


def _observe(values: Callable[[], dict[Any, Any]], labels: Callable[[Any], dict[str, str]]
             ) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(_: CallbackOptions) -> Iterable[Observation]:
        return [Observation(v, labels(k)) for k, v in list(values().items())]
    return callback


def _consumer(key: tuple[str, str]) -> dict[str, str]:
    return {"stream": key[0], "consumer": key[1]}


_meter.create_observable_gauge("interlock.consumer.pending", [_observe(lambda: gauges.consumer_pending, _consumer)],
                               unit="{message}", description="messages not yet delivered to a consumer (its lag)")
_meter.create_observable_gauge("interlock.consumer.ack_pending",
                               [_observe(lambda: gauges.consumer_ack_pending, _consumer)],
                               unit="{message}", description="messages delivered and not yet acknowledged")
_meter.create_observable_gauge("interlock.queue.depth",
                               [_observe(lambda: gauges.queue_depth, lambda k: {"tenant": k[0], "topic": k[1]})],
                               unit="{job}", description="jobs queued on a topic: published, not yet finished")
_meter.create_observable_gauge("interlock.approvals.pending",
                               [_observe(lambda: gauges.approvals_pending, lambda t: {"tenant": t})],
                               unit="1", description="approval requests waiting for a decision")
_meter.create_observable_gauge("interlock.approvals.oldest_age",
                               [_observe(lambda: gauges.oldest_approval_age, lambda t: {"tenant": t})],
                               unit="s", description="age of the oldest waiting approval request")


_meter.create_observable_gauge("interlock.alerts.firing",
                               [_observe(lambda: gauges.alerts_firing, lambda k: {"rule": k[0], "tenant": k[1]})],
                               unit="1", description="alerts firing now, by rule and tenant")

_provider: MeterProvider | None = None


def enabled() -> bool:
    """Whether this process exports metrics (so pollers for gauges are worth running)."""
    return _provider is not None


def _otlp_wanted() -> bool:
    exporter = os.environ.get("OTEL_METRICS_EXPORTER", "")
    if exporter:
        return "otlp" in exporter.split(",")
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))


def _otlp_reader() -> MetricReader:
    exporter: Any
    if otlp_protocol("METRICS").startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter
        exporter = HttpExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter
        exporter = GrpcExporter()
    return PeriodicExportingMetricReader(exporter)


def _exemplar_filter() -> ExemplarFilter:
    """``OTEL_METRICS_EXEMPLAR_FILTER`` if set, else none: the SDK's default (trace_based) samples
    an exemplar for a measurement in every traced handler, which neither /metrics nor the
    dashboard shows."""
    wanted = os.environ.get("OTEL_METRICS_EXEMPLAR_FILTER", "always_off").strip().lower()
    return {"always_on": AlwaysOnExemplarFilter, "trace_based": TraceBasedExemplarFilter}.get(
        wanted, AlwaysOffExemplarFilter)()


def configure(resource: Resource, *, prometheus_port: int | None = None, prometheus_host: str = "127.0.0.1"
              ) -> int | None:
    """Install the process's meter provider once: a Prometheus endpoint on ``prometheus_port``
    (0 = any free port; None = none) and OTLP export when ``OTEL_*`` asks for it.

    Returns the port ``/metrics`` listens on, or None."""
    global _provider
    if _provider is not None:
        return None
    readers: list[MetricReader] = []
    bound: int | None = None
    if prometheus_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server
        readers.append(PrometheusMetricReader())
        server, _thread = start_http_server(prometheus_port, addr=prometheus_host)
        bound = int(server.server_port)
    if _otlp_wanted():
        readers.append(_otlp_reader())
    if readers:
        _provider = MeterProvider(resource=resource, metric_readers=readers, exemplar_filter=_exemplar_filter())
        metrics.set_meter_provider(_provider)
    return bound


def shutdown() -> None:
    """Flush OTLP metrics before the process exits."""
    if _provider is not None:
        _provider.shutdown(timeout_millis=2_000)
