"""The web console in real headless Chromium against the real stack: nats-server with auth, the
services, the example agents and the api service on uvicorn (port 0).

Each test saves a screenshot of every page it visits under its output directory
(``tmp_path/screens``); with ``INTERLOCK_DOCS_SCREENSHOT=1`` the happy path also refreshes
``docs/console-run.png``, the README's picture of the run page.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from interlock.client import Client, NotFound
from interlock.core.policy import DEFAULT_BUNDLE
from interlock.core.run import Run
from tests.browser.conftest import Console

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.timeout(240)]

DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "console-run.png"
LIVE_TIMEOUT_MS = 60_000
ALERT = {"alert": {"id": "INC-4711", "host": "web-7", "service": "checkout", "symptom": "5xx spike after deploy",
                   "api_token": "tok-never-shown"}}


def node(step: str, state: str | None = None) -> str:
    """The DAG node of ``step`` (in ``state``)."""
    return f'svg.dag g.node[data-step="{step}"]' + (f'[data-state="{state}"]' if state else "")


async def start_example_run(console: Console, requested_by: str = "browser-test") -> str:
    return await console.admin.start_run("incident-remediation", ALERT, key=uuid.uuid4().hex,
                                         requested_by=requested_by)


async def wait_status(client: Client, run_id: str, status: str, timeout: float = 60.0) -> None:
    await console_wait(client, run_id, lambda run: run.status == status, timeout, f"status {status}")


async def console_wait(client: Client, run_id: str, ok: Callable[[Run], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    seen = "not started"
    while True:
        with contextlib.suppress(NotFound):  # the planner has not started it yet
            run = await client.load_run(run_id)
            if ok(run):
                return
            seen = f"{run.status}, steps {({k: v.status for k, v in run.steps.items()})}"
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} did not reach {what} within {timeout:g}s: {seen}")
        await asyncio.sleep(0.1)


async def awaiting_approval(client: Client, run_id: str) -> None:
    await console_wait(client, run_id, lambda run: "approval_gate" in run.steps
                       and run.steps["approval_gate"].status == "awaiting_approval", 60.0, "the approval gate")


# -- the happy path ----------------------------------------------------------------------------
async def test_sign_in_start_a_run_watch_the_dag_turn_green_live_approve_in_the_inbox_and_see_it_succeed(
        console: Console, tmp_path: Path) -> None:
    operator = await console.person("operator", tmp_path)
    approver = await console.person("approver", tmp_path)

    # signing in: an unauthenticated page goes to the sign-in form; a wrong key is refused
    page = operator.page
    await page.goto(console.url("/runs"))
    assert "/login" in page.url
    await page.fill("#api_key", "ilk_not-a-real-key")
    await page.click("#sign-in")
    await page.wait_for_selector(".flash.error, [role=alert]")
    await operator.shot("login-refused")
    await operator.sign_in()
    await operator.shot("runs")

    # start a run of the example from the runs page
    await page.click("details.start summary")
    await page.select_option("#start-workflow", "incident-remediation")
    await page.fill("#start-input", console.json(ALERT))
    await page.click("#start-submit")
    await page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}$"))
    run_id = page.url.rsplit("/", 1)[-1]
    await page.wait_for_selector("svg.dag")
    initial = await page.get_attribute(node("notify"), "data-state")
    assert initial == "pending", "the run cannot have reached notify before anyone approved"

    # live: the page turns the first steps green and stops at the approval gate without a reload
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url) if frame == page.main_frame else None)
    for step in ("detect", "classify", "enrich", "patch_plan"):
        await page.wait_for_selector(node(step, "succeeded"), timeout=LIVE_TIMEOUT_MS)
    await page.wait_for_selector(node("approval_gate", "awaiting_approval"), timeout=LIVE_TIMEOUT_MS)
    await operator.shot("run-awaiting-approval")
    assert "tok-never-shown" not in await page.content(), "a sensitive input field must be redacted"

    # the approver's inbox says exactly what is approved
    run = await console.admin.load_run(run_id)
    gate = run.steps["approval_gate"]
    assert gate.approval is not None
    inbox = approver.page
    await approver.sign_in()
    await inbox.goto(console.url("/approvals"))
    card = inbox.locator(f"#approval-{run_id}-approval_gate")
    await card.wait_for()
    text = await card.inner_text()
    for shown in (gate.approval.job_hash, gate.approval.snapshot_id, "approval_gate", "Apply patch",
                  operator.principal, "sre-oncall"):
        assert shown in text, f"the inbox must show {shown!r}:\n{text}"
    await approver.shot("approvals")
    await card.locator("input[name=reason]").fill("patch reviewed")
    await card.locator("button.approve").click()
    await inbox.wait_for_selector(".flash.ok")
    await approver.shot("approvals-after")

    # …and the operator's page, still open, turns everything green by itself
    await page.wait_for_selector('#run-status[data-status="succeeded"]', timeout=LIVE_TIMEOUT_MS)
    for step in ("approval_gate", "apply_patch", "notify"):
        await page.wait_for_selector(node(step, "succeeded"), timeout=LIVE_TIMEOUT_MS)
    await page.wait_for_selector('body[data-live-done="true"]', timeout=LIVE_TIMEOUT_MS)
    assert not [u for u in navigations if "/runs/" in u], f"the run page reloaded: {navigations}"
    assert console.url(f"/api/v1/workflow-runs/{run_id}/events") in operator.requests, \
        "the run page follows the run's Server-Sent Events"
    attempts = await page.locator("#step-apply_patch table tbody tr").count()
    assert attempts == 2, "the example's apply_patch fails once, then succeeds: two attempts"
    step_text = await page.locator("#step-approval_gate").inner_text()
    assert "granted" in step_text and approver.principal in step_text and "patch reviewed" in step_text
    timeline = await page.locator("#timeline").inner_text()
    assert "approved" in timeline.lower() and "succeeded" in timeline.lower()
    await operator.shot("run-succeeded")
    if os.environ.get("INTERLOCK_DOCS_SCREENSHOT") == "1" or not DOCS_SCREENSHOT.exists():
        # the README's picture (the viewport: header, facts, DAG), refreshed on request only, so
        # that a test run leaves the checkout as it was
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        await page.screenshot(path=str(DOCS_SCREENSHOT))

    # the runs list shows it succeeded; the other pages render
    await page.goto(console.url("/runs"))
    row = page.locator(f'tr[data-run="{run_id}"]')
    assert await row.get_attribute("data-status") == "succeeded"
    await operator.shot("runs-after")
    await page.goto(console.url("/agents"))
    assert "incident.detect" in await page.inner_text("main")
    await operator.shot("agents")
    for path, name in (("/dead-letters", "dead-letters"), ("/policy", "policy")):
        response = await page.goto(console.url(path))
        assert response is not None and response.status == 200, path
        await operator.shot(name)

    # signing out ends the session
    await page.click("#sign-out")
    await page.wait_for_url(re.compile(r"/login"))
    await page.goto(console.url("/runs"))
    assert "/login" in page.url


# -- a rejected approval -----------------------------------------------------------------------
async def test_a_rejected_approval_fails_the_run_and_shows_who_rejected_and_why(
        console: Console, tmp_path: Path) -> None:
    approver = await console.person("approver", tmp_path)
    run_id = await start_example_run(console)
    await awaiting_approval(console.admin, run_id)
    await approver.sign_in()
    page = approver.page
    await page.goto(console.url("/approvals"))
    card = page.locator(f"#approval-{run_id}-approval_gate")
    await card.wait_for()
    # a rejection needs a reason: the browser does not send one without it
    await card.locator("button.reject").click()
    assert await card.count() == 1 and "/approvals" in page.url
    await card.locator("input[name=reason]").fill("change freeze until Monday")
    await card.locator("button.reject").click()
    await page.wait_for_selector(".flash.ok")
    await wait_status(console.admin, run_id, "failed")

    await page.goto(console.url(f"/runs/{run_id}"))
    await page.wait_for_selector('#run-status[data-status="failed"]')
    await page.wait_for_selector(node("approval_gate", "failed"))
    await page.wait_for_selector(node("apply_patch", "pending"))
    gate = await page.locator("#step-approval_gate").inner_text()
    assert "rejected" in gate and "change freeze until Monday" in gate and approver.principal in gate
    assert "change freeze" in await page.inner_text("#run-head")
    await approver.shot("run-rejected")


# -- a denied run ------------------------------------------------------------------------------
async def test_a_run_the_policy_denies_shows_as_denied_with_the_rule_and_snapshot(
        console: Console, tmp_path: Path) -> None:
    viewer = await console.person("viewer", tmp_path)
    suffix = uuid.uuid4().hex[:8]
    wf, topic, rule = f"deny-{suffix}", f"ops.wipe{suffix}", f"no-wipe-{suffix}"
    await console.admin.apply_workflow(f"id: {wf}\nversion: 1\nsteps:\n  wipe: {{topic: {topic}}}\n  after:\n"
                                       f"    type: notify\n    depends_on: [wipe]\n    message: done\n")
    forbid = f"""
