"""A workflow's ``schedule:``: the planner starts a run of it at every tick, by itself.

```yaml
schedule:
  cron: "*/5 * * * *"        # minute hour day-of-month month day-of-week (5 fields), or
  every: 10m                 # a fixed interval: 30s, 10m, 1h30m, 1d (ticks counted from 1970-01-01T00:00Z)
  timezone: Europe/Berlin    # an IANA time zone for cron (default UTC)
  missed: skip               # or catch_up_once: what happens to ticks missed while no planner ran
  tenant: default            # the tenant whose runs it starts
  input: {report: daily}     # the run's input; the tick is added under `schedule`
```

Cron expressions are parsed by ``cronsim`` (daylight saving time as Debian cron handles it: a job
in the hour that is skipped runs once right after it, a job in the hour that repeats runs once).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from functools import cache
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from cronsim import CronSim, CronSimError
from pydantic import AfterValidator, BaseModel, ConfigDict, Strict, field_validator, model_validator

from interlock.contracts.messages import DEFAULT_TENANT

from ._checks import did_you_mean

_DURATION = re.compile(r"^(?:(?P<d>\d+)d)?(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+)s)?$")
_UNIT_S = {"d": 86_400, "h": 3_600, "m": 60, "s": 1}
_TENANT = re.compile(r"^[A-Za-z0-9_-]+$")
MAX_EVERY_S = 366 * 86_400
RESERVED_INPUT_KEY = "schedule"
"""The key of a scheduled run's input that says which tick it is."""


class Missed(StrEnum):
    """What happens to ticks that came due while no planner ran (or the server was down)."""

    SKIP = "skip"
    """Missed ticks start no run; the schedule goes on with the next tick to come (the default)."""
    CATCH_UP_ONCE = "catch_up_once"
    """One run starts for the latest missed tick (its input counts the others), then the schedule goes on."""


def every_seconds(text: str) -> int:
    """``"1h30m"`` -> 5400. Raises ValueError naming the accepted forms."""
    match = _DURATION.match(text.strip()) if text.strip() else None
    if match is None:
        raise ValueError(f"invalid interval {text!r}: a whole number of d, h, m and s, in that order, "
                         "e.g. 30s, 10m, 1h30m or 1d")
    seconds = sum(int(v) * _UNIT_S[unit] for unit, v in match.groupdict().items() if v)
    if seconds < 1:
        raise ValueError(f"invalid interval {text!r}: it must be at least 1s")
    if seconds > MAX_EVERY_S:
        raise ValueError(f"invalid interval {text!r}: at most 366d (use cron for rarer schedules)")
    return seconds


def _every(value: str) -> str:
    every_seconds(value)
    return value.strip()


def _cron(value: str) -> str:
    fields = value.split()
    if len(fields) != 5:
        raise ValueError(f"invalid cron expression {value!r}: it has {len(fields)} field(s), cron needs 5 "
                         "(minute hour day-of-month month day-of-week), e.g. \"*/5 * * * *\"")
    expression = " ".join(fields)
    try:
        CronSim(expression, datetime(2000, 1, 1, tzinfo=UTC))
    except CronSimError as e:
        raise ValueError(f"invalid cron expression {value!r}: {str(e).lower()}") from None
    return expression


@cache
def _zones() -> tuple[str, ...]:
    return tuple(sorted(available_timezones()))


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; ValueError (with a suggestion) when there is none."""
    try:
        if name.strip() != name or not name or name.startswith(("/", ".")) or ".." in name:
            raise ValueError
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}{did_you_mean(name, _zones())}; use an IANA name such as "
                         "UTC, Europe/Berlin or America/New_York") from None


def _timezone(value: str) -> str:
    zone(value)
    return value


def _tenant(value: str) -> str:
    if not _TENANT.match(value):
        raise ValueError(f"invalid tenant {value!r}: letters, digits, '_' and '-'")
    return value


class Schedule(BaseModel):
    """When the planner starts runs of a workflow: ``cron`` (in ``timezone``) or ``every``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cron: Annotated[str, Strict(), AfterValidator(_cron)] | None = None
    every: Annotated[str, Strict(), AfterValidator(_every)] | None = None
    timezone: Annotated[str, Strict(), AfterValidator(_timezone)] = "UTC"
    missed: Missed = Missed.SKIP
    tenant: Annotated[str, Strict(), AfterValidator(_tenant)] = DEFAULT_TENANT
    input: dict[str, Any] | None = None

    @field_validator("input")
    @classmethod
    def _tick_key_free(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and RESERVED_INPUT_KEY in value:
            raise ValueError(f"'{RESERVED_INPUT_KEY}' is reserved: a scheduled run's input names its tick there")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> Schedule:
        if (self.cron is None) == (self.every is None):
            raise ValueError("give exactly one of 'cron' (e.g. \"*/5 * * * *\") and 'every' (e.g. 10m)")
        if self.every is not None and "timezone" in self.model_fields_set and self.timezone != "UTC":
            raise ValueError("'timezone' applies to 'cron' only: 'every' ticks are counted from "
                             "1970-01-01T00:00Z, whatever the time zone")
        return self

    @property
    def expression(self) -> str:
        """``cron */5 * * * * (Europe/Berlin)`` or ``every 10m``: how the schedule reads in a listing."""
        return f"cron {self.cron} ({self.timezone})" if self.cron is not None else f"every {self.every}"
