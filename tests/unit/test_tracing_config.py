"""What tracing and metrics export and how they are configured: the sampler from OTEL_TRACES_SAMPLER,
handler spans that did nothing dropped, exemplars off unless asked for, per-message counts served."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid

import pytest
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, AlwaysOnExemplarFilter, TraceBasedExemplarFilter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from interlock.contracts import headers as h
from interlock.runtime import metrics, tracing

# a tracer provider is process-global and set once: configure() is tried in a fresh interpreter
SAMPLED = textwrap.dedent("""
    import json, uuid
    from interlock.runtime import tracing
    assert tracing.configure("console", service="planner", instance="p-1")
    kept = 0
    for _ in range(200):
        with tracing.run_root("planner", "start run", str(uuid.uuid4())) as span:
            kept += span.is_recording()
    print(json.dumps({"kept": kept}))
""")


def _kept(env: dict[str, str]) -> int:
    import json
    import os
    out = subprocess.run([sys.executable, "-c", SAMPLED], capture_output=True, text=True, check=True, timeout=60,
                         env={**os.environ, **env}).stdout
    return int(json.loads(out.strip().splitlines()[-1])["kept"])


def test_every_run_is_traced_by_default() -> None:
    assert _kept({}) == 200


@pytest.mark.parametrize(("sampler", "arg", "low", "high"), [
    ("always_off", "", 0, 0),
    ("parentbased_traceidratio", "0.25", 20, 80),  # 50 expected of 200 run ids
])
def test_the_sampler_follows_otel_traces_sampler(sampler: str, arg: str, low: int, high: int) -> None:
    kept = _kept({"OTEL_TRACES_SAMPLER": sampler, "OTEL_TRACES_SAMPLER_ARG": arg})
    assert low <= kept <= high, kept


def test_a_handler_span_that_did_nothing_is_not_exported() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(tracing._ActedOnly(SimpleSpanProcessor(exporter)))
    ours, other = provider.get_tracer(tracing.TRACER_NAME), provider.get_tracer("an.application")
    with ours.start_as_current_span("planner events", kind=SpanKind.CONSUMER):
        pass  # handled, changed nothing (a redelivery, a commit it only caches)
    with ours.start_as_current_span("dispatcher results", kind=SpanKind.CONSUMER):
        tracing.acted(tracing.PUBLISHED, subject="il.job.t.x")  # literal: any subject will do
    with ours.start_as_current_span("job bench.step"):  # a worker's job span: always kept
        pass
    with other.start_as_current_span("their consumer", kind=SpanKind.CONSUMER):  # not ours to judge
        pass
    assert sorted(s.name for s in exporter.get_finished_spans()) == [
        "dispatcher results", "job bench.step", "their consumer"]


def test_a_handler_span_carries_the_run_and_its_parent_but_not_the_resource_again() -> None:
    script = textwrap.dedent("""
        import json, uuid
        from opentelemetry import trace
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from interlock.runtime import tracing
        assert tracing.configure("console", service="policy", instance="p-1")
        exporter = InMemorySpanExporter()
        trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(exporter))
        run_id = str(uuid.uuid4())
        parent = tracing.traceparent(run_id, "job-1")
        with tracing.handling("policy", "events", {"traceparent": parent}, run_id=run_id, tenant="acme"):
            tracing.annotate(step_id="a", attempt=2)
            tracing.acted(tracing.PUBLISHED, subject="x")
        (span,) = exporter.get_finished_spans()
        print(json.dumps({"run_id": run_id, "parent": parent, "trace": format(span.context.trace_id, "032x"),
                          "parent_span": format(span.parent.span_id, "016x"), "kind": span.kind.name,
                          "attributes": dict(span.attributes), "service": span.resource.attributes["service.name"],
                          "instance": span.resource.attributes["service.instance.id"]}))
    """)
    import json
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["trace"] == uuid.UUID(got["run_id"]).hex and got["parent"].split("-")[2] == got["parent_span"]
    assert got["kind"] == "CONSUMER" and (got["service"], got["instance"]) == ("interlock-policy", "p-1")
    # what the handler did is an attribute (a span event would cost as much again to record and export)
    assert got["attributes"] == {"messaging.system": "nats", "interlock.tenant": "acme",
                                 "interlock.run_id": got["run_id"], "interlock.step_id": "a", "interlock.attempt": 2,
                                 "interlock.acted": ["published"], "interlock.published_subject": "x"}


def test_what_is_published_under_the_run_root_is_the_runs_not_the_handlers() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(tracing._ActedOnly(SimpleSpanProcessor(exporter)))
    run_id = str(uuid.uuid4())
    with provider.get_tracer(tracing.TRACER_NAME).start_as_current_span("dispatcher heartbeats",
                                                                        kind=SpanKind.CONSUMER) as span:
        with tracing.under_run_root(run_id):
            carried = tracing.inject({})[h.TRACEPARENT]
            tracing.acted(tracing.PUBLISHED, subject="il.timer.lease")  # literal: the lease timer
        assert tracing.current_traceparent() != carried  # the handler's own span again
    trace_id = uuid.UUID(run_id).int
    assert carried == f"00-{trace_id:032x}-{tracing._root_span_id(trace_id):016x}-01"
    assert span.get_span_context().span_id != tracing._root_span_id(trace_id)
    assert exporter.get_finished_spans() == ()  # renewing a lease alone is not the handler's effect


def test_exemplars_are_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_METRICS_EXEMPLAR_FILTER", raising=False)
    assert isinstance(metrics._exemplar_filter(), AlwaysOffExemplarFilter)
    monkeypatch.setenv("OTEL_METRICS_EXEMPLAR_FILTER", "trace_based")
    assert isinstance(metrics._exemplar_filter(), TraceBasedExemplarFilter)
    monkeypatch.setenv("OTEL_METRICS_EXEMPLAR_FILTER", "always_on")
    assert isinstance(metrics._exemplar_filter(), AlwaysOnExemplarFilter)


def test_messages_handled_is_counted_and_served() -> None:
    script = textwrap.dedent("""
        import urllib.request
        from interlock.runtime import metrics, otel
        port = metrics.configure(otel.resource("dispatcher", "d-1"), prometheus_port=0)
        handled = metrics.bound_counter(metrics.messages_handled, {"service": "dispatcher", "consumer": "results"})
        for _ in range(3):
            handled.add(1)
        metrics.messages_handled.add(2, {"service": "dispatcher", "consumer": "events"})
        print(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    """)
    body = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          timeout=60).stdout
    samples = {line.rpartition(" ")[0]: line.rpartition(" ")[2] for line in body.splitlines()
               if line.startswith("interlock_messages_handled_total{")}
    by_consumer = {next(p for p in name.split(",") if "consumer=" in p).split('"')[1]: float(value)
                   for name, value in samples.items()}
    assert by_consumer == {"results": 3.0, "events": 2.0}, body[:1500]


def test_a_ratio_over_run_ids_keeps_that_share_of_runs() -> None:
    from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased
    run_traces = [uuid.uuid4().int for _ in range(2000)]

    def kept(sampler: TraceIdRatioBased) -> int:
        return sum(sampler.should_sample(None, t, "x").decision is Decision.RECORD_AND_SAMPLE for t in run_traces)

    # a UUID4's low 64 bits start with its variant bits: the SDK's 64-bit comparison keeps none
    assert kept(TraceIdRatioBased(0.25)) == 0
    assert 400 <= kept(tracing.RunTraceIdRatio(0.25)) <= 600  # 500 expected
    assert kept(tracing.RunTraceIdRatio(1.0)) == 2000 and kept(tracing.RunTraceIdRatio(0.0)) == 0


@pytest.mark.parametrize("value", [
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
    "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # invalid trace id
    "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # invalid span id
    "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",  # upper case: not W3C
    " 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01 ",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
    "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-future",
    "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "garbage", "",
])
def test_context_of_reads_a_traceparent_as_the_sdks_propagator_does(value: str) -> None:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    def seen(context: object) -> tuple[int, int, int, bool]:
        ctx = trace.get_current_span(context).get_span_context()  # type: ignore[arg-type]
        return ctx.trace_id, ctx.span_id, int(ctx.trace_flags), ctx.is_remote

    expected = TraceContextTextMapPropagator().extract({h.TRACEPARENT: value} if value else {})
    assert seen(tracing.context_of(value)) == seen(expected)
