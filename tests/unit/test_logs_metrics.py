"""JSON logs carry run and trace context and never a secret; /metrics serves the instruments."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap

from opentelemetry.sdk.trace import TracerProvider

from interlock.runtime import logs


def _json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_log_carries_service_run_and_trace_context() -> None:
    out = io.StringIO()
    handler = logs.configure("json", service="planner", instance="host-1", stream=out)
    try:
        tracer = TracerProvider().get_tracer("test")
        with tracer.start_as_current_span("handle") as span, logs.bound(tenant="acme", run_id="r-1", step_id="detect",
                                                                       attempt=2):
            logging.getLogger("interlock.planner").info("step %s ready", "detect")
        ctx = span.get_span_context()
    finally:
        logging.getLogger().removeHandler(handler)
    (record,) = _json_lines(out)
    assert record["event"] == "step detect ready"
    assert record["level"] == "info" and record["logger"] == "interlock.planner"
    assert (record["service"], record["service_instance"]) == ("planner", "host-1")
    assert (record["tenant"], record["run_id"], record["step_id"], record["attempt"]) == ("acme", "r-1", "detect", 2)
    assert record["trace_id"] == format(ctx.trace_id, "032x")
    assert record["span_id"] == format(ctx.span_id, "016x")


def test_context_ends_with_the_block() -> None:
    out = io.StringIO()
    handler = logs.configure("json", service="dispatcher", stream=out)
    try:
        with logs.bound(run_id="r-2"):
            pass
        logging.getLogger("interlock").warning("outside")
    finally:
        logging.getLogger().removeHandler(handler)
    (record,) = _json_lines(out)
    assert "run_id" not in record and "trace_id" not in record


def test_secret_looking_keys_are_masked_at_any_depth() -> None:
    out = io.StringIO()
    handler = logs.configure("json", service="worker", stream=out)
    try:
        logging.getLogger("interlock").info("calling", extra={"api_key": "sk-live-123",
                                                              "request": {"headers": {"Authorization": "Bearer x"},
                                                                          "items": [{"password": "hunter2"}]}})
    finally:
        logging.getLogger().removeHandler(handler)
    text = out.getvalue()
    assert "sk-live-123" not in text and "Bearer x" not in text and "hunter2" not in text
    (record,) = _json_lines(out)
    assert record["api_key"] == logs.REDACTED
    assert record["request"] == {"headers": {"Authorization": logs.REDACTED}, "items": [{"password": logs.REDACTED}]}


def test_text_format_is_one_readable_line() -> None:
    out = io.StringIO()
    handler = logs.configure("text", service="auditor", stream=out)
    try:
        with logs.bound(run_id="r-3"):
            logging.getLogger("interlock.auditor").error("projection behind")
    finally:
        logging.getLogger().removeHandler(handler)
    (line,) = out.getvalue().splitlines()
    assert "projection behind" in line and "run_id=r-3" in line and "error" in line
    assert not line.lstrip().startswith("{")


def test_metrics_endpoint_serves_recorded_instruments() -> None:
    # a meter provider is process-global: scrape from a fresh interpreter
    script = textwrap.dedent("""
        import urllib.request
        from interlock.runtime import metrics, otel
        port = metrics.configure(otel.resource("planner", "host-1"), prometheus_port=0)
        metrics.runs_started.add(3, {"tenant": "acme", "workflow": "wf"})
        metrics.step_duration.record(0.02, {"topic": "incident.detect", "status": "succeeded"})
        metrics.gauges.consumer_pending[("IL_EVENTS", "planner")] = 7
        print(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    """)
    body = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          timeout=60).stdout
    lines = body.splitlines()

    def sample(prefix: str) -> str:
        matches = [line for line in lines if line.startswith(prefix)]
        assert matches, f"no {prefix} in /metrics:\n{body[:2000]}"
        return matches[0]

    assert sample("interlock_runs_started_total{").endswith(" 3.0")
    assert 'workflow="wf"' in sample("interlock_runs_started_total{")
    assert sample('interlock_step_duration_seconds_bucket{le="0.025"').endswith(" 1.0")
    assert sample('interlock_step_duration_seconds_bucket{le="0.01"').endswith(" 0.0")
    assert sample("interlock_consumer_pending{").endswith(" 7.0")
    assert 'service_name="interlock-planner"' in sample("target_info{")
