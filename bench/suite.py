"""``python -m bench``: run the workloads, print the table, save the JSON (see bench/README.md)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import floor as floor_mod
from bench import onehop, replay
from bench import prio as prio_mod
from bench.common import machine, progress, ratio
from bench.otlp_sink import otlp_sink
from bench.profiling import Profiler
from bench.stackrun import T2, RssSampler, StackBench, cpu_report, cpu_seconds, memory_report, new_home
from interlock.core.natsserver import EmbeddedNats
from interlock.identity import IdentityHome, Permissions

WORKLOADS = ("W1", "W2", "W3", "W4", "W5")
EXTRA_WORKLOADS = ("PRIO",)  # run only when named (--only PRIO): see bench/prio.py
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
SCHEMA = 1

TARGETS = {
    "W1": "p50 <= 15 ms",
    "W2": ">= 1,500 steps/s; scheduling overhead p50 <= 3 ms",
    "W3": "<= 2 s",
    "W4": "10,000-event load <= 100 ms; 100,000-event rebuild <= 20 s",
    "W5": "flat after load (back within 20 % of baseline 5 s after W2)",
    "PRIO": "high-priority run through a 1,000-run backlog: p50 <= 2x its idle p50",
    "floor": "every ratio to the floor <= 4",
}
MAX_RATIO = 4.0

SETUP = ("All five services (planner, policy, approval, dispatcher, auditor) and the bench worker run as "
         "separate OS processes against one embedded nats-server; every event is persisted in JetStream "
         "(file storage, hash-chained, conditional appends) as in production.")


@dataclass(frozen=True)
class Sizes:
    w1_warmup: int
    w1_runs: int
    w2_runs: int
    w3_items: int
    w4_load_events: int
    w4_rebuild_events: int
    w5_baseline_s: float
    w5_after_s: float = 5.0
    prio_backlog: int = 1000
    prio_samples: int = 10


FULL = Sizes(w1_warmup=10, w1_runs=50, w2_runs=1000, w3_items=500, w4_load_events=10_000,
             w4_rebuild_events=100_000, w5_baseline_s=2.0)
QUICK = Sizes(w1_warmup=2, w1_runs=5, w2_runs=50, w3_items=50, w4_load_events=1_000, w4_rebuild_events=5_000,
              w5_baseline_s=1.0, prio_backlog=50, prio_samples=3)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes (CI smoke test; well under a minute)")
    p.add_argument("--only", help="comma-separated workloads to run, e.g. W1,W3 (default: all; W5 needs W2)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default: %(default)s)")
    p.add_argument("--telemetry", action="store_true",
                   help="run the stack with traces and metrics exported (OTLP to a local sink, /metrics on)")
    p.add_argument("--profile", action="store_true",
                   help="sample the services and the worker with py-spy during W2 (needs py-spy)")
    p.add_argument("--w2-limit", type=int, default=0, metavar="N",
                   help="run W1-W3 with a workload limit on: at most N jobs of W2's tenant in flight (the "
                        "dispatcher's gate takes a slot in its bucket for every job); 0 = off (default)")
    args = p.parse_args(argv)
    if args.only:
        only = [w.strip().upper() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in only if w not in WORKLOADS + EXTRA_WORKLOADS]
        if unknown:
            p.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS + EXTRA_WORKLOADS)}")
        args.only = only
    else:
        args.only = list(WORKLOADS)
    return args


# -- running -------------------------------------------------------------------------------------
def authenticated_server(home: Path) -> tuple[EmbeddedNats, Path]:
    """A server with auth on (operator mode, anonymous refused, as the stack's) and the credential
    of the bench's own raw-NATS processes: no Interlock role fits a scratch stream, so one with
    every permission."""
    identity = IdentityHome(home / "identity")
    creds = identity.issue_custom("bench-tool", Permissions())
    server = EmbeddedNats(store_dir=home / "nats", port=0, log_file=home / "nats.log",
                          config=identity.server_config())
    return server, creds


async def run_floor(selected: set[str], sizes: Sizes, results: dict[str, Any]) -> None:
    home = new_home()
    server, creds = authenticated_server(home)
    try:
        url = server.start()
        progress("floor: raw nats-py JetStream hops on a scratch stream (4 role processes)")
        results["floor"] = await floor_mod.measure(
            url,
            w1=(sizes.w1_warmup, sizes.w1_runs) if "W1" in selected else None,
            w2_runs=sizes.w2_runs if "W2" in selected else None,
            w3_items=sizes.w3_items if "W3" in selected else None, creds=creds,
        )
        progress("one-hop floor: one acked publish and one consume + ack per step (one nats-py loop)")
        results["floor_onehop"] = await onehop.measure(
            url,
            w1=(sizes.w1_warmup, sizes.w1_runs) if "W1" in selected else None,
            w2_runs=sizes.w2_runs if "W2" in selected else None,
            w3_items=sizes.w3_items if "W3" in selected else None, creds=creds,
        )
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


async def run_w4(sizes: Sizes, results: dict[str, Any]) -> None:
    home = new_home()
    server, creds = authenticated_server(home)
    try:
        url = server.start()
        progress(f"W4: writing a {sizes.w4_load_events}-event run and a {sizes.w4_rebuild_events}-event stream "
                 f"with EventStore (no services)")
        results["workloads"]["W4"] = await replay.measure(url, load_events=sizes.w4_load_events,
                                                          rebuild_events=sizes.w4_rebuild_events, creds=creds)
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


async def run_prio(sizes: Sizes, results: dict[str, Any]) -> None:
    home = new_home()
    bench = StackBench(home, gate_limits=prio_mod.GATE_LIMITS, prio=True)
    try:
        progress(f"PRIO: starting the stack with the gate limiting tenant {prio_mod.TP} to {prio_mod.SLOTS} jobs")
        await bench.start()
        await bench.w1(sizes.w1_warmup, 0)
        results["workloads"]["PRIO"] = await prio_mod.measure(bench, sizes.prio_backlog, sizes.prio_samples)
        bench.check_alive()
    finally:
        await bench.close()
        bench.stop()
        shutil.rmtree(home, ignore_errors=True)


def w2_gate_limits(limit: int) -> str | None:
    """``--w2-limit N``: W2's tenant may have N jobs in flight (every job passes the gate)."""
    return json.dumps({"tenants": {T2: {"concurrency": limit}}}) if limit > 0 else None


async def run_stack(selected: set[str], sizes: Sizes, results: dict[str, Any], errors: dict[str, str],
                    profile_dir: Path | None = None) -> None:
    received: dict[str, Any] = {}
    with contextlib.ExitStack() as cleanup:
        endpoint = None
        if results.get("telemetry"):
            endpoint, received = cleanup.enter_context(otlp_sink())
        await _run_stack(selected, sizes, results, errors, profile_dir, endpoint)
    if results.get("telemetry"):  # the sink's totals, once every process has flushed and it has ended
        results["telemetry_export"] = received


async def _run_stack(selected: set[str], sizes: Sizes, results: dict[str, Any], errors: dict[str, str],
                     profile_dir: Path | None, telemetry_endpoint: str | None) -> None:
    home = new_home()
    bench = StackBench(home, telemetry_endpoint, gate_limits=w2_gate_limits(results.get("w2_limit", 0)))
    sampler: RssSampler | None = None
    workloads = results["workloads"]
    try:
        progress(f"stack: starting nats-server, 5 services and the bench worker (home {home})")
        await bench.start()
        sampler = RssSampler(bench.pids())
        sampler.start()
        if "W1" in selected:
            try:
                workloads["W1"] = await bench.w1(sizes.w1_warmup, sizes.w1_runs)
            except Exception as e:
                errors["W1"] = _error(e)
        else:  # untimed warm-up so W2/W3 do not pay for start-up
            await bench.w1(sizes.w1_warmup, 0)
        if "W2" in selected:
            try:
                await asyncio.sleep(sizes.w5_baseline_s)  # a quiet stack: the memory baseline
                baseline = (time.perf_counter() - sizes.w5_baseline_s, time.perf_counter())
                profiler = _profiler(bench, profile_dir, "W2")
                w2 = await bench.w2(sizes.w2_runs)
                done_at = w2.pop("_done_at")
                if profiler is not None:
                    w2["profile"] = {"dir": str(profiler.out_dir), "processes": profiler.stop()}
                workloads["W2"] = w2
                progress(f"W5: waiting {sizes.w5_after_s:.0f} s after W2 for the memory to settle")
                await asyncio.sleep(sizes.w5_after_s)
                after = (time.perf_counter() - 0.5, time.perf_counter())
                if "W5" in selected:
                    workloads["W5"] = memory_report(sampler, baseline, (baseline[1], done_at), after)
            except Exception as e:
                errors["W2"] = _error(e)
        if "W3" in selected:
            try:
                profiler = _profiler(bench, profile_dir, "W3")
                cpu0, t0 = cpu_seconds(bench.pids()), time.perf_counter()
                w3 = await bench.w3(sizes.w3_items)
                w3["cpu"] = cpu_report(cpu0, cpu_seconds(bench.pids()), time.perf_counter() - t0)
                if profiler is not None:
                    w3["profile"] = {"dir": str(profiler.out_dir), "processes": profiler.stop()}
                workloads["W3"] = w3
            except Exception as e:
                errors["W3"] = _error(e)
        bench.check_alive()
    finally:
        if sampler is not None:
            sampler.stop()
        await bench.close()
        bench.stop()
        if not os.environ.get("BENCH_KEEP_HOME"):
            shutil.rmtree(home, ignore_errors=True)


def _profiler(bench: StackBench, profile_dir: Path | None, workload: str) -> Profiler | None:
    if profile_dir is None:
        return None
    profiler = Profiler(bench.pids(), profile_dir / workload)
    profiler.start()
    progress(f"{workload}: py-spy sampling the services into {profiler.out_dir}")
    return profiler


def _error(e: BaseException) -> str:
    progress(f"error: {e!r}")
    return "".join(traceback.format_exception(e))[-4000:]


async def run_all(args: argparse.Namespace, sizes: Sizes, results: dict[str, Any], errors: dict[str, str]) -> None:
    selected = set(args.only)
    if "W5" in selected and "W2" not in selected:
        progress("W5 measures memory during W2: running W2 too")
        selected.add("W2")
    results["selected"] = sorted(selected)
    if selected & {"W1", "W2", "W3"}:
        try:
            await run_floor(selected, sizes, results)
        except Exception as e:
            errors["floor"] = _error(e)
    if selected & {"W1", "W2", "W3", "W5"}:
        try:
            profile_dir = None
            if args.profile:
                profile_dir = args.out / f"profile-{results['started_at'].replace('-', '').replace(':', '')}"
            await run_stack(selected, sizes, results, errors, profile_dir)
        except Exception as e:
            errors["stack"] = _error(e)
    if "W4" in selected:
        try:
            await run_w4(sizes, results)
        except Exception as e:
            errors["W4"] = _error(e)
    if "PRIO" in selected:
        try:
            await run_prio(sizes, results)
        except Exception as e:
            errors["PRIO"] = _error(e)


# -- the table -----------------------------------------------------------------------------------
def _row(workload: str, metric: str, value: float | None, unit: str, target: str = "",
         target_ok: bool | None = None, floor: float | None = None, rat: float | None = None,
         note: str = "", floor1: float | None = None, rat1: float | None = None) -> dict[str, Any]:
    """A table row; ``floor``/``rat``: the same-hops floor and our ratio to it, ``floor1``/``rat1``:
    the one-hop floor's (issue #15's targets are ratios to the one-hop floor)."""
    return {"workload": workload, "metric": metric, "value": value, "unit": unit, "target": target,
            "target_ok": target_ok, "floor": floor, "ratio": rat,
            "ratio_ok": None if rat is None else rat <= MAX_RATIO, "note": note,
            "floor_onehop": floor1, "ratio_onehop": rat1,
            "ratio_onehop_ok": None if rat1 is None else rat1 <= MAX_RATIO}


def build_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    w = results["workloads"]
    fl, one = results.get("floor", {}), results.get("floor_onehop", {})
    rows: list[dict[str, Any]] = []
    if "W1" in w:
        r, f, f1 = w["W1"], fl.get("W1", {}), one.get("W1", {})
        r["floor"], r["floor_onehop"] = f, f1
        r["ratio"] = {"p50": ratio(r["p50_ms"], f.get("p50_ms")), "p99": ratio(r["p99_ms"], f.get("p99_ms")),
                      "overhead_p50": ratio(r["overhead_p50_ms"], f.get("overhead_p50_ms"))}
        r["ratio_onehop"] = {"p50": ratio(r["p50_ms"], f1.get("p50_ms")), "p99": ratio(r["p99_ms"], f1.get("p99_ms"))}
        rows.append(_row("W1", "5-step run latency p50", r["p50_ms"], "ms", "<= 15 ms", r["p50_ms"] <= 15,
                         f.get("p50_ms"), r["ratio"]["p50"], floor1=f1.get("p50_ms"), rat1=r["ratio_onehop"]["p50"]))
        rows.append(_row("W1", "5-step run latency p99", r["p99_ms"], "ms", "", None, f.get("p99_ms"),
                         r["ratio"]["p99"], floor1=f1.get("p99_ms"), rat1=r["ratio_onehop"]["p99"]))
        rows.append(_row("W1", "sched. overhead/step p50 (idle)", r["overhead_p50_ms"], "ms", "", None,
                         f.get("overhead_p50_ms"), r["ratio"]["overhead_p50"]))
    if "W2" in w:
        r, f, f1 = w["W2"], fl.get("W2", {}), one.get("W2", {})
        r["floor"], r["floor_onehop"] = f, f1
        # for a rate, "times worse than the floor" is floor / ours
        r["ratio_onehop"] = {"steps_per_s": ratio(f1.get("steps_per_s"), r["steps_per_s"])}
        r["ratio"] = {"steps_per_s": ratio(f.get("steps_per_s"), r["steps_per_s"]),
                      "overhead_p50": ratio(r["overhead_p50_ms"], f.get("overhead_p50_ms")),
                      "overhead_p99": ratio(r["overhead_p99_ms"], f.get("overhead_p99_ms"))}
        runs = r["runs"]
        if results.get("w2_limit"):  # --w2-limit: every job passed the dispatcher's gate
            runs = f"{runs} (tenant concurrency limit {results['w2_limit']})"
        rows.append(_row("W2", f"throughput, {runs} runs at once", r["steps_per_s"], "steps/s", ">= 1500 steps/s",
                         r["steps_per_s"] >= 1500, f.get("steps_per_s"), r["ratio"]["steps_per_s"],
                         f"{r['runs_per_s']} runs/s", floor1=f1.get("steps_per_s"),
                         rat1=r["ratio_onehop"]["steps_per_s"]))
        rows.append(_row("W2", "sched. overhead/step p50", r["overhead_p50_ms"], "ms", "<= 3 ms",
                         r["overhead_p50_ms"] <= 3, f.get("overhead_p50_ms"), r["ratio"]["overhead_p50"]))
        rows.append(_row("W2", "sched. overhead/step p99", r["overhead_p99_ms"], "ms", "", None,
                         f.get("overhead_p99_ms"), r["ratio"]["overhead_p99"]))
    if "W3" in w:
        r, f, f1 = w["W3"], fl.get("W3", {}), one.get("W3", {})
        r["floor"], r["floor_onehop"] = f, f1
        r["ratio"] = {"seconds": ratio(r["seconds"], f.get("seconds"))}
        r["ratio_onehop"] = {"seconds": ratio(r["seconds"], f1.get("seconds"))}
        rows.append(_row("W3", f"for_each of {r['items']} items", r["seconds"], "s", "<= 2 s", r["seconds"] <= 2,
                         f.get("seconds"), r["ratio"]["seconds"],
                         f"{r['events']} events in {r['commits']} commits (conflict proxy)",
                         floor1=f1.get("seconds"), rat1=r["ratio_onehop"]["seconds"]))
    if "W4" in w:
        r = w["W4"]
        load, rebuild = r["load"], r["rebuild"]
        r["ratio"] = {"load": ratio(load["p50_ms"], load["floor_p50_ms"]),
                      "rebuild": ratio(rebuild["seconds"], rebuild["floor_seconds"])}
        rows.append(_row("W4", f"load {load['events']}-event run (fresh)", load["p50_ms"], "ms", "<= 100 ms",
                         load["p50_ms"] <= 100, load["floor_p50_ms"], r["ratio"]["load"],
                         f"{load['commits']} commits; floor = the event store's reader, no replay"))
        rows.append(_row("W4", f"rebuild projection, {rebuild['events']} ev.", rebuild["seconds"], "s", "<= 20 s",
                         rebuild["seconds"] <= 20, rebuild["floor_seconds"], r["ratio"]["rebuild"],
                         f"{rebuild['events_per_s']:.0f} events/s; floor = raw ordered read"))
    if "PRIO" in w:
        r = w["PRIO"]
        rows.append(_row("PRIO", f"high-priority run, idle (p50 of {r['samples']})", r["idle_p50_ms"], "ms"))
        rows.append(_row("PRIO", f"… through a {r['backlog']}-run backlog", r["loaded_p50_ms"], "ms",
                         f"<= {r['target_ratio']:g}x idle", r["target_ok"],
                         note=f"{r['ratio_p50']}x idle; {r['slots']} slots; backlog still running: "
                              f"{r['backlog_still_running']}"))
    if "W5" in w and "baseline_mb" in w["W5"]:
        r = w["W5"]
        rows.append(_row("W5", "stack RSS baseline", r["baseline_mb"], "MB"))
        rows.append(_row("W5", "stack RSS peak during W2", r["peak_mb"], "MB"))
        rows.append(_row("W5", "stack RSS 5 s after W2", r["after_5s_mb"], "MB", "<= baseline +20 %",
                         r["returned_within_20pct"], note=f"x{r['after_vs_baseline']} of baseline"))
    return rows


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _mark(ok: bool | None) -> str:
    return "" if ok is None else (" ok" if ok else " MISS")


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "",
        f"Interlock benchmark — {results['started_at']}{'  (--quick sizes)' if results['quick'] else ''}",
        f"machine: {m['cpu_model']}, {m['cores']} cores, {m['ram_gb']} GB RAM; Python {m['python']}; "
        f"{m['nats_server']}; {m['platform']}; load avg at start {m['load_avg_at_start']}",
        f"setup: {SETUP}",
        "ratio = how many times the raw nats-py floor (time / floor time, or floor rate / rate); target <= 4;",
        "floor: the same hops per step as Interlock (bench/floor.py); 1-hop: one acked publish and one",
        "consume + ack per step (bench/onehop.py)",
        "",
    ]
    header = ("W", "metric", "value", "unit", "target", "floor", "ratio", "1-hop", "ratio", "note")
    table = [header]
    for r in results["table"]:
        table.append((r["workload"], r["metric"], _fmt(r["value"]), r["unit"],
                      (r["target"] + _mark(r["target_ok"])) if r["target"] else "",
                      _fmt(r["floor"]) if r["floor"] is not None else "-",
                      (f"{r['ratio']:.2f}x" + _mark(r["ratio_ok"])) if r["ratio"] is not None else "-",
                      _fmt(r.get("floor_onehop")) if r.get("floor_onehop") is not None else "-",
                      (f"{r['ratio_onehop']:.2f}x" + _mark(r["ratio_onehop_ok"]))
                      if r.get("ratio_onehop") is not None else "-",
                      r["note"]))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        lines.append("  ".join(str(c).ljust(widths[j]) if j != 2 else str(c).rjust(widths[j])
                               for j, c in enumerate(row)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * wd for wd in widths))
    w = results["workloads"]
    for name in ("W1", "W2"):
        if name in w and "stages_ms" in w[name]:
            lines += ["", f"{name}: where a step's time goes (p50 per stage, ms; from event 'at' times and "
                      f"worker receipt times)"]
            for stage, data in w[name]["stages_ms"].items():
                lines.append(f"  {stage:<10} {_fmt(data['p50']):>8}   {data['what']}")
            lines.append(f"  {'finish':<10} {_fmt(w[name]['last_step_to_run_succeeded_ms']['p50']):>8}   "
                         f"last StepSucceeded -> RunSucceeded")
            lines.append(f"  {'start':<10} {_fmt(w[name]['submit_to_run_started_ms']['p50']):>8}   "
                         f"trigger published -> RunStarted")
            lines.append(f"  {w[name]['events_per_run']} events in {w[name]['commits_per_run']} commits per run")
    for name in ("W2", "W3"):
        cpu = w.get(name, {}).get("cpu")
        if cpu:
            per = ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu["seconds"].items(), key=lambda kv: -kv[1]))
            lines += ["", f"{name}: CPU seconds per process ({cpu['total_seconds']} s in all, "
                      f"{cpu['share_of_machine_pct']} % of the machine's cores): {per}"]
    for name in ("W2", "W3"):
        profile = w.get(name, {}).get("profile")
        if not profile:
            continue
        lines += ["", f"{name} profile (py-spy, {profile['dir']}): hottest functions, % of each process's samples"]
        for proc, data in profile["processes"].items():
            if "self_pct" not in data:
                continue
            lines.append(f"  {proc} ({data['samples']} samples)")
            lines.append("    self:      " + "; ".join(f"{n} {pct}%" for n, pct in data["self_pct"][:6]))
            lines.append("    inclusive: " + "; ".join(f"{n} {pct}%" for n, pct in data["inclusive_pct"][:8]))
    if results["errors"]:
        lines += ["", "ERRORS:"]
        for where, text in results["errors"].items():
            lines.append(f"  {where}: {text.strip().splitlines()[-1]}")
    return "\n".join(lines)


def save(results: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.strptime(results["started_at"], "%Y-%m-%dT%H:%M:%SZ").strftime("%Y%m%dT%H%M%SZ")
    path = out / f"{stamp}.json"
    text = json.dumps(results, indent=2, sort_keys=False, default=str)
    path.write_text(text + "\n")
    (out / "latest.json").write_text(text + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    started = datetime.now(UTC)
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "started_at": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "telemetry": args.telemetry,
        "w2_limit": args.w2_limit,
        "only": args.only,
        "sizes": sizes.__dict__,
        "machine": machine(),
        "setup": SETUP,
        "targets": TARGETS,
        "workloads": {},
    }
    errors: dict[str, str] = {}
    t0 = time.perf_counter()
    try:
        asyncio.run(run_all(args, sizes, results, errors))
    except KeyboardInterrupt:
        errors["interrupted"] = "KeyboardInterrupt"
    results["duration_s"] = round(time.perf_counter() - t0, 1)
    results["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["errors"] = errors
    results["table"] = build_rows(results)
    print(render(results), flush=True)
    path = save(results, args.out)
    print(f"\nsaved {path} and {args.out / 'latest.json'} ({results['duration_s']} s)", flush=True)
    return 1 if errors else 0
