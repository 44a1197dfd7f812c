"""The pure policy engine: Cedar bundles deciding allow, deny or require approval, without I/O.

Loading, publishing and watching bundles (NATS KV) is :mod:`interlock.runtime.policy`.
"""

from interlock.core.policy.cedar import DEFAULT_BUNDLE, CedarPolicy, Explanation, PolicyBundle, PolicyError
from interlock.core.policy.decisions import decide_step, hash_problem, record_decision
from interlock.core.policy.engine import Decision, JobRequest, PolicyEngine, PolicyOutcome
from interlock.core.policy.requests import request_for

__all__ = [
    "DEFAULT_BUNDLE",
    "CedarPolicy",
    "Decision",
    "Explanation",
    "JobRequest",
    "PolicyBundle",
    "PolicyEngine",
    "PolicyError",
    "PolicyOutcome",
    "decide_step",
    "hash_problem",
    "record_decision",
    "request_for",
]
