"""The console's operator tools (issue 17) in real headless Chromium against the real stack:
pause and unpause a run, feedback on a step's output, the compare page and the failures page.
The fixtures (``tests/browser/conftest.py``) start nats-server with auth, the services, the
example agents and the api service."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from interlock.contracts import events as ev
from interlock.core.rundiff import since_time
from tests.browser.conftest import Console
from tests.browser.test_console import ALERT, LIVE_TIMEOUT_MS, awaiting_approval, wait_status

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.timeout(240)]


def event_row(event_type: type[ev.EventData]) -> str:
    """A timeline entry of ``event_type``."""
    return f'#timeline li[data-type="{event_type.type_name}"]'


async def until(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g}s")
        await asyncio.sleep(0.1)


async def parked_run(console: Console, alert: dict[str, Any] | None = None) -> str:
    """A run of the example waiting at its approval gate (running, nothing to dispatch)."""
    run_id = await console.admin.start_run("incident-remediation", alert or ALERT, key=uuid.uuid4().hex,
                                           requested_by="browser-test")
    await awaiting_approval(console.admin, run_id)
    return run_id


async def test_an_operator_pauses_and_unpauses_a_run_from_its_page_and_a_viewer_is_shown_no_controls(
        console: Console, tmp_path: Path) -> None:
    operator = await console.person("operator", tmp_path)
    viewer = await console.person("viewer", tmp_path)
    run_id = await parked_run(console)

    await viewer.sign_in()
    await viewer.page.goto(console.url(f"/runs/{run_id}"))
    await viewer.page.wait_for_selector("#intervene-denied")
    assert await viewer.page.locator("form[data-api]").count() == 0, "a viewer may not intervene"

    await operator.sign_in()
    page = operator.page
    await page.goto(console.url(f"/runs/{run_id}"))
    await page.click("#pause-run")  # no reason: the browser does not send it
    assert await page.locator(event_row(ev.RunPaused)).count() == 0
    await page.fill("#pause-reason", "hold while the CAB meets")
    await page.click("#pause-run")
    await page.wait_for_selector(event_row(ev.RunPaused), timeout=LIVE_TIMEOUT_MS)
    await page.wait_for_selector("#run-paused")
    assert (await console.admin.load_run(run_id)).paused
    await operator.shot("run-paused")

    await page.fill("#pause-reason", "CAB said go")
    await page.click("#unpause-run")
    await page.wait_for_selector(event_row(ev.RunUnpaused), timeout=LIVE_TIMEOUT_MS)
    await page.wait_for_selector("#pause-run")
    run = await console.admin.load_run(run_id)
    assert not run.paused and run.status == "running"
    await operator.shot("run-unpaused")
    await console.admin.cancel(run_id, reason="test over")


async def test_feedback_on_a_succeeded_steps_output_is_recorded_and_a_refusal_shows_the_apis_detail(
        console: Console, tmp_path: Path) -> None:
    approver = await console.person("approver", tmp_path)  # approvers may give feedback too
    run_id = await parked_run(console)
    await approver.sign_in()
    page = approver.page
    await page.goto(console.url(f"/runs/{run_id}"))
    form = page.locator("#step-classify form.feedback-form")
    await page.click("#step-classify details.step-feedback summary")
    await form.locator("button.give-feedback").click()  # nothing given: the API refuses, the page says why
    refusal = form.locator("output.api-result.error")
    await refusal.wait_for()
    assert "give a score, a correction or a note" in await refusal.inner_text()

    await form.locator("input[name=score]").fill("0.25")
    await form.locator("input[name=note]").fill("severity is too low")
    await form.locator("textarea[name=correction]").fill('{"severity": "high"}')
    await form.locator("button.give-feedback").click()
    await page.wait_for_selector(event_row(ev.FeedbackGiven), timeout=LIVE_TIMEOUT_MS)
    await approver.shot("feedback-given")

    async def recorded() -> list[dict[str, Any]]:
        return [row for row in await console.admin.feedback(run_id=run_id) if row.get("step_id") == "classify"]

    rows = await until(recorded, "the feedback projected")
    assert rows[0]["score"] == 0.25 and rows[0]["note"] == "severity is too low"
    assert rows[0]["correction"] == {"severity": "high"} and rows[0]["by"] == approver.principal
    await console.admin.cancel(run_id, reason="test over")


async def test_the_compare_page_marks_the_first_divergence_of_two_runs_and_the_failures_page_groups(
        console: Console, tmp_path: Path) -> None:
    viewer = await console.person("viewer", tmp_path)
    other = {"alert": {**ALERT["alert"], "symptom": "latency spike"}}
    run_a, run_b = await asyncio.gather(parked_run(console), parked_run(console, other))
    expected = (await console.admin.run_diff(run_a, run_b)).first_divergence
    assert expected is not None, "the runs differ in one input"

    await viewer.sign_in()
    page = viewer.page
    await page.goto(console.url(f"/runs/{run_a}"))
    await page.fill("#compare-with", run_b)
    await page.click("#compare-run")
    await page.wait_for_url(lambda url: url.endswith(f"/runs/{run_a}/diff/{run_b}"))
    marked = page.locator("article.step-diff.first-divergence")
    assert await marked.count() == 1
    assert await marked.get_attribute("data-step") == expected.step_id
    assert expected.step_id in await page.inner_text("#first-divergence-summary")
    order = await page.eval_on_selector_all("article.step-diff",
                                            "els => els.map(e => [e.dataset.step, e.dataset.differs])")
    steps = [step for step, _ in order]
    assert all(not differs for _, differs in order[:steps.index(expected.step_id)]), \
        f"the steps before the first divergence are shown the same: {order}"
    html = await page.content()
    assert "tok-never-shown" not in html, "a sensitive input stays redacted on the compare page"
    await viewer.shot("diff")

    await page.goto(console.url("/workflows/incident-remediation/failures?since=7d"))
    groups = await console.admin.failures("incident-remediation", since=since_time("7d", datetime.now(UTC)))
    rows = page.locator("#failure-groups tr.failure-group")
    assert await rows.count() == len(groups)
    await viewer.shot("failures")
    bad = await page.goto(console.url("/workflows/incident-remediation/failures?since=yesterday-ish"))
    assert bad is not None and bad.status == 400
    await asyncio.gather(*(console.admin.cancel(r, reason="test over") for r in (run_a, run_b)))


async def test_an_operator_resumes_a_failed_run_from_its_page_and_the_same_run_goes_on(
        console: Console, tmp_path: Path) -> None:
    approver = await console.person("approver", tmp_path)
    operator = await console.person("operator", tmp_path)
    run_id = await parked_run(console)
    await approver.sign_in()
    inbox = approver.page
    await inbox.goto(console.url("/approvals"))
    card = inbox.locator(f"#approval-{run_id}-approval_gate")
    await card.locator("input[name=reason]").fill("not today")
    await card.locator("button.reject").click()
    await inbox.wait_for_selector(".flash.ok")
    await wait_status(console.admin, run_id, "failed")

    await operator.sign_in()
    page = operator.page
    await page.goto(console.url(f"/runs/{run_id}"))
    assert await page.locator("#pause-run").count() == 0, "a failed run cannot be paused"
    await page.fill("#resume-reason", "the change window opened")
    await page.click("#resume-run")
    await page.wait_for_selector(event_row(ev.RunResumed), timeout=LIVE_TIMEOUT_MS)
    await awaiting_approval(console.admin, run_id)  # the same run asks again
    assert (await console.admin.load_run(run_id)).status == "running"
    await operator.shot("run-resumed")
    await console.admin.cancel(run_id, reason="test over")
