"""The README's curl flow, unchanged, against `interlock up` with the example workflow and the admin
API key `interlock up` printed (with real curl and jq; without them, the same requests with httpx)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
START = "<!-- curl flow: run by tests/e2e/test_api_curl.py against `interlock up`; keep it runnable -->\n```bash\n"
END = "```\n<!-- end of curl flow -->"
INTERLOCK = [sys.executable, "-m", "interlock.cli"]


def readme_flow() -> str:
    text = (ROOT / "README.md").read_text()
    assert START in text and END in text, "README.md lost the markers around the curl flow"
    return text.split(START, 1)[1].split(END, 1)[0]


def read_until(proc: subprocess.Popen[str], pattern: str, timeout: float) -> tuple[re.Match[str], str]:
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen += line
        match = re.search(pattern, line)
        if match:
            return match, seen
    raise AssertionError(f"`interlock up` did not print {pattern!r} within {timeout}s; it printed:\n{seen}")


def test_the_readme_curl_flow_works_against_interlock_up(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTERLOCK_")}
    up = subprocess.Popen([*INTERLOCK, "up", "--api-port", "0", "--worker",
                           str(ROOT / "examples/incident-remediation/agents.py") + ":worker"],
                          cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url_match, _ = read_until(up, r"HTTP API: (http://\S+)/api/v1", timeout=240)
        key_match, _ = read_until(up, r"Admin API key \(shown once; kept in (\S+), mode 0600\): (ilk_\S+)", 30)
        api_url, key_file, printed_key = url_match.group(1), key_match.group(1), key_match.group(2)
        assert (tmp_path / key_file).read_text().strip() == printed_key
        assert (tmp_path / key_file).stat().st_mode & 0o777 == 0o600
        # as the README says: applied once as admin (its trigger subject changes the triggers stream)
        subprocess.run([*INTERLOCK, "workflow", "apply", str(ROOT / "examples/incident-remediation/workflow.yaml")],
                       cwd=tmp_path, env=env, check=True, capture_output=True, timeout=60)
        (tmp_path / "examples").symlink_to(ROOT / "examples")  # the flow runs where `interlock up` did

        if shutil.which("curl") and shutil.which("jq"):
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_flow()], cwd=tmp_path,
                                    env={**env, "INTERLOCK_API_URL": api_url}, capture_output=True, text=True,
                                    timeout=180)
            assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            out = result.stdout
        else:
            print("curl or jq is not installed: running the README's requests with httpx instead")
            out = httpx_flow(f"{api_url}/api/v1", printed_key, tmp_path)
        assert "event: RunSucceeded" in out and "event: end" in out, out
        assert re.search(r"approved by admin \(\S+\) via api:[0-9a-f]{12}: patch reviewed", out), out
        assert '"run_id"' in out.splitlines()[-1] and '"dry_run":false' in out.splitlines()[-1], out
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
        if up.stdout is not None:
            up.stdout.close()


def httpx_flow(api: str, key: str, cwd: Path) -> str:
    """The README's requests, one for one, for a machine without curl or jq."""
    lines: list[str] = []
    with httpx.Client(base_url=api, headers={"X-API-Key": key}, timeout=30) as http:
        http.post("/workflows", content=(cwd / "examples/incident-remediation/workflow.yaml").read_bytes(),
                  headers={"Content-Type": "application/yaml"}).raise_for_status()
        r = http.post("/workflows/incident-remediation/runs", headers={"X-Tenant-ID": "default",
                                                                        "Idempotency-Key": "INC-1"},
                      json={"input": {"alert": {"id": "INC-1", "host": "web-7"}}})
        r.raise_for_status()
        run = r.json()["run_id"]
        lines.append(http.get(f"/workflow-runs/{run}").json()["status"])
        deadline = time.monotonic() + 60
        while not [a for a in http.get("/approvals").json()["items"] if a["run_id"] == run]:
            assert time.monotonic() < deadline, "no approval request within 60s"
            time.sleep(1)
        http.post(f"/approvals/{run}/approval_gate/approve", json={"reason": "patch reviewed"}).raise_for_status()
        with http.stream("GET", f"/workflow-runs/{run}/events") as stream:
            lines += list(stream.iter_lines())
        lines += [row["summary"] for row in http.get(f"/workflow-runs/{run}/timeline?limit=200").json()["items"]]
        r = http.post(f"/workflow-runs/{run}/rerun", json={"from_step": "apply_patch", "dry_run": False})
        r.raise_for_status()
        lines.append(r.text)
    return "\n".join(lines)
