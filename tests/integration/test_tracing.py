"""A run's jobs share one trace, continued by the worker from the job's traceparent."""

from __future__ import annotations

import uuid

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from interlock.worker import JobContext, Worker
from tests.integration.harness import Harness, types, unique

pytestmark = pytest.mark.integration


def memory_exporter() -> InMemorySpanExporter:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):  # the global provider can be set once per process
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


async def test_jobs_of_a_run_are_spans_of_the_runs_trace(harness: Harness) -> None:
    exporter = memory_exporter()
    wf, topic = unique("traced"), unique("t")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  a: {{topic: {topic}}}
  b: {{topic: {topic}, depends_on: [a]}}
""")
    worker = Worker("traced")

    @worker.job(topic)
    async def handle(ctx: JobContext) -> dict[str, str]:
        span = trace.get_current_span().get_span_context()
        return {"trace": format(span.trace_id, "032x")}

    await harness.start_worker(worker)
    run_id = await harness.trigger(wf, {})
    events = await harness.wait_end(run_id)
    assert types(events)[-1] == "RunSucceeded"
    spans = [s for s in exporter.get_finished_spans()  # the worker's spans (services add their own)
             if s.attributes and s.attributes.get("interlock.run_id") == run_id and s.name.startswith("job ")]
    assert sorted(str(s.attributes["interlock.step_id"]) for s in spans if s.attributes) == ["a", "b"]
    assert {s.context.trace_id for s in spans if s.context} == {uuid.UUID(run_id).int}
    assert all(s.name == f"job {topic}" and s.parent is not None for s in spans)
    state = await harness.run_state(run_id)
    assert state.steps["a"].output == {"trace": uuid.UUID(run_id).hex}
