"""A local OTLP/HTTP endpoint that accepts and drops what it gets: the cost of exporting telemetry
is measured without a collector (``python -m bench --telemetry``).

It runs in its own process, as a collector would: its work is neither in the bench process (whose
event loop times the runs) nor in any service's CPU figure, and it answers at once, so it never
holds an exporter back. At the end it reports requests, bytes and spans received per signal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def otlp_sink() -> Iterator[tuple[str, dict[str, Any]]]:
    """(endpoint URL, totals) for the block's duration; ``totals`` is filled in when it ends:
    ``{"traces": {"requests", "bytes", "spans"}, "metrics": {"requests", "bytes"}, "spans_by_name": {...}}``."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.otlp_sink"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    port = int(proc.stdout.readline())
    totals: dict[str, Any] = {}
    try:
        yield f"http://127.0.0.1:{port}", totals
    finally:
        proc.stdin.close()  # the sink's cue to print its totals and exit
        try:
            line = proc.stdout.readline()
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            line = ""
        if line:
            totals.update(json.loads(line))


def _serve() -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    totals: dict[str, dict[str, int]] = {"traces": {"requests": 0, "bytes": 0, "spans": 0},
                                         "metrics": {"requests": 0, "bytes": 0}, "other": {"requests": 0, "bytes": 0}}
    by_name: dict[str, int] = {}  # "service.name: span name" -> spans
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: an exporter's session reuses its connection

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            signal = "traces" if self.path.endswith("/traces") else "metrics" if self.path.endswith("/metrics") \
                else "other"
            spans = 0
            if signal == "traces" and self.headers.get("Content-Encoding", "") != "gzip":
                request = ExportTraceServiceRequest.FromString(body)
                for rs in request.resource_spans:
                    service = next((a.value.string_value for a in rs.resource.attributes
                                    if a.key == "service.name"), "")
                    for scope in rs.scope_spans:
                        spans += len(scope.spans)
                        with lock:
                            for span in scope.spans:
                                key = f"{service}: {span.name}"
                                by_name[key] = by_name.get(key, 0) + 1
            with lock:
                totals[signal]["requests"] += 1
                totals[signal]["bytes"] += len(body)
                if spans:
                    totals["traces"]["spans"] += spans

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.server_port, flush=True)
    sys.stdin.read()  # until the bench closes our stdin
    server.shutdown()
    with lock:
        print(json.dumps({**totals, "spans_by_name": dict(sorted(by_name.items()))}), flush=True)


if __name__ == "__main__":
    _serve()
