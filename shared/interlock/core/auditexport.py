"""A run's log as a file an auditor can verify with no server: ``interlock audit export RUN``.

JSON Lines. The first line describes the export; every other line is one stored message of the
run's subject, in stream order, exactly as stored (contracts/README.md, "Verifying offline")::

    {"format": "interlock.run-export.v1", "run_id": …, "tenant": …, "subject": …, "exported_at": …}
    {"stream_seq": 7, "at": 1796173051.25, "headers": {"Interlock-Signer": …, …}, "data_b64": "…"}

``data_b64`` is standard base64 of the message bytes (so undecodable bytes survive); ``at`` is
when the server stored it (unix seconds; null when not known).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime

from interlock.contracts import headers as h
from interlock.contracts import subjects as s
from interlock.core.eventstore.recorder import StoredCommit, stored_commit

EXPORT_FORMAT = "interlock.run-export.v1"
_KEPT_HEADERS = (h.SIGNER, h.SIGNATURE, h.MSG_ID)


class ExportError(ValueError):
    """The file is not a run export; the message names the line."""


def export_lines(run_id: str, tenant: str, commits: Sequence[StoredCommit]) -> Iterator[str]:
    """The export of a run's stored messages, one JSON document per line (no newline)."""
    yield json.dumps({"format": EXPORT_FORMAT, "run_id": run_id, "tenant": tenant,
                      "subject": s.run_events(tenant, run_id), "exported_at": datetime.now(UTC).isoformat(),
                      "commits": len(commits)})
    for commit in commits:
        headers = {k: v for k, v in (commit.headers or {}).items() if k in _KEPT_HEADERS}
        if commit.signer and h.SIGNER not in headers:
            headers[h.SIGNER] = commit.signer
        if commit.signature and h.SIGNATURE not in headers:
            headers[h.SIGNATURE] = commit.signature
        yield json.dumps({"stream_seq": commit.stream_seq, "at": commit.at, "headers": headers,
                          "data_b64": base64.b64encode(commit.raw or b"").decode()})


def read_export(lines: Iterable[str], source: str = "export") -> tuple[str, str, list[StoredCommit]]:
    """(run id, tenant, stored commits) from an export; :class:`ExportError` naming the line."""
    run_id = tenant = ""
    commits: list[StoredCommit] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise ExportError(f"{source}:{number}: not JSON ({e.msg})") from None
        if not isinstance(doc, dict):
            raise ExportError(f"{source}:{number}: not a JSON object")
        if number == 1:
            if doc.get("format") != EXPORT_FORMAT:
                raise ExportError(f"{source}:1: not an Interlock run export (format {doc.get('format')!r}, "
                                  f"expected {EXPORT_FORMAT!r})")
            run_id, tenant = str(doc.get("run_id", "")), str(doc.get("tenant", ""))
            continue
        try:
            data = base64.b64decode(doc["data_b64"], validate=True)
            seq = int(doc["stream_seq"])
            headers = {str(k): str(v) for k, v in (doc.get("headers") or {}).items()}
            at = float(doc["at"]) if doc.get("at") is not None else None
        except (KeyError, TypeError, ValueError, binascii.Error) as e:
            raise ExportError(f"{source}:{number}: not an exported message ({type(e).__name__}: {e})") from None
        commits.append(stored_commit(seq, data, headers, at))
    if not run_id:
        raise ExportError(f"{source}: empty, or no header line")
    return run_id, tenant, commits


__all__ = ["EXPORT_FORMAT", "ExportError", "export_lines", "read_export"]
