"""Web console: how long the runs page takes with 10,000 runs in the auditor's projection (target ≤ 300 ms).

The projection is seeded directly (valid hash-chained envelopes, two events a run, applied with
``Projection.apply_commits``), then the real path is timed: a signed-in browser's ``GET /runs``
over HTTP → uvicorn → the console → ``interlock.client`` → NATS request → the auditor's SQLite
query → the rendered page. ``python -m bench.console_bench [--runs N] [--samples K]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from bench.common import percentile, progress, summary
from interlock.api.server import ApiServer
from interlock.api.settings import ApiSettings
from interlock.auditor.projection import Projection
from interlock.auditor.service import AuditorService
from interlock.client import Client
from interlock.contracts import events as ev
from interlock.core.codec import envelope_from_event
from interlock.core.natsserver import EmbeddedNats
from interlock.core.run import Run
from interlock.core.topology import provision
from interlock.identity import IdentityHome
from interlock.runtime.service import ServiceSettings

TENANT = "default"
WORKFLOW = "incident-remediation"
TARGET_MS = 300.0
SEED_BATCH = 2000


def seeded_run(i: int, started: datetime) -> tuple[str, list[dict[str, Any]]]:
    """Run ``i``'s envelopes: started, then succeeded (every tenth cancelled), hash-chained."""
    rid = uuid.uuid4()
    run = Run.start(rid, ev.RunStarted(workflow_id=WORKFLOW, workflow_version="1", definition_hash="c" * 64,
                                       input={"alert": {"id": f"INC-{i}"}}, idempotency_key=f"seed-{i}",
                                       tenant=TENANT, requested_by="bench"), at=started)
    if i % 10 == 9:
        run.cancel(ev.RunCancelled(by="bench", reason="seeded"))
    else:
        run.succeed(ev.RunSucceeded(output={"n": i}))
    envelopes: list[dict[str, Any]] = []
    prev = ev.GENESIS_HASH
    for event in run.collect_events():
        envelope = envelope_from_event(event, tenant=TENANT, service="bench", prev_hash=prev)
        prev = envelope["hash"]
        envelopes.append(envelope)
    return str(rid), envelopes


async def seed(path: Path, runs: int) -> float:
    """Write ``runs`` runs into the projection at ``path``; seconds taken."""
    t0 = time.monotonic()
    first = datetime.now(UTC) - timedelta(seconds=runs)
    async with Projection(path) as projection:
        for start in range(0, runs, SEED_BATCH):
            batch = [seeded_run(i, first + timedelta(seconds=i)) for i in range(start, min(runs, start + SEED_BATCH))]
            await projection.apply_commits([(TENANT, rid, envs, None) for rid, envs in batch])
            progress(f"console bench: seeded {min(runs, start + SEED_BATCH):,}/{runs:,} runs")
        stored = len(await projection.runs(TENANT, limit=runs + 1))
    assert stored == runs, f"seeded {runs} runs, the projection holds {stored}"
    return time.monotonic() - t0


async def measure_runs_page(runs: int = 10_000, samples: int = 30, home: Path | None = None) -> dict[str, Any]:
    """The runs page's load time (ms: p50, p95, max over ``samples`` loads after one warm-up) with
    ``runs`` runs in the projection; also the filtered page (status=cancelled) and the next page."""
    with tempfile.TemporaryDirectory(prefix="il-console-bench-") as scratch:
        root = home or Path(scratch)
        identity = IdentityHome(root / "identity")
        admin_creds = identity.issue("admin", TENANT, name="bench-admin")
        server = EmbeddedNats(store_dir=root / "nats", port=0, log_file=root / "nats.log",
                              config=identity.server_config())
        url = server.start()
        auditor: AuditorService | None = None
        api: ApiServer | None = None
        clients: list[Client] = []
        try:
            admin = await Client.connect(url, creds=admin_creds, name="bench-console-admin")
            clients.append(admin)
            await provision(admin.js)
            seed_s = await seed(root / "auditor.sqlite3", runs)
            auditor = AuditorService(ServiceSettings(nats_url=url, provision=False, sweep_interval=0,
                                                     creds=identity.issue("auditor", name="auditor")),
                                     db_path=root / "auditor.sqlite3")
            await auditor.start()
            api_client = await Client.connect(url, creds=identity.issue("api", name="api"), name="interlock-api")
            clients.append(api_client)
            api = ApiServer(ApiSettings.load(port=0, session_secret="console-bench-" + "x" * 24,
                                             session_secret_file=root / "session.secret"), client=api_client)
            base = await api.start()
            _, key = await admin.create_api_key("viewer", principal="bench-viewer", by="bench")
            async with httpx.AsyncClient(base_url=base, timeout=30.0) as http:
                signed = await http.post("/login", data={"api_key": key, "next": "/runs"})
                assert signed.status_code == 303, signed.text
                pages = {"runs": "/runs", "runs_filtered": "/runs?status=cancelled",
                         "runs_search": f"/runs?q=seed-{runs // 2}"}
                out: dict[str, Any] = {"runs_in_projection": runs, "seed_s": round(seed_s, 2), "samples": samples,
                                       "target_ms": TARGET_MS}
                for name, path in pages.items():
                    out[name] = await _time_page(http, path, samples)
                first = await http.get("/runs")
                older = _older_link(first.text)
                if older:
                    out["runs_page2"] = await _time_page(http, older, samples)
            out["p50_ms"] = out["runs"]["p50"]
            out["ok"] = out["p50_ms"] is not None and out["runs"]["p95"] <= TARGET_MS
            return out
        finally:
            if api is not None:
                await api.stop()
            if auditor is not None:
                await auditor.stop()
            for client in clients:
                await client.close()
            server.stop()


def _older_link(html: str) -> str | None:
    import html as html_lib
    import re

    found = re.search(r'href="(/runs\?[^"]*cursor=[^"]+)" id="older"', html)
    return html_lib.unescape(found.group(1)) if found else None


async def _time_page(http: httpx.AsyncClient, path: str, samples: int) -> dict[str, Any]:
    warm = await http.get(path)
    assert warm.status_code == 200, f"GET {path}: {warm.status_code} {warm.text[:300]}"
    assert "runs-rows" in warm.text, f"GET {path} is not the runs page"
    times: list[float] = []
    for _ in range(samples):
        t0 = time.perf_counter()
        response = await http.get(path)
        times.append((time.perf_counter() - t0) * 1000)
        assert response.status_code == 200
    rows = warm.text.count("<tr data-run=")
    return {**summary(times, 1), "p95": round(percentile(times, 95) or 0.0, 1), "rows": rows,
            "bytes": len(warm.content)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.console_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=30)
    args = parser.parse_args(argv)
    result = asyncio.run(measure_runs_page(args.runs, args.samples))
    for name in ("runs", "runs_filtered", "runs_search", "runs_page2"):
        if name in result:
            r = result[name]
            print(f"GET {name:<14} p50 {r['p50']:>7.1f} ms  p95 {r['p95']:>7.1f} ms  max {r['max']:>7.1f} ms  "
                  f"({r['rows']} rows, {r['bytes']:,} bytes)")
    verdict = "within" if result["ok"] else "OVER"
    print(f"runs page with {result['runs_in_projection']:,} runs in the projection: p50 {result['p50_ms']:.1f} ms "
          f"({verdict} the {TARGET_MS:.0f} ms target); seeding took {result['seed_s']} s")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
