"""Model usage: recorded by agents, kept in the outcome events, shown in the timeline, summed by
the usage query; budgets per step (policy constraints) and per run (workflow) are enforced."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from interlock.auditor.service import AuditorService
from interlock.core.workflow import WorkflowInvalid, load_workflow
from interlock.planner.service import PlannerService
from interlock.runtime.settings import TenantBudget
from interlock.worker import JobContext, Worker
from tests.integration.harness import Harness, types, unique
from tests.integration.test_governance import Bundles, bundles, quiet, with_rules

pytestmark = pytest.mark.integration
__all__ = ["bundles"]  # the fixture, used by name


def llm_worker(topic: str, *, tokens: tuple[int, int] = (1200, 300), cost: float = 0.02,
               prompt: str = "Classify this alert") -> Worker:
    worker = Worker(unique("llm"))

    @worker.job(topic)
    async def handle(ctx: JobContext) -> dict[str, Any]:
        ctx.record_llm(provider="openai", model="gpt-test", input_tokens=tokens[0], output_tokens=tokens[1],
                       cost_usd=cost, temperature=0.2, prompt_ref="prompts/classify@3", prompt=prompt)
        return {"step": ctx.job.step_id}

    return worker


async def projected(auditor: AuditorService, run_id: str, timeout: float = 15.0, tenant: str = "default") -> None:
    """Wait until the auditor's projection has the run's end."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        status = await auditor.projection.status(run_id, tenant)
        if status is not None and status["status"] not in ("running", "compensating"):
            return
        assert asyncio.get_running_loop().time() < deadline, f"run {run_id} not projected: {status}"
        await asyncio.sleep(0.05)


async def test_usage_is_stored_in_the_outcome_shown_in_the_timeline_and_summed(
        harness: Harness, auditor: AuditorService) -> None:
    wf, topic = unique("usage"), unique("t")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  a: {{topic: {topic}}}
  b: {{topic: {topic}, depends_on: [a]}}
""")
    await harness.start_worker(llm_worker(topic))
    run_id = await harness.trigger(wf, {})
    events = await harness.wait_end(run_id)
    assert types(events)[-1] == "RunSucceeded"
    succeeded = [e for e in events if e["type"] == "StepSucceeded"]
    call = succeeded[0]["data"]["usage"][0]
    assert (call["provider"], call["model"], call["input_tokens"], call["output_tokens"], call["cost_usd"],
            call["temperature"], call["prompt_ref"]) == ("openai", "gpt-test", 1200, 300, 0.02, 0.2,
                                                         "prompts/classify@3")
    assert call["prompt"] is None, "the workflow did not opt in to recording prompts"
    state = await harness.run_state(run_id)
    assert sum(c.cost_usd for c in state.usage) == pytest.approx(0.04)

    await projected(auditor, run_id)
    timeline = await auditor.projection.timeline(run_id, "default")
    assert timeline is not None
    lines = [row["summary"] for row in timeline if row["type"] == "StepSucceeded"]
    assert lines and all("gpt-test: 1200+300 tokens, $0.0200" in line for line in lines), lines
    by_run = await auditor.projection.usage(tenant="default", group_by="run", run_id=run_id)
    assert by_run == [{"key": run_id, "runs": 1, "calls": 2, "input_tokens": 2400, "output_tokens": 600,
                       "cost_usd": 0.04}]
    by_workflow = await auditor.projection.usage(tenant="default", group_by="workflow", workflow_id=wf)
    assert by_workflow[0]["key"] == wf and by_workflow[0]["cost_usd"] == pytest.approx(0.04)
    assert await auditor.projection.usage(tenant="someone-else", group_by="run", run_id=run_id) == []


async def test_prompts_are_kept_only_when_the_workflow_opts_in(harness: Harness) -> None:
    wf, topic = unique("prompts"), unique("t")
    await harness.apply(f"""
id: {wf}
version: 1
record_prompts: true
steps:
  a: {{topic: {topic}}}
