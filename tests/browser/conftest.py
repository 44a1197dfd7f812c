"""The browser tests' stack: a nats-server of their own (operator mode), the services, the
auditor and the example agents in-process, the api service on uvicorn (port 0), and one
headless Chromium per signed-in person, each with a fresh profile.

Without Chromium (or playwright) the tests skip, saying why; under ``CI=true`` they fail
instead: CI installs Chromium (``./dev chromium``) and must run them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from interlock.auditor.service import AuditorService
from interlock.client import Client
from interlock.core.natsserver import EmbeddedNats
from interlock.core.topology import provision
from interlock.devstack import example_file
from interlock.devstack.targets import load_target
from interlock.identity import IdentityHome
from interlock.runtime.service import ServiceSettings
from tests.browser.browser import browser_context, missing_reason
from tests.integration.harness import Harness, connect
from tests.principals import Principals

if TYPE_CHECKING:
    from playwright.async_api import APIResponse, BrowserContext, Page, Playwright

    from interlock.api.server import ApiServer


@pytest.fixture(scope="session")
def chromium_ready() -> None:
    reason = missing_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"browser tests cannot run under CI: {reason}")
    print(f"\nskipping the browser tests: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
async def playwright_driver(chromium_ready: None) -> AsyncIterator[Playwright]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        yield pw


@dataclass
class Stack:
    harness: Harness
    admin: Client
    api: ApiServer
    keys: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    """(role, name) -> (principal, key)."""

    async def key(self, role: str, name: str) -> tuple[str, str]:
        """An API key of ``role`` for the tenant, acting as principal ``name``: (principal, key)."""
        if (role, name) not in self.keys:
            record, key = await self.admin.create_api_key(role, principal=name, by="browser-tests")
            self.keys[(role, name)] = (record.principal, key)
        return self.keys[(role, name)]


@pytest.fixture(scope="module")
def browser_nats(chromium_ready: None, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[tuple[EmbeddedNats, Principals]]:
    """A nats-server of the browser tests' own (operator mode, as the session's): what they
    publish (a policy bundle, API keys, runs) never reaches the other tests' server."""
    home = tmp_path_factory.mktemp("console-nats")
    principals = Principals(IdentityHome(home / "identity"))
    server = EmbeddedNats(store_dir=home / "store", port=0, log_file=home / "nats.log",
                          config=principals.home.server_config())
    server.start()
    yield server, principals
    server.stop()


