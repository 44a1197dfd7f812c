"""Schemathesis over ``/openapi.json`` against the real api service (uvicorn, port 0) and services:
generated requests, valid and invalid, to every operation; no 5xx, and every response matches its
documented status, content type and schema. Bounded: a time budget and a cap on examples.

Policy publish and rollback are left out: they change the session's shared active policy, which
other tests rely on (test_api covers them with chosen inputs)."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import pytest

from interlock.contracts import events as ev
from tests.integration.api_fixtures import Api
from tests.integration.harness import Harness

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
MAX_TIME_S = 60
# the coverage phase is left out: schemathesis 4.32's own generator fails on the free-form `input`
# (any JSON) of the policy routes (a hypothesis FlakyFailure inside the generator, no request made)
PHASES = "examples,fuzzing,stateful"
MAX_EXAMPLES = 25


async def test_schemathesis_finds_no_server_error_and_no_schema_mismatch(api: Api, harness: Harness,
                                                                         tmp_path: Path) -> None:
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    assert cli, "schemathesis is a dev dependency: pip install -e '.[dev]'"
    key = await api.key("admin")
    # a real run, so that operations on a known run id are exercised as well as unknown ones
    await harness.apply("id: schema-wf\nversion: 1\nsteps:\n  only: {type: notify, channel: ops, "
                        "message: hi}\n")
    run_id, _ = await api.admin.submit_run("schema-wf", {}, key="schema-run")
    await harness.wait_for(run_id, lambda evs: any(e["type"] == ev.RunSucceeded.type_name for e in evs))
    proc = await asyncio.create_subprocess_exec(
        cli, "run", f"{api.url}/openapi.json", "--checks", CHECKS, "--max-time", str(MAX_TIME_S),
        "--max-examples", str(MAX_EXAMPLES), "--phases", PHASES, "--header", f"X-API-Key: {key}", "--workers", "2",
        "--exclude-path-regex", r"/events$|/policy/(publish|rollback)$", "--request-timeout", "20",
        "--suppress-health-check", "all", "--no-color", "--report", "junit",
        "--report-dir", str(tmp_path), "--seed", "12",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    print(text)
    assert proc.returncode == 0, f"schemathesis found problems:\n{text[-12000:]}"
    assert "passed" in text.lower()
