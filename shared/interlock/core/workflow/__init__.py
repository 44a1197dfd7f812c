"""Workflow definitions: YAML loader, validated model and Jinja2 templates."""

from ._guard import ContentRules, Guard, OnViolation, Rule
from ._load import LoadSettings, decode_workflow, load_workflow, parse_workflow, read_workflow_file, workflow_files
from ._model import (
    BreakerSpec,
    Cache,
    Concurrency,
    OnError,
    Rate,
    RetryPolicy,
    Step,
    StepType,
    WhenOpen,
    Workflow,
    duration_ms,
)
from ._problems import Problem, WorkflowInvalid, format_problems
from ._schedule import Missed, Schedule, every_seconds, zone
from ._templates import TemplateError, evaluate_condition, evaluate_for_each, render_input, render_text

__all__ = [
    "BreakerSpec",
    "Cache",
    "Concurrency",
    "ContentRules",
    "Guard",
    "LoadSettings",
    "Missed",
    "OnError",
    "OnViolation",
    "Problem",
    "Rate",
    "RetryPolicy",
    "Rule",
    "Schedule",
    "Step",
    "StepType",
    "TemplateError",
    "WhenOpen",
    "Workflow",
    "WorkflowInvalid",
    "decode_workflow",
    "duration_ms",
    "evaluate_condition",
    "evaluate_for_each",
    "every_seconds",
    "format_problems",
    "load_workflow",
    "parse_workflow",
    "read_workflow_file",
    "render_input",
    "render_text",
    "workflow_files",
    "zone",
]