""")
    await harness.start_worker(llm_worker(topic, prompt="Summarise incident 42"))
    run_id = await harness.trigger(wf, {})
    events = await harness.wait_end(run_id)
    call = next(e for e in events if e["type"] == "StepSucceeded")["data"]["usage"][0]
    assert call["prompt"] == "Summarise incident 42"


async def test_a_result_over_its_policy_budget_fails_the_step_without_retrying(
        harness: Harness, bundles: Bundles) -> None:
    wf, topic = unique("stepbudget"), unique("t")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  a: {{topic: {topic}, retries: {{max_attempts: 3, backoff_ms: 10}}}}
""")
    await bundles.publish(with_rules(f"""
@id("cheap-{topic}")
@constraint_max_cost_usd("0.01")
permit(principal, action == Action::"dispatch", resource) when {{ resource.topic == "{topic}" }};
"""))
    await harness.start_worker(llm_worker(topic, cost=0.03))
    run_id = await harness.trigger(wf, {})
    events = await harness.wait_end(run_id)
    assert types(events)[-1] == "RunFailed"
    failed = [e for e in events if e["type"] == "StepFailed"]
    assert len(failed) == 1 and failed[0]["data"]["final"], "spent money is not retried"
    error = failed[0]["data"]["error"]
    assert error["kind"] == "budget" and not error["retryable"]
    assert error["message"] == "budget exceeded: step 'a' spent $0.0300, over max_cost_usd $0.01"
    assert failed[0]["data"]["usage"][0]["cost_usd"] == 0.03, "the spend is still on record"
    assert "RetryScheduled" not in types(events)


async def test_a_run_over_its_budget_ends_and_dispatches_nothing_more(harness: Harness) -> None:
    wf, topic = unique("runbudget"), unique("t")
    await harness.apply(f"""
id: {wf}
version: 1
budget: {{max_tokens: 2500}}
steps:
  a: {{topic: {topic}}}
  b: {{topic: {topic}, depends_on: [a]}}
  c: {{topic: {topic}, depends_on: [b]}}
""")
    await harness.start_worker(llm_worker(topic, tokens=(1000, 500)))
    run_id = await harness.trigger(wf, {})
    events = await harness.wait_end(run_id)
    assert types(events)[-2:] == ["BudgetExceeded", "RunFailed"], types(events)
    exceeded = next(e for e in events if e["type"] == "BudgetExceeded")["data"]
    assert (exceeded["limit"], exceeded["allowed"], exceeded["spent"]) == ("max_tokens", 2500, 3000)
    assert next(e for e in events if e["type"] == "RunFailed")["data"]["reason"] == \
        "budget exceeded: the run spent 3000, over max_tokens 2500"
    events = await quiet(harness, run_id)
    dispatched = [e["step_id"] for e in events if e["type"] == "StepDispatched"]
    assert dispatched == ["a", "b"], "nothing is dispatched once the budget is spent"


def test_a_budget_that_is_not_a_number_is_refused_at_validation() -> None:
    with pytest.raises(WorkflowInvalid) as caught:
        load_workflow("id: w\nversion: 1\nbudget: {max_cost_usd: lots}\nsteps:\n  a: {topic: t}\n",
                      filename="w.yaml")
    assert "w.yaml:3" in str(caught.value) and "budget.max_cost_usd" in str(caught.value)


async def test_a_tenant_over_its_window_budget_gets_no_new_work(harness: Harness, auditor: AuditorService) -> None:
    tenant = unique("budget-tenant")
    in_tenant = dataclasses.replace(harness, tenant=tenant)
    wf, topic = unique("tenantbudget"), unique("t")
    await harness.apply(f"""
id: {wf}
version: 1
steps:
  a: {{topic: {topic}}}
  b: {{topic: {topic}, depends_on: [a]}}
""")
    worker = llm_worker(topic, tokens=(1000, 500))
    worker.tenant = tenant
    await in_tenant.start_worker(worker)
    first = await in_tenant.trigger(wf, {})
    assert types(await in_tenant.wait_end(first))[-1] == "RunSucceeded"
    await projected(auditor, first, tenant=tenant)
    spent = await auditor.projection.usage(tenant=tenant, group_by="tenant")
    assert spent[0]["input_tokens"] + spent[0]["output_tokens"] == 3000

    planner = next(s for s in harness.services if isinstance(s, PlannerService))
    planner.settings = planner.settings.model_copy(
        update={"tenant_budgets": {tenant: TenantBudget(max_tokens=2000, window_s=3600)}})
    second = await in_tenant.trigger(wf, {})
    events = await in_tenant.wait_end(second)
    assert types(events)[-2:] == ["BudgetExceeded", "RunFailed"], types(events)
    exceeded = next(e for e in events if e["type"] == "BudgetExceeded")["data"]
    assert (exceeded["scope"], exceeded["limit"], exceeded["spent"]) == ("tenant", "max_tokens", 3000)
    reason = next(e for e in events if e["type"] == "RunFailed")["data"]["reason"]
    assert reason == f"budget exceeded: tenant {tenant!r} spent 3000, over max_tokens 2000"
    assert "StepDispatched" not in types(await quiet(harness, second))
    # other tenants are not affected by this tenant's budget
    other = await harness.trigger(wf, {})
    await harness.start_worker(llm_worker(topic, tokens=(1, 1)))
    assert types(await harness.wait_end(other))[-1] == "RunSucceeded"
