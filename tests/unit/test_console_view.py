"""The web console's pure parts: the DAG layout and SVG, redaction, and the templates rendering."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from interlock.api.console._dag import NODE_W, layout, render_dag
from interlock.api.console._view import REDACTED, environment, pretty, redact, until
from interlock.core.workflow import Workflow, load_workflow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "incident-remediation" / "workflow.yaml"


def example() -> Workflow:
    return load_workflow(EXAMPLE.read_text(), filename=str(EXAMPLE))


def test_layout_puts_each_step_right_of_everything_it_depends_on_and_parallel_steps_in_one_column() -> None:
    wf = example()
    placed = layout(wf)
    assert set(placed) == set(wf.steps)
    for sid, step in wf.steps.items():
        for dep in step.depends_on:
            assert placed[dep].column < placed[sid].column, (dep, sid)
            assert placed[dep].x + NODE_W < placed[sid].x
    assert placed["classify"].column == placed["enrich"].column == 1
    assert placed["classify"].y != placed["enrich"].y, "parallel steps must not overlap"
    assert [placed[s].column for s in ("detect", "patch_plan", "approval_gate", "apply_patch", "notify")] == \
        [0, 2, 3, 4, 5]


def test_the_svg_colours_each_node_by_its_state_and_escapes_step_ids() -> None:
    wf = example()
    svg = str(render_dag(wf, {"detect": "succeeded", "classify": "running", "approval_gate": "awaiting_approval"}))
    assert re.search(r'class="node st-succeeded" data-step="detect" data-state="succeeded"', svg)
    assert re.search(r'class="node st-running" data-step="classify"', svg)
    assert re.search(r'class="node st-waiting" data-step="approval_gate"', svg)
    assert re.search(r'class="node st-pending" data-step="notify" data-state="pending"', svg)
    assert svg.count('class="edge done"') == 2, "detect's two outgoing edges are done"
    assert svg.count("<path class=\"edge") == sum(len(s.depends_on) for s in wf.steps.values())
    hostile = load_workflow('id: x\nversion: 1\nsteps:\n  a: {topic: t.a}\n')
    assert "<script" not in str(render_dag(hostile, {"a": "<script>"}))


def test_redaction_hides_sensitive_keys_at_any_depth_and_keeps_the_rest() -> None:
    value = {"host": "web-7", "api_key": "sk-123", "nested": [{"Password": "hunter2", "ok": 1}],
             "auth": {"token": "t"}, "note": None, "tokens_used": 5}
    out = redact(value)
    assert out["host"] == "web-7" and out["nested"][0]["ok"] == 1
    assert out["api_key"] == out["nested"][0]["Password"] == out["auth"] == REDACTED
    assert out["note"] is None
    text = pretty(value)
    assert "sk-123" not in text and "hunter2" not in text and "web-7" in text
    assert pretty(None) == "—"


def test_until_says_expired_for_a_past_time() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert until((now - timedelta(seconds=1)).isoformat(), now) == "expired"
    assert until((now + timedelta(minutes=30)).isoformat(), now) == "in 30 min"
    assert until(None, now) == "never"


def test_every_template_compiles() -> None:
    env = environment()
    names = env.list_templates()
    assert {"base.html", "runs.html", "run.html", "approvals.html", "agents.html", "dead_letters.html",
            "policy.html", "login.html"} <= set(names)
    for name in names:
        env.get_template(name)
