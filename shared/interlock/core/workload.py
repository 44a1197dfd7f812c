"""Workload limits an operator sets for the whole deployment (``INTERLOCK_GATE_LIMITS``, JSON):
concurrency and rate per topic and per tenant, tenants' fair-share weights, and the backpressure
bound (jobs queued per topic). A workflow's own limits (``concurrency:``, ``rate:``) are in its
YAML (:mod:`interlock.core.workflow`); the dispatcher's gate applies both.

Example::

    INTERLOCK_GATE_LIMITS='{"topics": {"llm.summarize": {"concurrency": 4, "rate": {"per_s": 5, "burst": 10}}},
                           "tenants": {"acme": {"concurrency": 20, "weight": 2}, "*": {"concurrency": 50}},
                           "max_in_flight": 1000}'

``"*"`` is the entry for every topic (or tenant) without one of its own.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from interlock.core.workflow import Rate

DEFAULT_MAX_IN_FLIGHT = 1000
"""Jobs queued on one tenant's topic (published, not yet finished by a worker) before the
dispatcher holds new ones back: generous, so a busy topic is not slowed; it bounds the flood when
its agents are absent or slow."""

ANY = "*"


class ScopeLimits(BaseModel):
    """The limits of one topic or one tenant."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    concurrency: Annotated[int, Field(ge=1)] | None = None
    rate: Rate | None = None
    weight: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0  # a tenant's fair share (topics: unused)


class GateLimits(BaseModel):
    """Deployment-wide workload limits (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    topics: dict[str, ScopeLimits] = Field(default_factory=dict)
    tenants: dict[str, ScopeLimits] = Field(default_factory=dict)
    max_in_flight: Annotated[int, Field(ge=0)] = DEFAULT_MAX_IN_FLIGHT  # 0: no backpressure bound

    def topic(self, topic: str) -> ScopeLimits:
        return self.topics.get(topic) or self.topics.get(ANY) or ScopeLimits()

    def tenant(self, tenant: str) -> ScopeLimits:
        return self.tenants.get(tenant) or self.tenants.get(ANY) or ScopeLimits()

    def weight(self, tenant: str) -> float:
        return self.tenant(tenant).weight
