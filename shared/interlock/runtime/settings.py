"""Process settings, one class per process kind, read from ``INTERLOCK_*`` environment variables.

Settings are read when the class is instantiated (when a service or worker starts), never at
import, so importing Interlock cannot fail on the environment. A value that does not fit raises
:class:`SettingsError` naming the variable, e.g. ``INTERLOCK_REPLICAS: 'three' is not a whole
number``. Keyword arguments override the environment (tests and embedding code use them).

- ``INTERLOCK_NATS_URL`` (both): server URL(s), comma-separated; default the URL ``interlock up``
  wrote to ``{home}/nats.url`` (home: ``INTERLOCK_HOME``, else ``.interlock``), else
  ``nats://127.0.0.1:4222``
- ``INTERLOCK_INLINE_LIMIT`` (both): largest payload kept inline, bytes (262144)
- ``INTERLOCK_REPLICAS``: stream replicas, 1-5 (1)
- ``INTERLOCK_CREDS`` (both): the NATS credentials (``.creds``) file to connect with (none: anonymous,
  which a server with auth refuses)
- ``INTERLOCK_PROVISION``: create streams and buckets at start (false: whoever bootstraps does it with
  the admin credential, ``interlock provision``; a service credential may not change streams)
- ``INTERLOCK_INSTANCE``: this copy's name in logs (``{hostname}-{pid}``)
- ``INTERLOCK_CONCURRENCY``: messages a service handles at once per consumer (64)
- ``INTERLOCK_SWEEP_S``: seconds between reconciler passes, 0 = off (15)
- ``INTERLOCK_WORKER_CONCURRENCY``: jobs a worker handles at once per topic (8)
- ``INTERLOCK_TRACING`` (both): span export to the terminal, ``off`` or ``console`` (off); OTLP
  export follows the standard ``OTEL_*`` variables (``OTEL_EXPORTER_OTLP_ENDPOINT``, …)
- ``INTERLOCK_LOG_FORMAT`` (both): ``text`` or ``json`` (text)
- ``INTERLOCK_METRICS_PORT`` (both): serve Prometheus ``/metrics`` on this port (0 = any free
  port, unset = no endpoint); ``INTERLOCK_METRICS_HOST`` its address (127.0.0.1)
- ``INTERLOCK_TENANT``: the tenant whose jobs a worker takes (default)
- ``INTERLOCK_TENANT_BUDGETS``: per-tenant model budgets over a window, JSON (the planner enforces them)
- ``INTERLOCK_GATE_LIMITS``: workload limits per topic and tenant, fair-share weights and the
  backpressure bound, JSON (the dispatcher applies them; :mod:`interlock.core.workload`)
- ``INTERLOCK_SIGNING``: ``on`` (default) or ``off``: sign the commits a service appends and refuse
  unsigned ones; ``off`` (benchmarks, logs from before signing) appends unsigned commits and accepts
  them, with a warning at start
- ``INTERLOCK_TLS_CA``, ``INTERLOCK_TLS_CERT``, ``INTERLOCK_TLS_KEY``, ``INTERLOCK_TLS_HOSTNAME``
  (both): TLS to NATS, see :mod:`interlock.runtime.tls`
- ``INTERLOCK_DATA_KEYS_FILE``, ``INTERLOCK_DATA_KEYS``, ``INTERLOCK_SENSITIVE_KEYS`` (both): the
  tenants' data keys and which key names are sensitive, see :mod:`interlock.runtime.datakeys`
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, SettingsConfigDict

from interlock.contracts.messages import DEFAULT_TENANT
from interlock.core.workload import GateLimits
from interlock.runtime.connect import resolve_url
from interlock.runtime.datakeys import DataKeySettings
from interlock.runtime.payloads import DEFAULT_INLINE_LIMIT
from interlock.runtime.tls import TlsSettings

ENV_PREFIX = "INTERLOCK_"


class SettingsError(Exception):
    """A setting's value cannot be used. The message names the variable and the problem.

    Not a ValueError: pydantic would wrap that in a ValidationError of its own."""


def _default_instance() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class _Settings(BaseSettings):
    """Base: the ``INTERLOCK_`` prefix, unknown arguments refused, clear errors."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", populate_by_name=True,
                                      env_ignore_empty=True)  # VAR= means "not set", as it always has

    @model_validator(mode="wrap")
    @classmethod
    def _clear_errors(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        # a wrap validator rather than an __init__ override keeps the typed constructor for mypy
        try:
            return handler(data)
        except ValidationError as e:
            raise settings_error(cls, e) from None

    @classmethod
    def env_name(cls, field: str) -> str:
        """The environment variable a field is read from."""
        alias = cls.model_fields[field].validation_alias
        return alias if isinstance(alias, str) else f"{ENV_PREFIX}{field}".upper()


class TelemetrySettings(BaseModel):
    """Traces, metrics and logs, the same for every process kind (mixed into a settings class)."""

    tracing: Literal["off", "console"] = Field("off", description="span export to the terminal: off or console")
    log_format: Literal["text", "json"] = Field("text", description="log lines as text or JSON")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus /metrics port (0 = any free)")
    metrics_host: str = Field("127.0.0.1", description="address the /metrics endpoint listens on")

    @field_validator("tracing", "log_format", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class TenantBudget(BaseModel):
    """What one tenant's runs may spend on model calls together over a sliding window (the planner
    ends a run that finds the tenant over it)."""

    model_config = ConfigDict(extra="forbid")

    max_cost_usd: float | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=0)
    window_s: int = Field(86_400, gt=0, description="the window, in seconds (a day)")


class ServiceSettings(_Settings, TlsSettings, DataKeySettings, TelemetrySettings):  # TLS, data keys, telemetry
    """Settings of a service process (planner, policy, approval, dispatcher, auditor)."""

    nats_url: str = Field(default_factory=resolve_url, description="server URL(s), comma-separated")
    creds: Path | None = Field(None, description="NATS credentials (.creds) file")
    provision: bool = Field(False, description="create or update streams and buckets at start (needs admin creds)")
    signing: Literal["on", "off"] = Field("on", description="sign appended commits and refuse unsigned ones")
    replicas: int = Field(1, ge=1, le=5, description="replicas of each stream (a JetStream limit of 5)")
    inline_limit: int = Field(DEFAULT_INLINE_LIMIT, ge=0, description="largest payload kept inline, in bytes")
    instance: str = Field(default_factory=_default_instance, description="this copy's name in logs")
    concurrency: int = Field(64, ge=1, description="messages handled at once per consumer")
    sweep_interval: float = Field(15.0, ge=0, validation_alias="INTERLOCK_SWEEP_S",
                                  description="seconds between reconciler passes, 0 = off")
    lane_hold_ms: float = Field(50.0, ge=0, le=1000, validation_alias="INTERLOCK_LANE_HOLD_MS",
                                description="how long a fast-lane commit seen anywhere holds this service's "
                                            "slow-lane work, in ms (0 = only its own fast work holds it)")
    tenant_budgets: dict[str, TenantBudget] = Field(
        default_factory=dict,
        description='per-tenant model budgets, JSON: {"acme": {"max_cost_usd": 50, "window_s": 86400}}')
    gate_limits: GateLimits = Field(
        default_factory=GateLimits,
        description='workload limits the dispatcher applies, JSON: {"topics": {"llm": {"concurrency": 4}}, '
                    '"tenants": {"acme": {"weight": 2}}, "max_in_flight": 1000} (see interlock.core.workload)')


class WorkerSettings(_Settings, TlsSettings, DataKeySettings, TelemetrySettings):  # TLS, data keys, telemetry
    """Settings of an agent worker process (the worker SDK); :class:`Worker` arguments override them."""

    nats_url: str = Field(default_factory=resolve_url, description="server URL(s), comma-separated")
    creds: Path | None = Field(None, description="NATS credentials (.creds) file")
    concurrency: int = Field(8, ge=1, validation_alias="INTERLOCK_WORKER_CONCURRENCY",
                             description="jobs handled at once per topic")
    inline_limit: int = Field(DEFAULT_INLINE_LIMIT, ge=0, description="largest payload kept inline, in bytes")
    tenant: str = Field(DEFAULT_TENANT, description="the tenant whose jobs the worker takes")


_PROBLEMS = {
    "int_parsing": "is not a whole number",
    "int_from_float": "is not a whole number",
    "int_type": "is not a whole number",
    "float_parsing": "is not a number",
    "float_type": "is not a number",
    "bool_parsing": "is not true or false (use 1/0, true/false, yes/no or on/off)",
    "bool_type": "is not true or false (use 1/0, true/false, yes/no or on/off)",
    "finite_number": "is not a finite number",
    "extra_forbidden": "is not a setting",
}
_BOUNDS = {"greater_than_equal": ("ge", "at least"), "greater_than": ("gt", "more than"),
           "less_than_equal": ("le", "at most"), "less_than": ("lt", "less than")}


def _problem(error: ErrorDetails) -> str:
    kind = error["type"]
    if kind == "literal_error":
        return f"is not one of {error.get('ctx', {}).get('expected')}"
    if kind in _PROBLEMS:
        return _PROBLEMS[kind]
    if kind in _BOUNDS:
        key, words = _BOUNDS[kind]
        bound = error.get("ctx", {}).get(key)
        return f"must be {words} {bound:g}" if isinstance(bound, int | float) else f"must be {words} {bound}"
    message = error["msg"]
    return message[:1].lower() + message[1:]


def settings_error(cls: type[_Settings], error: ValidationError) -> SettingsError:
    """``error`` as one line per bad value, each naming where the value came from: the environment
    variable when it holds that value, else the keyword argument (``ServiceSettings(replicas=…)``)."""
    lines = []
    for detail in error.errors():
        loc = str(detail["loc"][0]) if detail["loc"] else ""
        field = next((name for name in cls.model_fields if loc in (name, cls.model_fields[name].validation_alias)),
                     loc)
        value = detail.get("input")
        where = f"{cls.__name__}({field}=…)"
        if field in cls.model_fields:
            env = cls.env_name(field)
            from_env = next((v for k, v in os.environ.items() if k.upper() == env), None)
            if from_env is not None and from_env == value:
                where = env
        lines.append(f"{where}: {value!r} {_problem(detail)}")
    return SettingsError("; ".join(lines))


__all__ = ["ENV_PREFIX", "ServiceSettings", "SettingsError", "WorkerSettings", "settings_error"]
