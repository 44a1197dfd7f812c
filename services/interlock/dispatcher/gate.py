"""The dispatch gate's decisions, as pure functions of a limit's durable state and the time.

A job that is about to be dispatched first passes every limit that applies to it
(:func:`limits_for`): concurrency limits (jobs in flight per topic, tenant, workflow, step, or key
computed from the run's input) and rate limits (token buckets per topic, tenant, step or key).
Each limit's state is one :class:`~interlock.contracts.messages.GateScope` in the gate bucket —
the jobs holding its slots, the jobs waiting and a rate's tokens — which every dispatcher copy
changes with compare-and-set (``slots.py``), so a count is always read from durable state.

Who goes first among waiting jobs (:func:`ranked`): higher run priority first; within a priority,
weighted fair share between tenants (the tenant holding the fewest slots per unit of weight);
then first come, first served. A job may take a slot only when fewer free slots exist than
jobs ranked ahead of it, so a newcomer never jumps the queue.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

from interlock.contracts import subjects as s
from interlock.contracts.messages import PRIORITY_DEFAULT, GateHolder, GateScope, GateWaiter
from interlock.core.run import Run, StepState
from interlock.core.steps import base_step_id, template_context
from interlock.core.workflow import Concurrency, Rate, TemplateError, Workflow, render_text
from interlock.core.workload import GateLimits

Kind = Literal["concurrency", "rate"]
Weights = Callable[[str], float]
T = TypeVar("T")


@dataclass(frozen=True)
class Limit:
    """One limit that applies to a job: ``scope`` names what it counts (``topic:llm``)."""

    kind: Kind
    scope: str
    limit: int = 0  # concurrency: slots
    per_s: float = 0.0  # rate: tokens a second
    burst: int = 0  # rate: the bucket's size

    @property
    def key(self) -> str:
        """The limit's key in the gate bucket."""
        return s.gate_key(self.kind, self.scope)

    @property
    def name(self) -> str:
        return f"{self.kind} {self.scope}"

    def describe(self) -> str:
        if self.kind == "concurrency":
            return f"{self.scope} has {self.limit} job(s) in flight (its concurrency limit)"
        return f"{self.scope} is over its rate of {self.per_s:g}/s (burst {self.burst})"


@dataclass(frozen=True)
class Hold:
    """Why a job may not go now: the limit (``scope``), a sentence, and for a rate limit the
    seconds until a token is due for it (its gate timer). ``fail``: it can never go (a limit key
    that cannot be computed): the step fails."""

    scope: str
    reason: str
    retry_in: float | None = None
    fail: bool = False


class LimitError(Exception):
    """A limit key that cannot be computed for this run (its template fails on the input)."""


def priority_of(run: Run, workflow: Workflow) -> int:
    """The run's priority: the trigger's, else the workflow's default, else 3."""
    return run.priority or workflow.priority or PRIORITY_DEFAULT


def _keyed(kind: str, run: Run, workflow: Workflow, key: str | None, fallback: str, where: str) -> str:
    if key is None:
        return fallback
    try:
        rendered = render_text(key, template_context(run, {}, run.input), location=where)
    except TemplateError as e:
        raise LimitError(f"{where}: {e}") from e
    return f"key:{rendered}"


def _concurrency(run: Run, workflow: Workflow, c: Concurrency, fallback: str, where: str) -> Limit:
    return Limit("concurrency", _keyed("concurrency", run, workflow, c.key, fallback, where), limit=c.limit)


def _rate(run: Run, workflow: Workflow, r: Rate, fallback: str, where: str) -> Limit:
    return Limit("rate", _keyed("rate", run, workflow, r.key, fallback, where), per_s=r.per_s, burst=r.burst)


