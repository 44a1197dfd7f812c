"""Header names and subjects are spelled only in ``interlock.contracts``.

Every other module takes them from :mod:`interlock.contracts.headers` and
:mod:`interlock.contracts.subjects`. This test reads every Python file of the repository with
:mod:`ast` and fails, listing ``file:line``, on a string constant (or the text of an f-string)
that *is* a header name (``Nats-…``, ``traceparent``) or a subject (``il.…``, ``$JS.…``).

What it looks at, so that a legitimate string cannot trip it by accident:
- only string values in code: comments, docstrings and other bare string statements are skipped;
- a header name must be the whole string (``"Nats-Msg-Id"``), not a word in a sentence;
- a subject must be the whole string and have no spaces (``"il.evt.acme.r1"``,
  ``f"$JS.API.INFO.{x}"``), so a log message that starts with one is not a subject.
A line that must spell one (a test pinning the published wire format, say) says so with a
``# literal: <why>`` comment on that line.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ["contracts", "shared", "services", "tools", "bench", "tests"]
EXEMPT = [ROOT / "contracts" / "interlock" / "contracts", Path(__file__).resolve()]

# as headers are written: "Nats-Msg-Id", not a program name such as "nats-server"
HEADER = re.compile(r"Nats(?:-(?:[A-Z][A-Za-z0-9]*|\{\}))+|[Tt]raceparent")
SUBJECT = re.compile(r"(?:il|\$JS)\.\S*")
ALLOWED = re.compile(r"#\s*literal:\s*\S")
FIELD = "{}"  # stands for a replacement field when an f-string's text is checked


def python_files() -> Iterator[Path]:
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if ".venv" in path.parts or any(path == e or e in path.parents for e in EXEMPT):
                continue
            yield path


def bare_strings(tree: ast.AST) -> set[int]:
    """ids of string constants that are statements of their own (docstrings and the like)."""
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant | ast.JoinedStr)}


def strings(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, text) of every string value in code; an f-string as its text with ``{}`` for fields."""
    skip = bare_strings(tree)
    inside_fstring = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr)
                      for part in ast.walk(node) if part is not node}
    for node in ast.walk(tree):
        if id(node) in skip or id(node) in inside_fstring:
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value
        elif isinstance(node, ast.JoinedStr):
            text = "".join(part.value if isinstance(part, ast.Constant) and isinstance(part.value, str) else FIELD
                           for part in node.values)
            yield node.lineno, text


def offence(text: str) -> str | None:
    if HEADER.fullmatch(text):
        return "header name"
    if SUBJECT.fullmatch(text):
        return "subject"
    return None


def offenders() -> list[str]:
    found = []
    for path in python_files():
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for line, text in strings(ast.parse(source, filename=str(path))):
            kind = offence(text)
            if kind and not ALLOWED.search(lines[line - 1]):
                found.append(f"{path.relative_to(ROOT)}:{line}: {kind} {text!r}")
    return sorted(set(found))


def test_no_header_or_subject_literal_outside_contracts() -> None:
    found = offenders()
    assert not found, ("spell these with interlock.contracts.headers / interlock.contracts.subjects "
                       "(or mark the line '# literal: <why>'):\n" + "\n".join(found))


# -- the scanner itself ------------------------------------------------------------------------
def scan(source: str) -> list[tuple[int, str]]:
    return sorted((line, text) for line, text in strings(ast.parse(source)) if offence(text))


def test_the_scanner_finds_headers_and_subjects_in_code() -> None:
    source = '''
headers = {"Nats-Msg-Id": msg_id, "Nats-Expected-Last-Subject-Sequence": "3"}
seq = msg.headers["Nats-Sequence"]
ctx = extract({"traceparent": value})
subject = "il.evt.acme.run"
api = f"$JS.API.DIRECT.GET.{stream}"
events = f"il.evt.{tenant}.{run_id}"
'''
    assert [line for line, _ in scan(source)] == [2, 2, 3, 4, 5, 6, 7]


def test_the_scanner_skips_docstrings_comments_and_prose() -> None:
    source = '''
"""Module docstring: appends carry Nats-Msg-Id on il.evt.{tenant}.{run_id}."""
def f() -> None:
    """Nats-Msg-Id"""
    # headers = {"Nats-Msg-Id": x}
    log.warning("append to il.evt.%s not acknowledged", run)
    raise ValueError(f"il.evt.{tenant} is not a run event subject")
    name = "traceparent_value"
    binary = "nats-server"
    detail = "see Nats-Msg-Id"
    url = "nats://127.0.0.1:4222"
    "il.evt.a.b"
'''
    assert scan(source) == []


def test_the_scanner_covers_the_repository() -> None:
    files = {path.relative_to(ROOT).parts[0] for path in python_files()}
    assert {"shared", "services", "tests"} <= files
    assert not any(path.is_relative_to(EXEMPT[0]) for path in python_files())
    assert Path(__file__).resolve() not in set(python_files())
