"""The dispatch gate's pure decisions: priority and fair-share order, slots, tokens, limits of a
step, and the dispatcher rule that records a held job as throttled (#16)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from interlock.contracts import events as ev
from interlock.contracts.messages import GateHolder, GateScope, GateWaiter, TimerFired
from interlock.core.workflow import WorkflowInvalid, load_workflow, parse_workflow
from interlock.core.workload import GateLimits
from interlock.dispatcher import gate, rules
from interlock.dispatcher.gate import Hold, Limit, LimitError
from tests.unit.run_builders import TENANT, advance, decide, start, types, workflow


def waiter(tenant: str = "a", priority: int = 3, since: float = 0.0, run: str = "r") -> GateWaiter:
    return GateWaiter(tenant=tenant, run_id=run, step_id="s", priority=priority, since=since)


def holder(tenant: str) -> GateHolder:
    return GateHolder(tenant=tenant, run_id="r", step_id="s", at=0.0)


def even(_: str) -> float:
    return 1.0


ONE = Limit("concurrency", "topic:llm", limit=1)


# -- order -----------------------------------------------------------------------------------
def test_higher_priority_goes_first_then_arrival() -> None:
    waiting = {"low1": waiter(priority=1, since=1), "high": waiter(priority=5, since=3),
               "low0": waiter(priority=1, since=0), "mid": waiter(priority=3, since=2)}
    assert list(gate.ranked(waiting, {}, even)) == ["high", "mid", "low0", "low1"]


def test_a_burst_of_one_tenant_does_not_starve_another() -> None:
    waiting = {f"a{i}": waiter("a", since=i) for i in range(10)} | {"b0": waiter("b", since=100)}
    order = list(gate.ranked(waiting, {"held": holder("a")}, even))
    assert order.index("b0") == 0  # tenant a holds a slot already: b's first job is next
    order = list(gate.ranked(waiting, {}, even))
    assert order.index("b0") == 1  # even when nobody holds one, b is served second, not eleventh


def test_fair_share_remembers_who_was_served_when_one_slot_turns_over() -> None:
    # concurrency 1: after every release nobody holds a slot, so only the shares tell who had more
    state = gate.take(GateScope(), ONE, "a0", waiter("a", since=0), now=0)
    for i in range(1, 9):
        state = gate.wait(state, f"a{i}", waiter("a", since=i))
    state = gate.wait(state, "b0", waiter("b", since=100))
    order = []
    state = gate.release(state, "a0")
    while state.waiting:
        [(job, w)] = gate.next_up(state, ONE, even, now=200)
        order.append(job)
        state = gate.release(gate.take(state, ONE, job, w, now=200), job)
    assert order.index("b0") <= 1, order  # first come, first served would make it the ninth
    assert not state.shares  # nobody waits or holds: nothing is remembered


def test_weights_share_slots_in_proportion() -> None:
    waiting = {f"a{i}": waiter("a", since=i) for i in range(30)} | {f"b{i}": waiter("b", since=i) for i in range(30)}
    first = list(gate.ranked(waiting, {}, lambda t: 2.0 if t == "a" else 1.0))[:30]
    assert sum(job.startswith("a") for job in first) == 20


def test_priority_outranks_fair_share() -> None:
    waiting = {"a-high": waiter("a", priority=5, since=9), "b-low": waiter("b", priority=1, since=0)}
    holders = {f"h{i}": holder("a") for i in range(5)}
    assert next(gate.ranked(waiting, holders, even)) == "a-high"


# -- slots -----------------------------------------------------------------------------------
def test_a_newcomer_does_not_jump_the_queue() -> None:
    state = GateScope(waiting={"old": waiter(since=0)})
    assert not gate.may_go(state, ONE, "new", waiter(since=5), even, now=10)
    assert gate.may_go(state, ONE, "old", waiter(since=0), even, now=10)
    assert gate.may_go(state, ONE, "vip", waiter(priority=5, since=5), even, now=10)


def test_no_slot_while_the_limit_is_reached_and_the_holder_keeps_its_own() -> None:
    state = gate.take(GateScope(), ONE, "j1", waiter(), now=1)
    assert list(state.holders) == ["j1"]
    assert gate.may_go(state, ONE, "j1", waiter(), even, now=2)  # a decision run again takes no second slot
    assert not gate.may_go(state, ONE, "j2", waiter(), even, now=2)
    state = gate.wait(state, "j2", waiter(since=2))
    assert gate.next_up(state, ONE, even, now=3) == []
    state = gate.release(state, "j1")
    assert [job for job, _ in gate.next_up(state, ONE, even, now=3)] == ["j2"]
    state = gate.take(state, ONE, "j2", waiter(), now=4)
    assert list(state.holders) == ["j2"] and not state.waiting


def test_waiting_keeps_the_first_place() -> None:
    state = gate.wait(GateScope(), "j", waiter(since=1))
    assert gate.wait(state, "j", waiter(since=9)).waiting["j"].since == 1


# -- tokens ----------------------------------------------------------------------------------
def test_a_rate_limit_allows_a_burst_then_its_rate() -> None:
    rate = Limit("rate", "topic:api", per_s=5, burst=2)
    state = GateScope()
    for i in range(2):
        assert gate.may_go(state, rate, f"j{i}", waiter(), even, now=100)
        state = gate.take(state, rate, f"j{i}", waiter(), now=100)
    assert not gate.may_go(state, rate, "j2", waiter(), even, now=100)
    assert gate.next_token_in(state, rate, now=100) == pytest.approx(0.2)
    assert gate.next_token_in(state, rate, now=100, place=2) == pytest.approx(0.6)
    assert gate.may_go(state, rate, "j2", waiter(), even, now=100.2)
    assert gate.tokens_at(state, rate, now=1000) == 2  # never more than the burst


# -- which limits apply ------------------------------------------------------------------------
def test_limits_of_a_step_from_the_workflow_and_the_deployment() -> None:
    wf = parse_workflow({"id": "wf", "version": 1, "concurrency": {"limit": 3},
                         "steps": {"a": {"topic": "llm", "concurrency": {"key": "cust-{{ input.customer }}",
                                                                          "limit": 2},
                                         "rate": {"per_s": 5, "burst": 10}}}})
    run = advance(start(wf, {"customer": "acme"}), wf)
    config = GateLimits.model_validate({"topics": {"llm": {"concurrency": 4, "rate": {"per_s": 1}}},
                                        "tenants": {"*": {"concurrency": 9}}})
    limits = gate.limits_for(run, wf, run.steps["a"], config)
    assert [(lim.kind, lim.scope) for lim in limits] == [
        ("concurrency", "topic:llm"), ("concurrency", f"tenant:{TENANT}"), ("concurrency", f"workflow:{TENANT}/wf"),
        ("concurrency", "key:cust-acme"), ("rate", "topic:llm"), ("rate", f"step:{TENANT}/wf/a")]
    assert [lim.limit for lim in limits[:4]] == [4, 9, 3, 2]
    assert gate.gated(wf, GateLimits()) and not gate.gated(workflow(a={"topic": "t"}), GateLimits())


def test_a_key_that_cannot_be_computed_is_a_clear_error() -> None:
    wf = parse_workflow({"id": "wf", "version": 1, "steps": {
        "a": {"topic": "llm", "concurrency": {"key": "{{ input.customer.id }}", "limit": 1}}}})
    run = advance(start(wf, {}), wf)
    with pytest.raises(LimitError, match=r"steps\.a\.concurrency\.key"):
        gate.limits_for(run, wf, run.steps["a"], GateLimits())


def test_priority_comes_from_the_run_else_the_workflow_else_three() -> None:
    wf = parse_workflow({"id": "wf", "version": 1, "priority": 4, "steps": {"a": {"topic": "t"}}})
    assert gate.priority_of(start(wf), wf) == 4
    assert gate.priority_of(start(wf, priority=1), wf) == 1
    plain = workflow(a={"topic": "t"})
    assert gate.priority_of(start(plain), plain) == 3


@pytest.mark.parametrize(("yaml", "problem"), [
    ("priority: 0", "priority: should be greater than or equal to 1"),
    ("priority: high", "priority: "),
    ("concurrency: {limit: 0}", "concurrency.limit: should be greater than or equal to 1"),
    ("concurrency: {limit: 2, kee: x}", "concurrency: unknown field 'kee' (did you mean 'key'?)"),
])
def test_bad_workflow_limits_name_their_yaml_path(yaml: str, problem: str) -> None:
    with pytest.raises(WorkflowInvalid) as info:
        load_workflow(f"id: wf\nversion: 1\n{yaml}\nsteps:\n  a: {{topic: t}}\n")
    assert problem in str(info.value)


def test_bad_step_limits_name_their_yaml_path() -> None:
    with pytest.raises(WorkflowInvalid) as info:
        load_workflow("id: wf\nversion: 1\nsteps:\n  a: {topic: t, rate: {per_s: 0}, "
                      "concurrency: {key: '{{ input.x', limit: 1}}\n")
    text = str(info.value)
    assert "steps.a.rate.per_s: should be greater than 0" in text
    assert "steps.a.concurrency.key: invalid template" in text


def test_limits_left_unset_keep_a_workflows_content_hash() -> None:
    plain = workflow(a={"topic": "t"})
    assert plain.content_hash == workflow(a={"topic": "t", "concurrency": None}).content_hash
    assert plain.content_hash != workflow(a={"topic": "t", "concurrency": 2}).content_hash


# -- the dispatcher's rule ---------------------------------------------------------------------
def _released(wf: Any, **started: Any) -> Any:
    run = advance(start(wf, **started), wf)
    decide(run, "a")
    run.collect_events()
    return run


def test_a_held_job_is_throttled_once_per_attempt_then_dispatched() -> None:
    wf = workflow(a={"topic": "t"})
    run = _released(wf, priority=5)
    now = datetime.now(UTC)
    hold = Hold("concurrency topic:t", "topic:t has 1 job(s) in flight")
    assert rules.due_jobs(run, now) == [run.steps["a"]]
    assert rules.dispatch(run, wf, now, held={"a": hold}) == []
    events = run.collect_events()
    assert [type(e.data) for e in events] == [ev.StepThrottled]
    assert events[0].data.priority == 5 and events[0].data.attempt == 1
    rules.dispatch(run, wf, now, held={"a": hold})
    assert types(run) == []  # held again: nothing new in the log
    rules.dispatch(run, wf, now)
    assert types(run) == ["StepDispatched"]
    assert run.steps["a"].throttled is None


def test_a_rate_hold_asks_for_a_gate_timer_and_a_bad_key_fails_the_step() -> None:
    wf = workflow(a={"topic": "t"})
    run = _released(wf)
    now = datetime.now(UTC)
    effects = rules.dispatch(run, wf, now, held={"a": Hold("rate topic:t", "over", retry_in=0.5)})
    assert [e.kind for e in effects if isinstance(e, TimerFired)] == ["gate"]
    assert effects[0].due_at == now + timedelta(seconds=0.5)  # type: ignore[union-attr]
    types(run)
    rules.dispatch(run, wf, now, held={"a": Hold("key", "cannot compute", fail=True)})
    assert types(run) == ["StepFailed"]
    error = run.steps["a"].error
    assert run.steps["a"].status == "failed" and error is not None and error.kind == "limit"


# -- checking a limit from the log -------------------------------------------------------------
def _e(kind: str, at: float, step: str = "a", attempt: int = 1, topic: str = "t") -> dict[str, Any]:
    return {"type": kind, "at": datetime.fromtimestamp(at, UTC).isoformat(), "step_id": step, "attempt": attempt,
            "data": {"topic": topic}}


def test_jobs_in_flight_are_read_from_dispatches_and_outcomes() -> None:
    from interlock.core.inflight import peak_in_flight

    one = [_e("StepDispatched", 0), _e("StepTimedOut", 2), _e("StepFailed", 2.5), _e("StepDispatched", 3, attempt=2),
           _e("StepSucceeded", 4, attempt=2)]
    two = [_e("StepDispatched", 1, topic="u"), _e("RunCancelled", 3.5)]  # the run's end ends its attempt
    three = [_e("StepDispatched", 3.5)]  # while the second attempt of `one` runs
    assert peak_in_flight([one, two]) == {None: 2}
    assert peak_in_flight([one, two, three], lambda e: e["data"]["topic"]) == {"t": 2, "u": 1}
    assert peak_in_flight([one[:1], [_e("StepDispatched", 5)]]) == {None: 2}  # never ended: still in flight


@pytest.mark.parametrize("seed", range(20))
def test_a_kept_wait_order_ranks_exactly_as_sorting_every_waiting_job(seed: int) -> None:
    """The dispatcher keeps each limit's queue sorted (gate.WaitOrder, from the waiters' entries);
    ranking with it must give the order a full sort gives, also when the order lags behind the
    state it ranks: jobs waiting that it lacks (queued in this very batch) and jobs it still has
    that no longer wait (they took a slot)."""
    import random

    rng = random.Random(seed)
    tenants = ["acme", "globex", "initech"][: rng.randint(1, 3)]
    waiting = {f"r{i}:s@1": GateWaiter(tenant=rng.choice(tenants), run_id=f"r{i}", step_id="s",
                                       priority=rng.choice([1, 3, 3, 5]), since=float(rng.randint(0, 50)))
               for i in range(rng.randint(0, 60))}
    order = gate.WaitOrder()
    for job, w in waiting.items():
        if rng.random() < 0.8:  # the rest were queued in this batch: not in the order yet
            order.add(job, w)
    gone = [f"g{i}:s@1" for i in range(rng.randint(0, 5))]  # in the order, no longer waiting
    for job in gone:
        order.add(job, GateWaiter(tenant=rng.choice(tenants), run_id=job, step_id="s", priority=3, since=1.0))
    for job in rng.sample(sorted(order.jobs), k=min(3, len(order))):  # some leave the order again
        if job in waiting:
            order.discard(job)
    holders = {f"h{i}:s@1": GateHolder(tenant=rng.choice(tenants), run_id=f"h{i}", step_id="s", at=0.0)
               for i in range(rng.randint(0, 4))}
    shares = {t: float(rng.randint(0, 3)) for t in tenants if rng.random() < 0.5}
    weights = {"acme": 2.0}.get
    weight = lambda t: weights(t) or 1.0  # noqa: E731
    assert list(gate.ranked(waiting, holders, weight, shares, order)) == list(gate.ranked(waiting, holders, weight,
                                                                                          shares))


def test_a_wait_order_follows_jobs_that_come_change_and_go() -> None:
    order = gate.WaitOrder()
    order.add("a", waiter(since=2.0))
    order.add("b", waiter(since=1.0))
    order.add("a", waiter(since=2.0))  # the same again: one place
    assert order.groups == {3: {"a": [(1.0, "b"), (2.0, "a")]}} and len(order) == 2
    order.add("a", waiter(since=2.0, priority=5))  # moved to another priority
    assert order.groups == {3: {"a": [(1.0, "b")]}, 5: {"a": [(2.0, "a")]}}
    order.discard("b")
    order.discard("b")  # twice: nothing more
    order.discard("a")
    assert order.groups == {} and len(order) == 0
