"""Policy decisions per second: ``CedarPolicy.decide`` on a realistic bundle, against a trivial baseline.

    python -m bench.policy_bench [--requests 4000] [--repeat 5]

The bundle has about twenty rules of the kinds a deployment would write: admission, job
permits with constraints, topic globs, risk labels, tenant and workflow scoping, agent
capabilities, input attributes and business hours, and approval gates with roles, expiry and
escalation. The requests vary tenant, workflow, step, topic, labels, capabilities, input and
time, so every rule is exercised and all three decisions occur.

The baseline is a Python function that returns an "allow" outcome for each request, measured in
the same run over the same requests: the ratio says how much a real policy decision costs
compared with doing nothing but the call. Nothing here is asserted; the figures are printed.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from interlock.core.policy.cedar import CedarPolicy, PolicyBundle
from interlock.core.policy.engine import JobRequest, PolicyOutcome

T = TypeVar("T")

BUNDLE = """\
// A realistic production bundle: ~20 rules.
@id("start-known-tenants")
permit(principal, action == Action::"start", resource)
when { ["acme", "globex", "initech", "umbrella"].contains(resource.tenant) };

@id("no-bot-prod-runs") @reason("bots may not start production runs")
forbid(principal, action == Action::"start", resource)
when { resource.requested_by like "bot:*" && context.input has env && context.input.env == "prod" };

@id("allow-jobs") @constraint_max_runtime_s("900")
permit(principal, action == Action::"dispatch", resource);

@id("allow-k8s") @constraint_namespace_prefix("team-")
permit(principal, action == Action::"dispatch", resource) when { resource.topic like "k8s.*" };

@id("allow-db-read") @constraint_read_only("true")
permit(principal, action == Action::"dispatch", resource) when { resource.topic like "db.read.*" };

@id("unattended-default")
permit(principal, action == Action::"dispatch_unattended", resource);

@id("db-drop-forbidden") @reason("dropping databases is never automated")
forbid(principal, action == Action::"dispatch", resource) when { resource.topic like "db.*.drop" };

@id("umbrella-suspended") @reason("tenant umbrella is suspended")
forbid(principal, action == Action::"dispatch", resource) when { resource.tenant == "umbrella" };

@id("legacy-workflow-retired") @reason("workflow legacy-etl is retired")
forbid(principal, action == Action::"dispatch", resource) when { principal == Workflow::"legacy-etl" };

@id("no-ssh-agents") @reason("agents with shell access may not run payments jobs")
forbid(principal, action == Action::"dispatch", resource)
when { resource.capabilities.contains("ssh") && resource.topic like "payments.*" };

@id("old-agents") @reason("agent versions before 2 are not trusted")
forbid(principal, action == Action::"dispatch", resource) when { resource.agent_version == "1.9" };

@id("huge-batches") @reason("batches over 10000 items are refused")
forbid(principal, action == Action::"dispatch", resource)
when { context.input has items && context.input.items > 10000 };

@id("high-risk-needs-approval") @reason("high-risk jobs need a person")
@approver_role("sre") @approval_expires_ms("3600000") @escalate_after_ms("900000") @escalate_to_role("sre-lead")
forbid(principal, action == Action::"dispatch_unattended", resource) when { resource.risk == "high" };

@id("prod-k8s-needs-approval") @reason("production cluster changes need an SRE")
@approver_role("sre")
forbid(principal, action == Action::"dispatch_unattended", resource)
when { resource.topic like "k8s.*" && context.input has env && context.input.env == "prod" };

@id("payments-team") @approver_role("payments-leads")
forbid(principal, action == Action::"dispatch_unattended", resource)
when { resource.labels has team && resource.labels.team == "payments" && resource.step like "*refund*" };

@id("after-hours") @reason("after-hours changes need the on-call") @approver_role("oncall")
forbid(principal, action == Action::"dispatch_unattended", resource)
when { resource.topic like "k8s.*" && (context.hour < 7 || context.hour >= 19) };

@id("weekend-freeze") @reason("weekend change freeze") @approver_role("oncall")
forbid(principal, action == Action::"dispatch_unattended", resource)
when { context.weekday >= 6 && resource.step_type == "job" && resource.risk != "low" };

@id("big-amounts") @approver_role("finance")
forbid(principal, action == Action::"dispatch_unattended", resource)
when { context.input has amount && context.input.amount > 5000 };

@id("globex-pinned-version") @reason("globex runs only workflow version 2")
forbid(principal, action == Action::"dispatch", resource)
when { principal.tenant == "globex" && principal.version == "1" };

