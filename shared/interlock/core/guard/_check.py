"""Running a guard's checks on a value, and what a violation does to it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import jsonschema

from interlock.contracts.events import GuardFinding
from interlock.core.sealed import redact as redact_sealed
from interlock.core.workflow import Guard, OnViolation, Rule

from ._text import Match, replace_spans, strings
from .injection import find_injection
from .pii import find_pii
from .secrets import find_secrets

Check = Literal["schema", "content", "secrets", "pii", "injection"]

SECRET_KINDS: frozenset[str] = frozenset({"secrets", "pii"})
"""Checks whose matches are confidential: held outputs have them redacted whatever the mode."""


@dataclass(frozen=True)
class Verdict:
    """One check's verdict: ``matches`` keep the matched text in memory (for redaction);
    :attr:`findings` is what may be recorded."""

    check: Check
    matches: tuple[Match, ...] = ()
    schema_problem: str | None = None

    @property
    def violation(self) -> bool:
        return bool(self.matches) or self.schema_problem is not None

    @property
    def findings(self) -> list[GuardFinding]:
        if self.schema_problem is not None:
            return [GuardFinding(kind="schema", path=self.schema_path, detail=self.schema_problem)]
        return [GuardFinding(kind=m.kind, path=m.path, start=m.start, end=m.end) for m in self.matches]

    schema_path: str = ""


@dataclass(frozen=True)
class Outcome:
    """What the step does with a checked value: its action and the value that goes on (redacted
    where needed; for ``fail`` nothing goes on)."""

    action: Literal["none", "fail", "approve", "redact"]
    value: Any = None
    verdicts: list[Verdict] = field(default_factory=list)


def _schema(value: Any, schema: dict[str, Any], root: str) -> Verdict:
    """The schema check. Its message names the keyword that failed, not the value (jsonschema's
    own messages quote the value, which may be a secret)."""
    best = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(redact_sealed(value)))
    if best is None:
        return Verdict("schema")
    path = root + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in best.absolute_path)
    expected = best.validator_value if isinstance(best.validator_value, str | int | float | bool) else None
    detail = f"fails {best.validator!r}" + (f" ({best.validator}: {expected!r})" if expected is not None else "")
    return Verdict("schema", schema_problem=detail, schema_path=path)


def _allowed(match: Match, allow: tuple[Rule, ...]) -> bool:
    return any(rule.pattern.search(match.text) for rule in allow)


def _content(text: str, path: str, deny: tuple[Rule, ...]) -> Iterator[Match]:
    for rule in deny:
        for m in rule.pattern.finditer(text):
            if m.end() > m.start():
                yield Match(f"deny:{rule.id}", path, m.start(), m.end(), m.group())


def check(guard: Guard, value: Any, root: str = "output") -> list[Verdict]:
    """Every check ``guard`` configures, on ``value`` (its strings are at ``root``…), in a fixed
    order: schema, content, secrets, pii, injection. A match that an allow rule matches is
    dropped."""
    verdicts: list[Verdict] = []
    if guard.schema_ is not None:
        verdicts.append(_schema(value, guard.schema_, root))
    texts = list(strings(value, root))
    allow = guard.content.allow_rules if guard.content is not None else ()
    scans: list[tuple[Check, Any]] = []
    if guard.content is not None:
        deny = guard.content.deny_rules
        scans.append(("content", lambda t, p: _content(t, p, deny)))
    if guard.secrets:
        scans.append(("secrets", find_secrets))
    if guard.pii:
        kinds = guard.pii
        scans.append(("pii", lambda t, p: find_pii(t, p, kinds)))
    if guard.injection:
        scans.append(("injection", find_injection))
    for name, scan in scans:
        found = [m for path, text in texts for m in scan(text, path) if not _allowed(m, allow)]
        verdicts.append(Verdict(name, tuple(_unique(found))))
    return verdicts


def _unique(matches: Iterable[Match]) -> Iterator[Match]:
    seen: set[tuple[str, str, int, int]] = set()
    for m in matches:
        key = (m.kind, m.path, m.start, m.end)
        if key not in seen:
            seen.add(key)
            yield m


def redact(value: Any, verdicts: Iterable[Verdict], root: str = "output",
           checks: frozenset[str] | None = None) -> Any:
    """``value`` with each match (of ``checks``; default: all) replaced by ``[redacted:KIND]``."""
    spans: dict[str, list[tuple[int, int, str]]] = {}
    for verdict in verdicts:
        if checks is not None and verdict.check not in checks:
            continue
        for m in verdict.matches:
            spans.setdefault(m.path, []).append((m.start, m.end, f"[redacted:{m.kind}]"))
    return replace_spans(value, root, spans)


def outcome(guard: Guard, value: Any, root: str = "output") -> Outcome:
    """Check ``value`` and decide: no violation goes on as it is; otherwise per ``on_violation``
    — ``fail``; ``redact`` (a schema violation cannot be redacted: it fails); ``approve``, holding
    the value with any secret or personal data redacted (it never waits in the log in clear)."""
    verdicts = check(guard, value, root)
    if not any(v.violation for v in verdicts):
        return Outcome("none", value, verdicts)
    mode = guard.on_violation
    schema_failed = any(v.check == "schema" and v.violation for v in verdicts)
    if mode == OnViolation.FAIL or (mode == OnViolation.REDACT and schema_failed):
        return Outcome("fail", None, verdicts)
    if mode == OnViolation.REDACT:
        return Outcome("redact", redact(value, verdicts, root), verdicts)
    return Outcome("approve", redact(value, verdicts, root, SECRET_KINDS), verdicts)


def summary(verdicts: Iterable[Verdict]) -> str:
    """One line for an error message: which checks found what kinds where (never the text)."""
    parts = []
    for v in verdicts:
        if not v.violation:
            continue
        if v.schema_problem is not None:
            parts.append(f"schema: {v.schema_path} {v.schema_problem}")
            continue
        where = ", ".join(sorted({f"{m.kind} at {m.path}" for m in v.matches})[:5])
        more = len({(m.kind, m.path) for m in v.matches}) - 5
        parts.append(f"{v.check}: {where}{f' (+{more} more)' if more > 0 else ''}")
    return "; ".join(parts)
