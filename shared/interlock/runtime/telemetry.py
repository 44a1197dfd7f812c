"""One call a process makes at start to set up its traces, metrics and logs from its settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from interlock.runtime import logs, metrics, otel, tracing
from interlock.runtime.settings import TelemetrySettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Telemetry:
    """What :func:`setup` turned on."""

    tracing: bool
    metrics_port: int | None


def setup(kind: str, settings: TelemetrySettings, *, instance: str = "", logging_too: bool = True,
          level: int = logging.INFO) -> Telemetry:
    """Traces (``INTERLOCK_TRACING``, ``OTEL_*``), metrics (``INTERLOCK_METRICS_PORT``, ``OTEL_*``)
    and, unless ``logging_too`` is False (a library embedded in someone's program), logs in
    ``INTERLOCK_LOG_FORMAT`` for the process kind ``kind`` (planner, worker, …)."""
    if logging_too:
        logs.configure(settings.log_format, service=kind, instance=instance, level=level)
    traced = tracing.configure(settings.tracing, service=kind, instance=instance)
    port = metrics.configure(otel.resource(kind, instance), prometheus_port=settings.metrics_port,
                             prometheus_host=settings.metrics_host)
    if port is not None:
        log.info("metrics at http://%s:%d/metrics", settings.metrics_host, port)
    return Telemetry(tracing=traced, metrics_port=port)


def shutdown() -> None:
    """Flush batched spans and metrics (call before the process exits)."""
    tracing.shutdown()
    metrics.shutdown()