def limits_for(run: Run, workflow: Workflow, state: StepState, config: GateLimits) -> list[Limit]:
    """Every limit the step's next job must pass: concurrency limits first, then rates (a token is
    spent only once the job has its slots). Raises :class:`LimitError` for a key that cannot be
    rendered from the run's input."""
    base = base_step_id(state.step_id)
    spec = workflow.steps[base]
    topic = config.topic(state.topic or "")
    tenant = config.tenant(run.tenant)
    limits: list[Limit] = []
    if topic.concurrency:
        limits.append(Limit("concurrency", f"topic:{state.topic}", limit=topic.concurrency))
    if tenant.concurrency:
        limits.append(Limit("concurrency", f"tenant:{run.tenant}", limit=tenant.concurrency))
    if workflow.concurrency:
        limits.append(_concurrency(run, workflow, workflow.concurrency, f"workflow:{run.tenant}/{workflow.id}",
                                   "concurrency.key"))
    if spec.concurrency:
        limits.append(_concurrency(run, workflow, spec.concurrency, f"step:{run.tenant}/{workflow.id}/{base}",
                                   f"steps.{base}.concurrency.key"))
    if topic.rate:
        limits.append(Limit("rate", f"topic:{state.topic}", per_s=topic.rate.per_s, burst=topic.rate.burst))
    if tenant.rate:
        limits.append(Limit("rate", f"tenant:{run.tenant}", per_s=tenant.rate.per_s, burst=tenant.rate.burst))
    if spec.rate:
        limits.append(_rate(run, workflow, spec.rate, f"step:{run.tenant}/{workflow.id}/{base}",
                            f"steps.{base}.rate.key"))
    return limits


def gated(workflow: Workflow, config: GateLimits) -> bool:
    """Whether any job of the workflow can meet a limit (else the gate costs it nothing)."""
    return bool(workflow.concurrency or config.topics or config.tenants
                or any(st.concurrency or st.rate for st in workflow.steps.values()))


# -- ordering --------------------------------------------------------------------------------
class WaitOrder:
    """A limit's waiting jobs kept in ranking order as they come and go (per priority and tenant,
    sorted by arrival), so :func:`ranked` reads the first few without touching every waiting job:
    a limit with 1,000 waiting hands out one slot at a time, on every change. Kept by each
    dispatcher copy from the waiters' bucket entries (``slots.WaitIndex``); an order, never a
    source of truth: :func:`ranked` goes only by the ``waiting`` it is given."""

    def __init__(self) -> None:
        self.groups: dict[int, dict[str, list[tuple[float, str]]]] = {}
        self.jobs: dict[str, tuple[int, str, float]] = {}

    def add(self, job: str, waiter: GateWaiter) -> None:
        place = (waiter.priority, waiter.tenant, waiter.since)
        if self.jobs.get(job) == place:
            return
        self.discard(job)
        self.jobs[job] = place
        bisect.insort(self.groups.setdefault(waiter.priority, {}).setdefault(waiter.tenant, []), (waiter.since, job))

    def discard(self, job: str) -> None:
        place = self.jobs.pop(job, None)
        if place is None:
            return
        priority, tenant, since = place
        queue = self.groups[priority][tenant]
        i = bisect.bisect_left(queue, (since, job))
        if i < len(queue) and queue[i] == (since, job):
            del queue[i]
        if not queue:
            del self.groups[priority][tenant]
            if not self.groups[priority]:
                del self.groups[priority]

    def __len__(self) -> int:
        return len(self.jobs)


def _is_active(state: GateScope, tenant: str) -> bool:
    """Whether ``tenant`` holds or waits for a slot here (stops at the first job found)."""
    return (any(h.tenant == tenant for h in state.holders.values())
            or any(w.tenant == tenant for w in state.waiting.values()))


def _active(state: GateScope) -> set[str]:
    return {h.tenant for h in state.holders.values()} | {w.tenant for w in state.waiting.values()}


def _floor(state: GateScope) -> float:
    """The least share among tenants with jobs here: where a tenant that (re)starts waiting begins,
    so an idle tenant neither loses its turn nor saves up a burst."""
    shares = [state.shares.get(t, 0.0) for t in _active(state)]
    return min(shares) if shares else 0.0


