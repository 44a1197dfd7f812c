"""The run page's DAG: an SVG computed on the server from the workflow and each step's state.

Layout: a step's column is the length of the longest dependency path to it; within a column
steps are ordered by the mean row of their dependencies (one barycentre pass keeps edges
from crossing in the usual fan-out/fan-in shapes), ties by the workflow's topological order.
Nothing here does I/O: the run page and its live refresh both call :func:`render_dag`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from markupsafe import Markup, escape

from interlock.core.workflow import Workflow

NODE_W, NODE_H = 168, 48
COL_GAP, ROW_GAP, PAD = 56, 18, 12

# step status (interlock.core.run.StepStatus, or "pending": not reached yet) -> the node's look
STATE_CLASS: dict[str, str] = {
    "pending": "pending",
    "ready": "queued",
    "released": "queued",
    "dispatched": "running",
    "running": "running",
    "retry_wait": "retrying",
    "timed_out": "retrying",
    "awaiting_approval": "waiting",
    "expanded": "running",
    "succeeded": "succeeded",
    "failed": "failed",
    "denied": "denied",
    "skipped": "skipped",
    "cancelled": "skipped",
}

STATE_LABEL: dict[str, str] = {
    "pending": "pending",
    "ready": "policy check",
    "released": "released",
    "dispatched": "dispatched",
    "running": "running",
    "retry_wait": "retry scheduled",
    "timed_out": "attempt timed out",
    "awaiting_approval": "awaiting approval",
    "expanded": "items running",
    "succeeded": "succeeded",
    "failed": "failed",
    "denied": "denied by policy",
    "skipped": "skipped",
    "cancelled": "cancelled",
}


@dataclass(frozen=True)
class Placed:
    """A step's box: column, row and the SVG coordinates of its top-left corner."""

    step_id: str
    column: int
    row: int
    x: int
    y: int


def layout(workflow: Workflow) -> dict[str, Placed]:
    """Every step of ``workflow`` placed on a grid (see the module docstring)."""
    order = workflow.topological_order()
    column: dict[str, int] = {}
    for sid in order:
        deps = workflow.steps[sid].depends_on
        column[sid] = 1 + max((column[d] for d in deps), default=-1)
    rows: dict[str, float] = {}
    columns: dict[int, list[str]] = {}
    for sid in order:
        columns.setdefault(column[sid], []).append(sid)
    rank = {sid: i for i, sid in enumerate(order)}
    for col in sorted(columns):
        def weight(sid: str) -> tuple[float, int]:
            deps = workflow.steps[sid].depends_on
            mean = sum(rows[d] for d in deps) / len(deps) if deps else float(rank[sid])
            return (mean, rank[sid])

        members = sorted(columns[col], key=weight) if col else columns[col]
        for i, sid in enumerate(members):
            rows[sid] = float(i)
        columns[col] = members
    height = max(len(members) for members in columns.values()) if columns else 0
    placed: dict[str, Placed] = {}
    for col, members in columns.items():
        offset = (height - len(members)) * (NODE_H + ROW_GAP) / 2  # centre short columns
        for row, sid in enumerate(members):
            placed[sid] = Placed(sid, col, row, PAD + col * (NODE_W + COL_GAP),
                                 PAD + round(offset) + row * (NODE_H + ROW_GAP))
    return placed


def _edge(a: Placed, b: Placed, css: str) -> str:
    x1, y1 = a.x + NODE_W, a.y + NODE_H // 2
    x2, y2 = b.x, b.y + NODE_H // 2
    bend = (x2 - x1) // 2
    return (f'<path class="{css}" d="M{x1},{y1} C{x1 + bend},{y1} {x2 - bend},{y2} {x2 - 6},{y2}" '
            f'marker-end="url(#arrow)"/>')


def _short(text: str, limit: int = 20) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_dag(workflow: Workflow, states: Mapping[str, str], *, title: str = "") -> Markup:
    """The workflow's DAG as an inline SVG, each node coloured by ``states[step_id]`` (a step
    status; a step without one is pending). Nodes carry ``data-step`` and ``data-state``."""
    placed = layout(workflow)
    width = PAD * 2 + (max((p.x for p in placed.values()), default=0) - PAD) + NODE_W
    height = PAD * 2 + (max((p.y for p in placed.values()), default=0) - PAD) + NODE_H
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="dag" role="img" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" aria-label="{escape(title or workflow.id)} DAG">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="5" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z"/></marker></defs>']
    for sid, box in placed.items():
        for dep in workflow.steps[sid].depends_on:
            done = states.get(dep) == "succeeded"
            parts.append(_edge(placed[dep], box, "edge done" if done else "edge"))
    for sid, box in placed.items():
        state = states.get(sid, "pending")
        css = STATE_CLASS.get(state, "pending")
        step = workflow.steps[sid]
        kind = step.type.value if step.type.value != "job" else (step.topic or "job")
        parts.append(
            f'<g class="node st-{css}" data-step="{escape(sid)}" data-state="{escape(state)}" '
            f'transform="translate({box.x},{box.y})"><title>{escape(sid)}: {escape(STATE_LABEL.get(state, state))}'
            f' ({escape(kind)})</title>'
            f'<a href="#step-{escape(sid)}"><rect width="{NODE_W}" height="{NODE_H}" rx="7"/>'
            f'<text class="name" x="12" y="20">{escape(_short(sid))}</text>'
            f'<text class="state" x="12" y="37">{escape(STATE_LABEL.get(state, state))}</text></a></g>')
    parts.append("</svg>")
    return Markup("".join(parts))
