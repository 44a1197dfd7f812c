"""Model usage (tokens, cost) summed over calls, and the budgets it may not exceed.

Budgets come from two places: a step's policy constraints (``@constraint_max_cost_usd("0.50")``,
``@constraint_max_tokens("20000")`` on the permit that allowed it; the values are Cedar strings)
and a workflow's ``budget: {max_cost_usd, max_tokens}`` for the whole run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from interlock.contracts.messages import LlmCall

LIMITS = ("max_cost_usd", "max_tokens")


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    calls: int = 0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens,
                     self.cost_usd + other.cost_usd, self.calls + other.calls)

    def describe(self) -> str:
        return f"{self.calls} model call(s), {self.input_tokens}+{self.output_tokens} tokens, ${self.cost_usd:.4f}"


def total(calls: Iterable[LlmCall]) -> Usage:
    usage = Usage()
    for call in calls:
        usage += Usage(call.input_tokens, call.output_tokens, call.cost_usd, 1)
    return usage


@dataclass(frozen=True)
class Overrun:
    limit: str
    allowed: float
    spent: float

    def describe(self, what: str) -> str:
        unit = "$" if self.limit == "max_cost_usd" else ""
        spent = f"{self.spent:.4f}" if unit else f"{self.spent:g}"
        return f"budget exceeded: {what} spent {unit}{spent}, over {self.limit} {unit}{self.allowed:g}"


class BudgetError(ValueError):
    """A budget limit that is not a non-negative number."""


def parse_limits(limits: Mapping[str, Any]) -> dict[str, float]:
    """The budget limits in ``limits`` (policy constraints or a workflow's budget) as numbers;
    other keys are ignored. Raises :class:`BudgetError` naming a limit that is not a number >= 0."""
    parsed = {}
    for name in LIMITS:
        if name not in limits or limits[name] is None:
            continue
        try:
            value = float(limits[name])
        except (TypeError, ValueError):
            raise BudgetError(f"{name} must be a number, got {limits[name]!r}") from None
        if value < 0:
            raise BudgetError(f"{name} must not be negative, got {value:g}")
        parsed[name] = value
    return parsed


def overrun(usage: Usage, limits: Mapping[str, float]) -> Overrun | None:
    """The first limit ``usage`` exceeds, or None."""
    if "max_cost_usd" in limits and usage.cost_usd > limits["max_cost_usd"]:
        return Overrun("max_cost_usd", limits["max_cost_usd"], usage.cost_usd)
    if "max_tokens" in limits and usage.tokens > limits["max_tokens"]:
        return Overrun("max_tokens", limits["max_tokens"], float(usage.tokens))
    return None