def ranked(waiting: Mapping[str, GateWaiter], holders: Mapping[str, GateHolder], weights: Weights,
           shares: Mapping[str, float] | None = None, order: WaitOrder | None = None) -> Iterator[str]:
    """Waiting job ids in the order they may go: priority first; within a priority, weighted fair
    share between tenants (the least slots handed out per unit of weight, ``shares``, counting
    those this ranking hands out; then the fewest held now); then arrival.

    ``order``: the same jobs kept sorted (:class:`WaitOrder`); jobs of ``waiting`` it lacks are
    sorted here, jobs it holds that ``waiting`` lacks are skipped. Without it every waiting job is
    sorted on each call."""
    shares = shares or {}
    held: Counter[str] = Counter(h.tenant for h in holders.values())
    picked: Counter[str] = Counter()
    unordered = waiting if order is None else {job: waiting[job] for job in waiting.keys() - order.jobs.keys()}
    extra: dict[int, dict[str, list[tuple[float, str]]]] = defaultdict(lambda: defaultdict(list))
    for job, w in unordered.items():
        extra[w.priority][w.tenant].append((w.since, job))
    ordered = order.groups if order is not None else {}

    def key(tenant: str, since: float) -> tuple[float, float, float, str]:
        weight = weights(tenant)
        return (shares.get(tenant, 0.0) + picked[tenant] / weight, (held[tenant] + picked[tenant]) / weight,
                since, tenant)

    def queue_of(priority: int, tenant: str) -> Iterator[tuple[float, str]]:
        mine = _popped(extra[priority].get(tenant) or [])
        kept = ordered.get(priority, {}).get(tenant)
        if not kept:
            return mine
        return heapq.merge(mine, (entry for entry in kept if entry[1] in waiting))

    for priority in sorted(set(extra) | set(ordered), reverse=True):
        # each tenant's queue read only as far as the caller reads (a limit with 1,000 waiting
        # hands out one or two at a time)
        queues: dict[str, Iterator[tuple[float, str]]] = {}
        heads: dict[str, tuple[float, str]] = {}
        for tenant in set(extra.get(priority, ())) | set(ordered.get(priority, ())):
            queue = queue_of(priority, tenant)
            head = next(queue, None)
            if head is not None:
                queues[tenant], heads[tenant] = queue, head
        heap = [key(t, head[0]) for t, head in heads.items()]
        heapq.heapify(heap)
        while heap:
            tenant = heapq.heappop(heap)[-1]
            yield heads[tenant][1]
            picked[tenant] += 1
            following = next(queues[tenant], None)
            if following is not None:
                heads[tenant] = following
                heapq.heappush(heap, key(tenant, following[0]))


def _popped(entries: list[tuple[float, str]]) -> Iterator[tuple[float, str]]:
    """``entries`` in order, sorted only as far as they are read (a heap: linear set-up)."""
    heapq.heapify(entries)
    while entries:
        yield heapq.heappop(entries)


def _ranked(state: GateScope, weights: Weights, order: WaitOrder | None = None) -> Iterator[str]:
    return ranked(state.waiting, state.holders, weights, state.shares, order)


def tokens_at(state: GateScope, limit: Limit, now: float) -> float:
    """A rate limit's tokens at ``now`` (a new bucket starts full)."""
    if state.tokens is None or state.refilled_at is None:
        return float(limit.burst)
    return min(float(limit.burst), state.tokens + max(0.0, now - state.refilled_at) * limit.per_s)


def capacity(state: GateScope, limit: Limit, now: float) -> int:
    """How many jobs may go now."""
    if limit.kind == "concurrency":
        return max(0, limit.limit - len(state.holders))
    return math.floor(tokens_at(state, limit, now) + 1e-9)


def may_go(state: GateScope, limit: Limit, job: str, waiter: GateWaiter, weights: Weights, now: float,
           order: WaitOrder | None = None) -> bool:
    """Whether ``job`` may pass the limit now: it holds a slot already, or it is among the first
    ``capacity`` of the waiting jobs (itself included) in :func:`ranked` order."""
    if job in state.holders:
        return True
    free = capacity(state, limit, now)
    if free <= 0:
        return False
    joined = wait(state, job, waiter)
    for i, candidate in enumerate(_ranked(joined, weights, order)):
        if candidate == job:
            return True
        if i + 1 >= free:
            return False
    return False


