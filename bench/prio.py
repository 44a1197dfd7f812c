"""PRIO: does a high-priority run overtake a backlog? (issue #16)

On the whole stack (as W1-W3), with the dispatcher's gate limiting the PRIO tenant to
``SLOTS`` jobs in flight and an agent that takes ``BENCH_SLOW_MS`` (20 ms) per job, so that a
backlog of low-priority runs saturates its topic:

1. idle latency: one-step high-priority runs one after another on the quiet stack (p50);
2. a backlog: ``backlog`` low-priority (1) runs triggered at once; once the last of them has been
   planned and decided (its log shows StepThrottled or StepDispatched), the backlog waits in the
   gate, not in the planner's or the policy's queue;
3. loaded latency: ``samples`` high-priority (5) runs, one after another, while the backlog drains.

Target: loaded p50 <= 2 x idle p50. A first-come, first-served dispatcher would make the high run
wait for the whole backlog (backlog x 20 ms / SLOTS).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from bench.common import parse_at, percentile, progress, summary
from bench.stackrun import TP, StackBench
from interlock.contracts import events as ev

WF_PRIO = "bench-prio"
SLOW_TOPIC = "bench.slow"
SLOTS = 4
PRIO_YAML = f"""
id: {WF_PRIO}
version: 1
priority: 1
steps:
  work: {{topic: {SLOW_TOPIC}, input: {{n: "{{{{ input.n }}}}"}}}}
"""
GATE_LIMITS = json.dumps({"tenants": {TP: {"concurrency": SLOTS}}})
TARGET_RATIO = 2.0


# where a high run's time goes: from its trigger's submission to each commit (the server's time of
# the first commit holding the event), then to the bench seeing its end
STAGE_POINTS = (
    ("start", ev.RunStarted.type_name, "submit -> RunStarted: trigger publish, planner consumes, plans, appends"),
    ("policy", ev.PolicyDecided.type_name, "RunStarted -> PolicyDecided: delivery to the policy, decision, append"),
    ("dispatch", ev.StepDispatched.type_name, "PolicyDecided -> StepDispatched: delivery to the dispatcher, "
                                              "the gate (a StepThrottled wait included), append"),
    ("agent", ev.StepSucceeded.type_name, "StepDispatched -> StepSucceeded: job publish, worker (20 ms), result, "
                                          "dispatcher records it"),
    ("end", ev.RunSucceeded.type_name, "StepSucceeded -> RunSucceeded: delivery to the planner, append"),
)
STAGES = {name: why for name, _, why in STAGE_POINTS} | {
    "seen": "RunSucceeded -> the bench's subscription delivers it",
    "throttled": "StepThrottled -> StepDispatched (0 when not throttled; part of dispatch)",
}
Sample = tuple[str, float, float]  # run id, submit wall time, seconds to its end


async def _latency(bench: StackBench, key: str, priority: int, samples: list[Sample] | None = None) -> float:
    run_id, wall, secs, kind = await bench.one_run(WF_PRIO, {"n": 1}, TP, key, timeout=600, priority=priority)
    if kind != ev.RunSucceeded.type_name:
        raise RuntimeError(f"PRIO run {run_id} ended {kind}: {bench.failures[-1:]}")
    if samples is not None:
        samples.append((run_id, wall, secs))
    return secs * 1000


async def stages(bench: StackBench, samples: list[Sample]) -> dict[str, dict[str, float | None]]:
    """Per stage (:data:`STAGES`), the p50 and max over ``samples`` in ms, from the runs' commits."""
    per: dict[str, list[float]] = {name: [] for name in STAGES}
    for run_id, wall, secs in samples:
        commits = await bench.tenant(TP).read_commits(run_id)
        first: dict[str, float] = {}
        for c in commits:
            for e in c.envelopes:
                first.setdefault(e["type"], c.at if c.at is not None else parse_at(e["at"]))
        previous = wall
        for name, kind, _ in STAGE_POINTS:
            if kind not in first:
                break
            per[name].append((first[kind] - previous) * 1000)
            previous = first[kind]
        else:
            per["seen"].append((wall + secs - previous) * 1000)
        throttled = first.get(ev.StepThrottled.type_name)
        dispatched = first.get(ev.StepDispatched.type_name)
        per["throttled"].append((dispatched - throttled) * 1000 if throttled and dispatched else 0.0)
    return {name: {"p50": round(percentile(v, 50) or 0, 2), "max": round(max(v), 2) if v else None}
            for name, v in per.items()}


