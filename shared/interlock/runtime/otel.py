"""What traces and metrics share: the process's resource and the standard ``OTEL_*`` choices."""

from __future__ import annotations

import os

from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource


def resource(service: str, instance: str = "") -> Resource:
    """The process's OpenTelemetry resource: ``service.name`` ``interlock-{service}`` and its
    instance id, unless ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` say otherwise."""
    attributes: dict[str, str] = {SERVICE_NAME: f"interlock-{service}", "service.namespace": "interlock"}
    if instance:
        attributes[SERVICE_INSTANCE_ID] = instance
    # Resource.create merges OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME over these defaults
    return Resource.create(attributes)


def otlp_protocol(signal: str) -> str:
    """The OTLP protocol for ``signal`` (TRACES, METRICS): its own variable, the common one, gRPC."""
    common = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    return os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", common)