@pytest.fixture(scope="module")
async def browser_stack(browser_nats: tuple[EmbeddedNats, Principals],
                        tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    from interlock.api.server import ApiServer
    from interlock.api.settings import ApiSettings

    server, principals = browser_nats
    provisioned, admin_creds = server.url, principals.admin()
    home = tmp_path_factory.mktemp("console-stack")
    nc = await connect(provisioned, admin_creds)
    await provision(nc.jetstream())
    # every credential issued from now on (and those issued so far) is trusted by the services' keyring
    principals.publish_to = (provisioned, admin_creds)
    await asyncio.to_thread(principals.publish_keyring)
    harness = Harness(url=provisioned, nc=nc, principals=principals)
    await harness.start_services()
    auditor = AuditorService(ServiceSettings(nats_url=provisioned, provision=False, sweep_interval=0,
                                             creds=principals.service("auditor")),
                             db_path=home / "auditor.sqlite3")
    await auditor.start()
    admin = await Client.connect(provisioned, creds=admin_creds, name="browser-tests-admin")
    api_client = await Client.connect(provisioned, creds=principals.service("api"), name="interlock-api")
    api = ApiServer(ApiSettings.load(port=0, session_secret="browser-tests-" + "s" * 24,
                                     session_secret_file=home / "session.secret"), client=api_client)
    try:
        await harness.apply(example_file("workflow.yaml").read_text())
        await harness.start_worker(load_target(f"{example_file('agents.py')}:worker"))
        await api.start()
        yield Stack(harness=harness, admin=admin, api=api)
    finally:
        await api.stop()
        await api_client.close()
        await admin.close()
        await auditor.stop()
        await harness.stop()
        await nc.close()


PEOPLE = {"operator": "olivia-ops", "approver": "sre-bob", "viewer": "victor-viewer", "admin": "ada-admin"}


@dataclass
class Person:
    """Someone signed in (or about to) with their own browser."""

    console: Console
    role: str
    principal: str
    key: str
    context: BrowserContext
    page: Page
    requests: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """Script errors and console errors (a CSP violation is one) the pages raised."""

    def watch(self) -> None:
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        # an expected 4xx answer is logged as "Failed to load resource"; anything else is a problem
        self.page.on("console", lambda message: self.problems.append(f"console: {message.text}")
                     if message.type == "error" and not message.text.startswith("Failed to load resource") else None)

    def check(self) -> None:
        """Nothing came from anywhere but the console, and no page raised an error."""
        base = self.console.url("/")
        foreign = [url for url in self.requests if not url.startswith((base, "data:", "about:"))]
        assert not foreign, f"{self.role}'s browser fetched from elsewhere: {foreign}"
        assert not self.problems, f"{self.role}'s pages raised: {self.problems}"

    async def sign_in(self) -> None:
        page = self.page
        await page.goto(self.console.url("/login"))
        await page.fill("#api_key", self.key)
        await page.click("#sign-in")
        await page.wait_for_url(lambda url: "/login" not in url)
        assert self.principal in await page.inner_text("header.top"), "the header names who is signed in"

    async def shot(self, name: str) -> Path:
        """A full-page screenshot of what this person sees, in the test's output directory."""
        self.console.shots.mkdir(parents=True, exist_ok=True)
        self.console.shot_count += 1
        path = self.console.shots / f"{self.console.shot_count:02d}-{self.role}-{name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        return path

    async def post(self, path: str, form: dict[str, str], *, csrf: bool = True) -> APIResponse:
        """A form POST with this person's session (and the page's CSRF token), as a forged form would."""
        data: dict[str, str | float | bool] = dict(form)
        if csrf:
            token = await self.page.get_attribute("input[name=csrf_token]", "value")
            assert token, "a signed-in page carries the session's CSRF token"
            data["csrf_token"] = token
        return await self.page.request.post(self.console.url(path), form=data, max_redirects=0)


@dataclass
class Console:
    stack: Stack
    driver: Playwright
    out: Path
    stack_exit: contextlib.AsyncExitStack
    shot_count: int = 0
    people: list[Person] = field(default_factory=list)

    @property
    def admin(self) -> Client:
        return self.stack.admin

    @property
    def shots(self) -> Path:
        return self.out / "screens"

    def url(self, path: str) -> str:
        return self.stack.api.url + path

    @staticmethod
    def json(value: Any) -> str:
        return json.dumps(value, indent=2)

    async def person(self, role: str, tmp_path: Path, name: str | None = None) -> Person:
        principal, key = await self.stack.key(role, name or PEOPLE.get(role, f"{role}-person"))
        context = await self.stack_exit.enter_async_context(
            browser_context(self.driver, tmp_path / "profiles" / f"{role}-{principal}"))
        page = context.pages[0] if context.pages else await context.new_page()
        page.set_default_timeout(30_000)
        person = Person(self, role, principal, key, context, page)
        person.watch()
        self.people.append(person)
        return person


@pytest.fixture
async def console(browser_stack: Stack, playwright_driver: Playwright, tmp_path: Path) -> AsyncIterator[Console]:
    async with contextlib.AsyncExitStack() as stack:
        console = Console(browser_stack, playwright_driver, tmp_path, stack)
        yield console
    print(f"\nscreenshots: {tmp_path / 'screens'}")
    for person in console.people:
        person.check()
