"""The console's operator tools (issue 17) in real headless Chromium against the real stack:
pause and unpause a run, feedback on a step's output (and a live refresh that leaves a form being
typed in alone), the compare page and the failures page. The fixtures
(``tests/browser/conftest.py``) start nats-server with auth, the services, the example agents and
the api service. Every wait is for something the page shows (playwright's ``expect``)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import expect

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
    await expect(viewer.page.locator("#intervene-denied")).to_be_visible()
    await expect(viewer.page.locator("form[data-api]")).to_have_count(0)  # a viewer may not intervene

    await operator.sign_in()
    page = operator.page
    await page.goto(console.url(f"/runs/{run_id}"))
    await page.click("#pause-run")  # no reason: the browser refuses to send it
    assert await page.locator("#pause-reason").evaluate("field => field.validity.valueMissing")
    assert not [url for url in operator.requests if url.endswith(f"/{run_id}/pause")], "nothing was sent"
    await page.fill("#pause-reason", "hold while the CAB meets")
    await page.click("#pause-run")
    await expect(page.locator(event_row(ev.RunPaused))).to_have_count(1, timeout=LIVE_TIMEOUT_MS)
    await expect(page.locator("#run-paused")).to_be_visible(timeout=LIVE_TIMEOUT_MS)
    assert (await console.admin.load_run(run_id)).paused
    await operator.shot("run-paused")

    await page.fill("#pause-reason", "CAB said go")
    await page.click("#unpause-run")
    await expect(page.locator(event_row(ev.RunUnpaused))).to_have_count(1, timeout=LIVE_TIMEOUT_MS)
    await expect(page.locator("#pause-run")).to_be_visible(timeout=LIVE_TIMEOUT_MS)
    run = await console.admin.load_run(run_id)
    assert not run.paused and run.status == "running"
    await operator.shot("run-unpaused")
    await console.admin.cancel(run_id, reason="test over")


async def feedback_rows(console: Console, run_id: str, step_id: str, count: int = 1) -> list[dict[str, Any]]:
    """The feedback on ``step_id`` once the auditor has projected ``count`` of it."""

    async def projected() -> list[dict[str, Any]]:
        rows = [row for row in await console.admin.feedback(run_id=run_id) if row.get("step_id") == step_id]
        return rows if len(rows) >= count else []

    return list(await until(projected, f"{count} feedback on {step_id} projected"))


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
    await expect(refusal).to_contain_text("give a score, a correction or a note")

    await form.locator("input[name=score]").fill("0.25")
    await form.locator("input[name=note]").fill("severity is too low")
    await form.locator("textarea[name=correction]").fill('{"severity": "high"}')
    await form.locator("button.give-feedback").click()
    await expect(form.locator("output.api-result.ok")).to_have_text("done")
    await expect(page.locator(event_row(ev.FeedbackGiven))).to_have_count(1, timeout=LIVE_TIMEOUT_MS)
    await approver.shot("feedback-given")

    rows = await feedback_rows(console, run_id, "classify")
    assert rows[0]["score"] == 0.25 and rows[0]["note"] == "severity is too low"
    assert rows[0]["correction"] == {"severity": "high"} and rows[0]["by"] == approver.principal
    await console.admin.cancel(run_id, reason="test over")


async def test_a_live_update_of_the_run_leaves_the_feedback_being_typed_focused_and_sendable(
        console: Console, tmp_path: Path) -> None:
    """The run moves on (its steps redraw) while someone types feedback on a step: their form stays
    the element they type in, with its focus and text, and sends what they typed."""
    approver = await console.person("approver", tmp_path)
    run_id = await parked_run(console)
    await approver.sign_in()
    page = approver.page
    await page.goto(console.url(f"/runs/{run_id}"))
    gate = page.locator("#step-approval_gate")
    await expect(gate).to_have_attribute("data-state", "awaiting_approval")
    form = page.locator("#step-classify form.feedback-form")
    await page.click("#step-classify details.step-feedback summary")
    await form.locator("input[name=score]").fill("0.5")  # typed, then left: kept too
    note = form.locator("input[name=note]")
    await note.click()
    await note.press_sequentially("typed before ")
    await note.evaluate("field => { field.dataset.typedIn = 'yes'; }")  # a redrawn form would not carry this

    await console.admin.approve(run_id, "approval_gate", reason="go ahead")  # the run goes on to the end
    await expect(gate).to_have_attribute("data-state", "succeeded", timeout=LIVE_TIMEOUT_MS)
    await expect(page.locator("#run-status")).to_have_attribute("data-status", "succeeded", timeout=LIVE_TIMEOUT_MS)
    await expect(page.locator("body")).to_have_attribute("data-live-done", "true", timeout=LIVE_TIMEOUT_MS)

    await page.keyboard.type("and after")  # where the focus is: still the note
    await expect(note).to_have_value("typed before and after")
    await expect(note).to_have_attribute("data-typed-in", "yes")
    await expect(note).to_be_focused()
    await expect(form.locator("input[name=score]")).to_have_value("0.5")
    await expect(page.locator("#step-classify details.step-feedback")).to_have_attribute("open", "")
    await form.locator("button.give-feedback").click()
    await expect(form.locator("output.api-result.ok")).to_have_text("done")
    await approver.shot("feedback-kept-through-a-live-update")

    rows = await feedback_rows(console, run_id, "classify")
    assert rows[0]["note"] == "typed before and after" and rows[0]["score"] == 0.5, rows


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
    await expect(marked).to_have_count(1)
    await expect(marked).to_have_attribute("data-step", expected.step_id)
    await expect(page.locator("#first-divergence-summary")).to_contain_text(expected.step_id)
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
    await expect(page.locator("#failure-groups tr.failure-group")).to_have_count(len(groups))
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
    await expect(inbox.locator(".flash.ok")).to_be_visible()
    await wait_status(console.admin, run_id, "failed")

    await operator.sign_in()
    page = operator.page
    await page.goto(console.url(f"/runs/{run_id}"))
    await expect(page.locator("#resume-run")).to_be_visible()
    await expect(page.locator("#pause-run")).to_have_count(0)  # a failed run cannot be paused
    await page.fill("#resume-reason", "the change window opened")
    await page.click("#resume-run")
    await expect(page.locator(event_row(ev.RunResumed))).to_have_count(1, timeout=LIVE_TIMEOUT_MS)
    await awaiting_approval(console.admin, run_id)  # the same run asks again
    assert (await console.admin.load_run(run_id)).status == "running"
    await operator.shot("run-resumed")
    await console.admin.cancel(run_id, reason="test over")
