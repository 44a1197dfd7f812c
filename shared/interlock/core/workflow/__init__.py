"""Workflow definitions: YAML loader, validated model and Jinja2 templates."""

from ._load import load_workflow, parse_workflow
from ._model import OnError, RetryPolicy, Step, StepType, Workflow
from ._problems import Problem, WorkflowInvalid, format_problems
from ._templates import TemplateError, evaluate_condition, evaluate_for_each, render_input, render_text

__all__ = [
    "OnError",
    "Problem",
    "RetryPolicy",
    "Step",
    "StepType",
    "TemplateError",
    "Workflow",
    "WorkflowInvalid",
    "evaluate_condition",
    "evaluate_for_each",
    "format_problems",
    "load_workflow",
    "parse_workflow",
    "render_input",
    "render_text",
]
