"""Budgets (pure) and the auditor's log-derived metrics (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from interlock.auditor.metrics import LogMetrics
from interlock.contracts.messages import LlmCall
from interlock.core import usage


def call(tokens: tuple[int, int] = (100, 50), cost: float = 0.01) -> LlmCall:
    return LlmCall(provider="p", model="m", input_tokens=tokens[0], output_tokens=tokens[1], cost_usd=cost)


def test_totals_and_the_first_limit_crossed() -> None:
    total = usage.total([call(), call((10, 5), 0.5)])
    assert (total.input_tokens, total.output_tokens, total.tokens, total.calls) == (110, 55, 165, 2)
    assert total.cost_usd == pytest.approx(0.51)
    assert usage.overrun(total, {"max_cost_usd": 1.0, "max_tokens": 200}) is None
    over = usage.overrun(total, {"max_cost_usd": 0.5, "max_tokens": 100})
    assert over is not None and (over.limit, over.allowed) == ("max_cost_usd", 0.5)
    assert usage.overrun(total, {"max_tokens": 164}) == usage.Overrun("max_tokens", 164, 165.0)
    assert usage.overrun(total, {"max_tokens": 165}) is None, "reaching the limit is not exceeding it"


def test_limits_are_parsed_from_cedar_strings_and_bad_ones_named() -> None:
    assert usage.parse_limits({"max_cost_usd": "0.50", "max_tokens": "2000", "region": "eu"}) == {
        "max_cost_usd": 0.5, "max_tokens": 2000.0}
    with pytest.raises(usage.BudgetError, match="max_tokens must be a number, got 'lots'"):
        usage.parse_limits({"max_tokens": "lots"})
    with pytest.raises(usage.BudgetError, match="must not be negative"):
        usage.parse_limits({"max_cost_usd": "-1"})


def env(seq: int, kind: str, at: str, step: str | None = None, **data: Any) -> dict[str, Any]:
    return {"seq": seq, "type": kind, "at": f"2026-12-02T10:00:{at}Z", "step_id": step,
            "data": {**data, **({"step_id": step} if step else {})}}


def test_log_metrics_from_a_run() -> None:
    metrics = LogMetrics()
    run = [
        env(1, "RunStarted", "00", workflow_id="wf"),
        env(2, "StepReady", "00", "a", topic="t.a"),
        env(3, "PolicyDecided", "00", "a", decision="allow", rule_ids=["r1", "r2"]),
        env(4, "StepDispatched", "01", "a", attempt=1, topic="t.a"),
        env(5, "StepFailed", "02", "a", attempt=1, final=False),
        env(6, "RetryScheduled", "02", "a", attempt=2),
        env(7, "StepDispatched", "03", "a", attempt=2, topic="t.a"),
        env(8, "StepSucceeded", "05", "a", attempt=2,
            usage=[{"model": "gpt", "input_tokens": 7, "output_tokens": 3, "cost_usd": 0.25}]),
        env(9, "ApprovalRequested", "05", "g"),
    ]
    seen = [(o.instrument, o.value, o.labels) for o in metrics.observe("acme", "r-1", run)]
    base = {"tenant": "acme", "workflow": "wf"}
    assert seen == [
        ("runs_started", 1, base),
        ("policy_decisions", 1, {**base, "outcome": "allow", "rule": "r1"}),
        ("policy_decisions", 1, {**base, "outcome": "allow", "rule": "r2"}),
        ("scheduling_delay", 1.0, {**base, "topic": "t.a"}),
        ("step_duration", 1.0, {**base, "topic": "t.a", "status": "failed"}),
        ("retries", 1, {**base, "topic": "t.a"}),
        ("step_duration", 2.0, {**base, "topic": "t.a", "status": "succeeded"}),
        ("llm_tokens", 7, {**base, "topic": "t.a", "model": "gpt", "direction": "input"}),
        ("llm_tokens", 3, {**base, "topic": "t.a", "model": "gpt", "direction": "output"}),
        ("llm_cost", 0.25, {**base, "topic": "t.a", "model": "gpt"}),
        ("approval_requested", 1, base),
    ]
    (count, oldest), = metrics.pending_approvals().values()
    assert count == 1 and oldest.second == 5
    ended = metrics.observe("acme", "r-1", [env(10, "RunCancelled", "09")])
    assert [(o.instrument, o.labels["status"]) for o in ended] == [("runs_ended", "cancelled")]
    assert metrics.pending_approvals() == {}, "a run's end clears its pending approvals"


def test_log_metrics_forget_the_oldest_runs_beyond_the_bound() -> None:
    metrics = LogMetrics(max_runs=2)
    for run in ("r1", "r2", "r3"):
        metrics.observe("t", run, [env(1, "RunStarted", "00", workflow_id=f"wf-{run}")])
    late = metrics.observe("t", "r1", [env(2, "RunSucceeded", "01")])
    assert late[0].labels["workflow"] == "unknown", "r1 was forgotten (bounded memory)"
    kept = metrics.observe("t", "r3", [env(2, "RunSucceeded", "01")])
    assert kept[0].labels["workflow"] == "wf-r3"