def take(state: GateScope, limit: Limit, job: str, waiter: GateWaiter, now: float,
         weights: Weights | None = None) -> GateScope:
    """The state once ``job`` passed: it holds a slot (concurrency) or spent a token (rate), and
    its tenant's share grew by one slot per unit of weight."""
    joined = wait(state, job, waiter)
    share = joined.shares.get(waiter.tenant, 0.0) + 1.0 / (weights or _even)(waiter.tenant)
    waiting = dict(joined.waiting)
    waiting.pop(job, None)
    update: dict[str, object] = {"waiting": waiting, "shares": {**joined.shares, waiter.tenant: share}}
    if limit.kind == "concurrency":
        holder = GateHolder(tenant=waiter.tenant, run_id=waiter.run_id, step_id=waiter.step_id, at=now)
        update["holders"] = {**joined.holders, job: holder}
    else:
        update.update(tokens=tokens_at(joined, limit, now) - 1.0, refilled_at=now)
    return _forget_idle(joined.model_copy(update=update))


def _even(_: str) -> float:
    return 1.0


def wait(state: GateScope, job: str, waiter: GateWaiter) -> GateScope:
    """The state with ``job`` waiting (a job that waits already keeps its place). A tenant with no
    other job here starts at the least share of those that have (:func:`_floor`)."""
    if job in state.waiting:
        return state
    shares = state.shares
    if not _is_active(state, waiter.tenant):
        shares = {**shares, waiter.tenant: max(shares.get(waiter.tenant, 0.0), _floor(state))}
    return state.model_copy(update={"waiting": {**state.waiting, job: waiter}, "shares": shares})


def _forget_idle(state: GateScope) -> GateScope:
    """Shares of tenants with no job here are dropped (they would start at the floor anyway)."""
    if all(_is_active(state, t) for t in state.shares):
        return state
    return state.model_copy(update={"shares": {t: v for t, v in state.shares.items() if _is_active(state, t)}})


def release(state: GateScope, job: str) -> GateScope:
    """The state once ``job`` gave its slot back (or stopped waiting)."""
    if job not in state.holders and job not in state.waiting:
        return state
    return _forget_idle(state.model_copy(update={"holders": _without(state.holders, job),
                                                 "waiting": _without(state.waiting, job)}))


def _without(entries: Mapping[str, T], job: str) -> dict[str, T]:
    rest = dict(entries)
    rest.pop(job, None)
    return rest


def drop(state: GateScope, job: str, *, holding: bool) -> GateScope:
    """The state without ``job``'s slot (``holding``) or without its place in the queue: only that
    entry (a job that was judged as waiting may hold a slot by now)."""
    if holding:
        return _forget_idle(state.model_copy(update={"holders": _without(state.holders, job)}))
    return _forget_idle(state.model_copy(update={"waiting": _without(state.waiting, job)}))


def next_up(state: GateScope, limit: Limit, weights: Weights, now: float,
            order: WaitOrder | None = None) -> list[tuple[str, GateWaiter]]:
    """The waiting jobs that may go now, in order: the dispatcher wakes their runs."""
    free = capacity(state, limit, now)
    out: list[tuple[str, GateWaiter]] = []
    if free <= 0 or not state.waiting:  # nobody may go: no ranking
        return out
    for job in _ranked(state, weights, order):
        if len(out) >= free:
            break
        out.append((job, state.waiting[job]))
    return out


def next_token_in(state: GateScope, limit: Limit, now: float, place: int = 0) -> float:
    """Seconds until a rate limit has a token for the job ``place`` jobs back in its queue."""
    missing = (place + 1) - tokens_at(state, limit, now)
    return max(0.0, missing / limit.per_s) if limit.per_s > 0 else 0.0


def place_of(state: GateScope, job: str, weights: Weights, order: WaitOrder | None = None) -> int:
    """How many waiting jobs are ranked ahead of ``job`` (all of them when it does not wait)."""
    for i, candidate in enumerate(_ranked(state, weights, order)):
        if candidate == job:
            return i
    return len(state.waiting)
