"""Real headless Chromium from the distribution's packages, driven by playwright (never its own
browser download): where it is, how to launch it, and a context per signed-in person."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playwright.async_api import BrowserContext, Playwright, ViewportSize

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
VIEWPORT: ViewportSize = {"width": 1400, "height": 1000}


def chromium_path() -> str | None:
    """The distribution's Chromium (``INTERLOCK_CHROMIUM`` overrides), None when not installed."""
    configured = os.environ.get("INTERLOCK_CHROMIUM")
    for candidate in ((configured,) if configured else CHROMIUM_CANDIDATES):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("chromium") if not configured else None


def missing_reason() -> str | None:
    """Why the browser tests cannot run here, None when they can."""
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    if chromium_path() is None:
        return ("Chromium is not installed (apt-get install -y chromium; .ci/run installs it) "
                "or INTERLOCK_CHROMIUM does not name it")
    return None


@asynccontextmanager
async def browser_context(pw: Playwright, profile_dir: Path, **options: Any) -> AsyncIterator[BrowserContext]:
    """A fresh Chromium with its own user-data dir (nothing shared between people or tests)."""
    context = await pw.chromium.launch_persistent_context(
        str(profile_dir), executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS,
        viewport=VIEWPORT, **options)
    try:
        yield context
    finally:
        await context.close()
