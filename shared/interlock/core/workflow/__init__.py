"""Workflow definitions: YAML loader, validated model and Jinja2 templates."""

from ._load import LoadSettings, decode_workflow, load_workflow, parse_workflow, read_workflow_file
from ._model import Cache, OnError, RetryPolicy, Step, StepType, Workflow, duration_ms
from ._problems import Problem, WorkflowInvalid, format_problems
from ._schedule import Missed, Schedule, every_seconds, zone
from ._templates import TemplateError, evaluate_condition, evaluate_for_each, render_input, render_text

__all__ = [
    "Cache",
    "LoadSettings",
    "Missed",
    "OnError",
    "Problem",
    "RetryPolicy",
    "Schedule",
    "Step",
    "StepType",
    "TemplateError",
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
    "zone",
]