@id("notify-unattended")
permit(principal, action == Action::"dispatch_unattended", resource) when { resource.step_type == "notify" };
"""

# (value, weight): most jobs are allowed, as in a real deployment; the rest are held or denied
TENANTS = [("acme", 50), ("globex", 25), ("initech", 22), ("umbrella", 3)]
WORKFLOWS = [("deploy", 30), ("db-maintenance", 15), ("payments-refund", 15), ("incident-remediation", 37),
             ("legacy-etl", 3)]
TOPICS = [("k8s.apply", 10), ("k8s.rollout", 8), ("db.read.users", 12), ("db.orders.drop", 2),
          ("db.write.orders", 8), ("payments.refund", 8), ("payments.charge", 8), ("notify.slack", 10),
          ("llm.summarise", 20), ("http.fetch", 14)]
STEPS = ["plan", "apply", "verify", "issue_refund", "notify", "summarise"]
CAPABILITIES = [((), 20), (("http",), 45), (("http", "ssh"), 10), (("gpu",), 20), (("ssh",), 5)]
AGENT_VERSIONS = [("2.0", 40), ("2.1", 40), ("", 17), ("1.9", 3)]


def pick(rng: random.Random, weighted: Sequence[tuple[T, int]]) -> T:
    return rng.choices([v for v, _ in weighted], [w for _, w in weighted])[0]


def requests(n: int, seed: int = 7) -> list[JobRequest]:
    rng = random.Random(seed)
    start = datetime(2024, 5, 13, tzinfo=UTC)  # a Monday
    out = []
    for i in range(n):
        labels: dict[str, str] = {}
        if rng.random() < 0.3:
            labels["risk"] = rng.choice(["low", "medium", "high"])
        if rng.random() < 0.3:
            labels["team"] = rng.choice(["payments", "platform", "search"])
        job_input: dict[str, object] = {"env": rng.choice(["dev", "staging", "prod"])}
        if rng.random() < 0.3:
            job_input["amount"] = rng.randint(1, 10_000)
        if rng.random() < 0.2:
            job_input["items"] = rng.randint(1, 11_000)
        if rng.random() < 0.2:
            job_input["target"] = {"region": rng.choice(["eu", "us"]), "replicas": rng.randint(1, 9), "ratio": 0.5}
        step_type = "notify" if rng.random() < 0.1 else "job"
        out.append(JobRequest(
            tenant=pick(rng, TENANTS), workflow_id=pick(rng, WORKFLOWS), workflow_version=rng.choice(["1", "2", "2"]),
            step_id=rng.choice(STEPS), step_type=step_type, topic=None if step_type == "notify" else pick(rng, TOPICS),
            labels=labels, input=job_input, job_hash=f"{i:064x}", require_approval=rng.random() < 0.05,
            approvers="approver", now=start + timedelta(minutes=rng.randint(0, 7 * 24 * 60)),
            capabilities=pick(rng, CAPABILITIES), agent_version=pick(rng, AGENT_VERSIONS),
        ))
    return out


def baseline(request: JobRequest) -> PolicyOutcome:
    """The trivial engine: everything is allowed."""
    return PolicyOutcome("allow", "baseline@0", ["allow"])


def rate(decide: Callable[[JobRequest], PolicyOutcome], reqs: Sequence[JobRequest], repeat: int) -> float:
    """Best-of-``repeat`` decisions per second over all of ``reqs``."""
    for r in reqs[: min(200, len(reqs))]:  # warm up
        decide(r)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for r in reqs:
            decide(r)
        best = min(best, time.perf_counter() - t0)
    return len(reqs) / best


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.policy_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000, help="distinct requests per pass")
    parser.add_argument("--repeat", type=int, default=5, help="passes; the fastest counts")
    args = parser.parse_args(argv)

    engine = CedarPolicy(PolicyBundle.of("bench", BUNDLE))
    rules = len(engine.annotations)
    reqs = requests(args.requests)
    mix = Counter(engine.decide(r).decision for r in reqs)
    admissions = Counter(engine.admit(tenant=r.tenant, workflow_id=r.workflow_id,
                                      workflow_version=r.workflow_version, run_input=r.input,
                                      idempotency_key=r.job_hash, requested_by="bot:ci" if i % 3 else "alice",
                                      now=r.now).decision for i, r in enumerate(reqs))

    cedar_rate = rate(engine.decide, reqs, args.repeat)
    base_rate = rate(baseline, reqs, args.repeat)

    print(f"policy bundle: {rules} rules ({engine.snapshot_id}); {len(reqs)} distinct requests, "
          f"best of {args.repeat} passes")
    print(f"decision mix: {', '.join(f'{k} {v}' for k, v in sorted(mix.items()))}; "
          f"admission: {', '.join(f'{k} {v}' for k, v in sorted(admissions.items()))}")
    print(f"CedarPolicy.decide:       {cedar_rate:>12,.0f} decisions/s  ({1e6 / cedar_rate:8.1f} µs each)")
    print(f"baseline (return allow):  {base_rate:>12,.0f} decisions/s  ({1e6 / base_rate:8.3f} µs each)")
    print(f"ratio: the baseline is {base_rate / cedar_rate:,.0f}x faster; a Cedar decision costs "
          f"{1e6 / cedar_rate - 1e6 / base_rate:.1f} µs more per job")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
