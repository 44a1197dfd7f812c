"""What the console's templates show: redacted JSON, times, durations and the Jinja2 environment.

Pure functions (no I/O), so the pages and their tests share them.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from interlock.api.console._dag import STATE_CLASS, STATE_LABEL

TEMPLATES = Path(__file__).with_name("templates")
STATIC = Path(__file__).with_name("static")

REDACTED = "••• redacted •••"
# keys whose values a console never shows, at any depth of an input or output
SENSITIVE_KEY = re.compile(
    r"pass(word|wd|phrase)?|secret|token|api[_-]?key|auth(orization)?|credential|private[_-]?key|cookie|session"
    r"|signature|seed|ssn|card[_-]?number|cvv", re.IGNORECASE)
MAX_JSON_CHARS = 20_000  # a huge payload is cut for the page (the API returns it whole)

RUN_STATUSES = ("running", "compensating", "succeeded", "failed", "denied", "cancelled", "timed_out")
RUN_CLASS = {"running": "running", "compensating": "retrying", "succeeded": "succeeded", "failed": "failed",
             "denied": "denied", "cancelled": "skipped", "timed_out": "failed"}


def redact(value: Any) -> Any:
    """``value`` with every value under a sensitive-looking key (password, token, api_key, …) replaced."""
    if isinstance(value, dict):
        return {k: (REDACTED if isinstance(k, str) and SENSITIVE_KEY.search(k) and v is not None else redact(v))
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def pretty(value: Any) -> str:
    """Redacted, indented JSON for a ``<pre>`` (cut at MAX_JSON_CHARS)."""
    if value is None:
        return "—"
    text = json.dumps(redact(value), indent=2, sort_keys=False, default=str, ensure_ascii=False)
    if len(text) > MAX_JSON_CHARS:
        text = text[:MAX_JSON_CHARS] + f"\n… cut at {MAX_JSON_CHARS:,} characters"
    return text


def parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def when(value: Any) -> str:
    """A timestamp as ``2026-12-02 01:02:03`` UTC (— when missing)."""
    at = parse_time(value)
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if at else "—"


def clock(value: Any) -> str:
    """A timestamp as ``01:02:03.456`` (the timeline's column)."""
    at = parse_time(value)
    return at.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3] if at else "—"


def duration(start: Any, end: Any) -> str:
    """``1.23 s`` / ``4 min 5 s`` between two timestamps (— when either is missing)."""
    a, b = parse_time(start), parse_time(end)
    if a is None or b is None:
        return "—"
    seconds = (b - a).total_seconds()
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def until(value: Any, now: datetime | None = None) -> str:
    """How long until ``value`` (``in 59 min``), or ``expired``."""
    at = parse_time(value)
    if at is None:
        return "never"
    left = (at - (now or datetime.now(UTC))).total_seconds()
    if left <= 0:
        return "expired"
    if left < 120:
        return f"in {int(left)} s"
    return f"in {int(left // 60)} min" if left < 7200 else f"in {int(left // 3600)} h"


def short(text: Any, n: int = 12) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= n else s[:n] + "…"


def environment() -> Environment:
    """The console's Jinja2 environment: autoescaped templates from the package, with the filters above."""
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "svg"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(pretty=pretty, when=when, clock=clock, short=short, until=until)
    env.globals.update(duration=duration, state_class=STATE_CLASS, state_label=STATE_LABEL, run_class=RUN_CLASS,
                       run_statuses=RUN_STATUSES)
    return env
