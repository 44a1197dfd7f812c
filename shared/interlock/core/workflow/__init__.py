"""Workflow definitions: YAML loader, validated model and Jinja2 templates."""

from ._load import LoadSettings, decode_workflow, load_workflow, parse_workflow, read_workflow_file
from ._model import Concurrency, OnError, Rate, RetryPolicy, Step, StepType, Workflow
from ._problems import Problem, WorkflowInvalid, format_problems
from ._templates import TemplateError, evaluate_condition, evaluate_for_each, render_input, render_text

__all__ = [
    "Concurrency",
    "LoadSettings",
    "OnError",
    "Problem",
    "Rate",
    "RetryPolicy",
    "Step",
    "StepType",
    "TemplateError",
    "Workflow",
    "WorkflowInvalid",
    "decode_workflow",
    "evaluate_condition",
    "evaluate_for_each",
    "format_problems",
    "load_workflow",
    "parse_workflow",
    "read_workflow_file",
    "render_input",
    "render_text",
]
