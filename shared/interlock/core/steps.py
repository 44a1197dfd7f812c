"""What every service knows about a run's steps: the step-id grammar, template context, schemas.

A run step is named after its workflow step; a for_each item adds ``[index]`` (``fan[3]``) and a
compensation job adds :data:`COMPENSATE_SUFFIX` (``charge~compensate``). The planner, policy,
approval and dispatcher all map run steps back to workflow steps with :func:`base_step_id`.
"""

from __future__ import annotations

from typing import Any

import jsonschema

from interlock.core.run import Run
from interlock.core.sealed import redact

COMPENSATE_SUFFIX = "~compensate"


def item_id(parent: str, index: int) -> str:
    """The run step of a for_each item (``fan``, 3 -> ``fan[3]``)."""
    return f"{parent}[{index}]"


def compensation_id(step_id: str) -> str:
    """The run step that undoes ``step_id``."""
    return step_id + COMPENSATE_SUFFIX


def base_step_id(step_id: str) -> str:
    """The workflow step a run step belongs to (``fan[3]`` -> ``fan``)."""
    return step_id.split("[", 1)[0].removesuffix(COMPENSATE_SUFFIX)


def is_workflow_step(step_id: str) -> bool:
    """True for a step the workflow declares, False for a for_each item or a compensation job."""
    return "[" not in step_id and not step_id.endswith(COMPENSATE_SUFFIX)


def template_context(run: Run, outputs: dict[str, Any], run_input: Any) -> dict[str, Any]:
    """What templates (inputs, conditions, prompts, messages) see: input, steps and the run.

    ``outputs`` holds resolved large outputs (a step whose output went to the object store);
    the others are read from the run.
    """
    steps: dict[str, Any] = {}
    for sid, st in run.steps.items():
        if is_workflow_step(sid):
            steps[sid] = {"output": outputs.get(sid, st.output), "status": st.status}
    return {
        "input": run_input,
        "steps": steps,
        "run": {"id": run.run_id, "tenant": run.tenant, "workflow": run.workflow_id},
    }


def schema_error(value: Any, schema: dict[str, Any]) -> str | None:
    """Why ``value`` does not match the JSON Schema (the most relevant error), or None. A sealed
    value is checked as the string ``"[sensitive]"`` (the services never open one)."""
    validator = jsonschema.Draft202012Validator(schema)
    best = jsonschema.exceptions.best_match(validator.iter_errors(redact(value)))
    if best is None:
        return None
    where = "/".join(str(p) for p in best.absolute_path) or "(root)"
    return f"at {where}: {best.message}"


def output_schema_error(value: Any, schema: dict[str, Any] | None) -> str | None:
    """Why a step's output does not match its ``output_schema`` (None when it does or has none)."""
    return None if schema is None else schema_error(value, schema)