@id("{rule}")
@reason("wiping is switched off")
forbid(principal, action == Action::"dispatch", resource) when {{ resource.topic == "{topic}" }};
"""
    # (the browser tests' server is their own: this bundle stays in force for them only)
    revision = await console.admin.policy_publish(DEFAULT_BUNDLE.source + forbid, by="browser-test")
    run_id = await console.admin.start_run(wf, {}, key=uuid.uuid4().hex, requested_by="browser-test")
    await wait_status(console.admin, run_id, "denied")
    await viewer.sign_in()
    page = viewer.page
    await page.goto(console.url(f"/runs/{run_id}"))
    await page.wait_for_selector('#run-status[data-status="denied"]')
    await page.wait_for_selector(node("wipe", "denied"))
    await page.wait_for_selector(node("after", "pending"))
    step = await page.locator("#step-wipe").inner_text()
    assert "deny" in step and rule in step and revision.snapshot_id in step
    assert "wiping is switched off" in await page.inner_text("#run-head")
    await viewer.shot("run-denied")
    await page.goto(console.url(f"/runs?status=denied&workflow={wf}"))
    assert await page.locator(f'tr[data-run="{run_id}"][data-status="denied"]').count() == 1
    assert await page.locator("#runs-rows tr[data-run]").count() == 1, "the filter shows only that run"
    await viewer.shot("runs-filtered")
    await page.goto(console.url("/policy"))
    assert revision.snapshot_id in await page.inner_text("#policy-active")
    await viewer.shot("policy-history")


# -- roles -------------------------------------------------------------------------------------
async def test_a_viewer_sees_no_cancel_and_the_server_refuses_it_while_an_operator_cancels(
        console: Console, tmp_path: Path) -> None:
    viewer = await console.person("viewer", tmp_path)
    operator = await console.person("operator", tmp_path)
    run_id = await start_example_run(console)
    await awaiting_approval(console.admin, run_id)

    await viewer.sign_in()
    page = viewer.page
    await page.goto(console.url(f"/runs/{run_id}"))
    await page.wait_for_selector("#actions-denied")
    assert await page.locator("#cancel-form, #rerun-form").count() == 0
    await viewer.shot("run-as-viewer")
    await page.goto(console.url("/approvals"))
    assert await page.locator(f"#approval-{run_id}-approval_gate button").count() == 0
    # the server enforces it whatever the page shows: a forged form with a valid CSRF token
    forged = await viewer.post(f"/runs/{run_id}/cancel", {"reason": "viewer says stop"})
    assert forged.status == 403, await forged.text()
    forged = await viewer.post(f"/approvals/{run_id}/approval_gate",
                               {"decision": "approve", "job_hash": "0" * 64, "reason": "me"})
    assert forged.status == 403
    assert (await console.admin.load_run(run_id)).status == "running"

    # an operator's form without its CSRF token is refused too; with it, the run is cancelled
    await operator.sign_in()
    no_token = await operator.post(f"/runs/{run_id}/cancel", {"reason": "x"}, csrf=False)
    assert no_token.status == 403
    assert (await console.admin.load_run(run_id)).status == "running"
    op = operator.page
    op.on("dialog", lambda dialog: dialog.accept())
    await op.goto(console.url(f"/runs/{run_id}"))
    await op.fill("#cancel-reason", "not needed any more")
    await op.click("#cancel-run")
    await op.wait_for_selector('#run-status[data-status="cancelled"]', timeout=LIVE_TIMEOUT_MS)
    await operator.shot("run-cancelled")
    run = await console.admin.load_run(run_id)
    assert run.status == "cancelled"

    # a re-run from a step, as a dry run first: the plan, and nothing started
    await op.select_option("#rerun-from", "apply_patch")
    await op.click("#rerun-run")
    await op.wait_for_selector("#rerun-plan")
    plan = await op.inner_text("#rerun-plan")
    assert "apply_patch" in plan and "reuse output" in plan and "run again" in plan
    assert op.url.endswith(f"/runs/{run_id}/rerun")
    await operator.shot("rerun-plan")

    # …and for real: a new run, linked to the old one, that reuses the outputs before apply_patch
    await op.select_option("#rerun-from", "apply_patch")
    await op.uncheck("#rerun-dry")
    await op.click("#rerun-run")
    await op.wait_for_url(lambda url: re.search(r"/runs/[0-9a-f-]{36}$", url) is not None and run_id not in url)
    new_id = op.url.rsplit("/", 1)[-1]
    assert run_id in await op.inner_text("#run-head"), "the re-run names the run it re-runs"
    rerun = await console.admin.load_run(new_id)
    assert rerun.rerun_of == run_id and set(rerun.reused_outputs) == {"detect", "classify", "enrich", "patch_plan"}
    await operator.shot("rerun-started")
    await console.admin.cancel(new_id, reason="test over")