async def measure(bench: StackBench, backlog: int, samples: int) -> dict[str, Any]:
    assert bench.client is not None
    await bench.client.apply_workflow(PRIO_YAML)
    client = bench.tenant(TP)
    for i in range(3):  # warm-up: the worker's consumer, the gate bucket, the code paths
        await _latency(bench, f"prio-warm-{bench.nonce}-{i}", 5)
    idle_runs: list[Sample] = []
    idle = [await _latency(bench, f"prio-idle-{bench.nonce}-{i}", 5, idle_runs) for i in range(samples)]
    progress(f"PRIO: idle p50 {percentile(idle, 50):.1f} ms; triggering a backlog of {backlog} low-priority runs")
    keys = [f"prio-low-{bench.nonce}-{i}" for i in range(backlog)]
    t0 = time.perf_counter()
    run_ids = await asyncio.gather(*(client.start_run(WF_PRIO, {"n": i}, key=k, check=False, priority=1)
                                     for i, k in enumerate(keys)))
    last = run_ids[-1]
    while True:  # the backlog is past the planner and the policy: it waits in the gate
        events, _ = await bench.events(TP, last)
        if any(e["type"] in ("StepThrottled", "StepDispatched") for e in events):
            break
        if time.perf_counter() - t0 > 600:
            raise RuntimeError("PRIO: the backlog was not planned within 600 s")
        await asyncio.sleep(0.1)
    queued_s = time.perf_counter() - t0
    progress(f"PRIO: backlog queued in {queued_s:.1f} s; measuring {samples} high-priority runs through it")
    loaded_runs: list[Sample] = []
    loaded = [await _latency(bench, f"prio-high-{bench.nonce}-{i}", 5, loaded_runs) for i in range(samples)]
    remaining = [e for e in (await bench.events(TP, last))[0] if e["type"] == ev.RunSucceeded.type_name]
    ratio = (percentile(loaded, 50) or 0) / (percentile(idle, 50) or 1)
    by_stage = {"idle": await stages(bench, idle_runs), "loaded": await stages(bench, loaded_runs)}
    result: dict[str, Any] = {
        "backlog": backlog, "slots": SLOTS, "samples": samples, "backlog_queued_s": round(queued_s, 2),
        "idle_ms": summary(idle), "loaded_ms": summary(loaded),
        "idle_p50_ms": round(percentile(idle, 50) or 0, 2), "loaded_p50_ms": round(percentile(loaded, 50) or 0, 2),
        "ratio_p50": round(ratio, 2), "target_ratio": TARGET_RATIO, "target_ok": ratio <= TARGET_RATIO,
        "backlog_still_running": not remaining,  # the high runs went through a backlog, not after it
        "stages_ms": by_stage,
        "stage_names": STAGES,
    }
    progress(f"PRIO: loaded p50 {result['loaded_p50_ms']} ms = {result['ratio_p50']}x idle "
             f"(target <= {TARGET_RATIO}x); backlog still running: {result['backlog_still_running']}")
    for name in STAGES:
        idle_s, loaded_s = by_stage["idle"][name], by_stage["loaded"][name]
        progress(f"PRIO stage {name:>9}: idle p50 {idle_s['p50'] or 0:7.1f} ms, "
                 f"loaded p50 {loaded_s['p50'] or 0:7.1f} ms (max {loaded_s['max']})")
    return result
