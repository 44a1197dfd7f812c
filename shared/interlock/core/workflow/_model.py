"""Pydantic models for workflow definitions."""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import re
from collections.abc import Mapping
from enum import StrEnum
from functools import cached_property
from typing import Annotated, Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from ._checks import STEP_TYPES, did_you_mean, semantic_issues, transitive
from ._guard import Guard, json_schema
from ._problems import Issue, Path, WorkflowInvalid, to_problems
from ._schedule import Schedule
from ._templates import checked_template

_WORKFLOW_ID = re.compile(r"^[a-z0-9_-]+$")
_STEP_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_TOPIC = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_SUBJECT_TOKEN = re.compile(r"^[^\s.*>]+$")
# A digit first, then what semver and calendar versions use; words like "one" are typos.
# a version holds a digit (1, 2024.1, 1.0.0, a content hash): a word such as "one" is a mistake
_VERSION = re.compile(r"^(?=[^0-9]*[0-9])[0-9A-Za-z.+_-]+$")


def _workflow_id(value: str) -> str:
    if not _WORKFLOW_ID.match(value):
        raise ValueError(f"invalid workflow id {value!r}: use lowercase letters, digits, '_' and '-'")
    return value


def _step_id(value: str) -> str:
    if not _STEP_ID.match(value):
        raise ValueError(f"invalid step id {value!r}: start with a letter, then letters, digits, '_' or '-' (no dots)")
    return value


def _topic(value: str) -> str:
    if not _TOPIC.match(value):
        raise ValueError(
            f"invalid topic {value!r}: dot-separated tokens of letters, digits, '_' or '-' (no spaces or wildcards)"
        )
    return value


def _subject(value: str) -> str:
    """A NATS subject to subscribe to: wildcards allowed (``*`` a token, ``>`` the last one)."""
    tokens = value.split(".")
    for i, token in enumerate(tokens):
        if token == "*" or (token == ">" and i == len(tokens) - 1) or _SUBJECT_TOKEN.match(token):
            continue
        raise ValueError(f"invalid NATS subject {value!r}")
    return value


def _version(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("version must be a string or an integer")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # YAML turns 1.10 into 1.1; refuse rather than silently change the version.
        raise ValueError(f"version was read as the number {value!r}; quote it to keep it as written")
    if isinstance(value, str) and not value.strip():
        raise ValueError("version must not be empty")
    if isinstance(value, str) and not _VERSION.match(value):
        raise ValueError(f"invalid version {value!r}: letters, digits and . + _ - with at least one digit, "
                         "e.g. 1, 2024.1 or 1.0.0")
    return value


def _json_like(value: Any, path: str = "") -> Any:
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{path or 'value'}: {value} is not allowed in JSON")
        return value
    if isinstance(value, list):
        for i, item in enumerate(value):
            _json_like(item, f"{path}[{i}]")
        return value
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{path or 'value'}: key {key!r} must be a string (quote it)")
            _json_like(item, f"{path}.{key}" if path else key)
        return value
    raise ValueError(f"{path or 'value'}: {type(value).__name__} is not JSON-like (quote it in YAML)")


def _json_like_schedule(value: Schedule | None) -> Schedule | None:
    if value is not None and value.input is not None:
        _json_like(value.input, "input")
    return value


def _none_to_empty(value: Any) -> Any:
    return () if value is None else value


def _one_or_many(value: Any) -> Any:
    if value is None:
        return ()
    return [value] if isinstance(value, str) else value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_DURATION_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}


def _duration_ms(value: Any) -> Any:
    """``"60s"``, ``"500ms"``, ``"5m"``, ``"1h"`` (or a whole number of milliseconds) -> milliseconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as '30s', got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return int(float(match.group(1)) * _DURATION_UNITS_MS[match.group(2)])
    raise ValueError(f"invalid duration {value!r}: write a number and a unit (ms, s, m, h), e.g. '30s'")


def _version_range(value: str) -> str:
    try:
        SpecifierSet(value)
    except InvalidSpecifier as e:
        raise ValueError(f"invalid agent version range {value!r}: {e} (write e.g. '>=2,<3')") from None
    if not value.strip():
        raise ValueError("an empty agent version range matches every version: leave agent_version out instead")
    return value


StepId = Annotated[str, Strict(), AfterValidator(_step_id)]
DurationMs = Annotated[int, BeforeValidator(_duration_ms), Field(gt=0)]
VersionRange = Annotated[str, Strict(), AfterValidator(_version_range)]
Topic = Annotated[str, Strict(), AfterValidator(_topic)]
Subject = Annotated[str, Strict(), AfterValidator(_subject)]
PositiveMs = Annotated[int, Strict(), Field(gt=0)]
Text = Annotated[str, Strict()]
JsonSchema = Annotated[dict[str, Any], AfterValidator(json_schema)]


class StepType(StrEnum):
    JOB = "job"
    APPROVAL = "approval"
    NOTIFY = "notify"
    GUARDRAIL = "guardrail"  # checks the output of the step it depends on (its input)


class OnError(StrEnum):
    FAIL = "fail"
    CONTINUE = "continue"
    COMPENSATE = "compensate"


# _checks keeps its own copy of the names to avoid an import cycle.
assert tuple(StepType) == STEP_TYPES

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class RetryPolicy(BaseModel):
    """How often and how patiently a failed job is retried. ``retries: 3`` means 3 attempts."""

    model_config = _FROZEN

    max_attempts: Annotated[int, Strict(), Field(ge=1)] = 1
    backoff_ms: Annotated[int, Strict(), Field(ge=0)] = 1000
    max_backoff_ms: Annotated[int, Strict(), Field(ge=0)] = 60_000
    multiplier: Annotated[float, Strict(), Field(ge=1.0, allow_inf_nan=False)] = 2.0
    jitter: Annotated[float, Strict(), Field(ge=0.0, le=1.0)] = 0.2

    @model_validator(mode="before")
    @classmethod
    def _bare_int(cls, data: Any) -> Any:
        if isinstance(data, int) and not isinstance(data, bool):
            return {"max_attempts": data}
        return data

    @model_validator(mode="after")
    def _cap_covers_base(self) -> RetryPolicy:
        if self.backoff_ms > self.max_backoff_ms:
            raise ValueError(f"backoff_ms ({self.backoff_ms}) must not exceed max_backoff_ms ({self.max_backoff_ms})")
        return self

    def delay_ms(self, attempt: int, rand: float) -> int:
        """Delay before retry number ``attempt`` (1 = first retry).

        ``base = min(backoff_ms * multiplier**(attempt-1), max_backoff_ms)``, then jitter scales it
        by a factor in ``[1 - jitter, 1 + jitter)`` chosen by ``rand`` in ``[0, 1)``; the result
        is capped at ``max_backoff_ms`` again and truncated to an int.
        """
        if attempt < 1:
            raise ValueError(f"attempt must be >= 1, got {attempt}")
        if not 0.0 <= rand < 1.0:
            raise ValueError(f"rand must be in [0, 1), got {rand}")
        try:
            base = min(self.backoff_ms * self.multiplier ** (attempt - 1), float(self.max_backoff_ms))
        except OverflowError:  # huge attempt numbers: the cap applies anyway
            base = float(self.max_backoff_ms)
        jittered = base * (1.0 - self.jitter + 2.0 * self.jitter * rand)
        return int(min(jittered, self.max_backoff_ms))


class WhenOpen(StrEnum):
    WAIT = "wait"
    FAIL = "fail"


class BreakerSpec(BaseModel):
    """A circuit breaker around a job step's topic (shared per tenant and topic by every step that
    declares one): it opens after ``failures`` consecutive failures or timeouts, or when at least
    ``min_calls`` outcomes inside ``window`` fail at ``rate`` or more; while open, jobs wait (or
    fail, ``when_open: fail``); after ``cooldown`` one probe job goes, and its outcome closes the
    breaker or opens it again."""

    model_config = _FROZEN

    failures: Annotated[int, Strict(), Field(ge=1)] | None = 5
    rate: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    window: DurationMs = 60_000
    min_calls: Annotated[int, Strict(), Field(ge=1)] = 10
    cooldown: DurationMs = 30_000
    when_open: WhenOpen = WhenOpen.WAIT
    probe_timeout: DurationMs = 120_000

    @model_validator(mode="after")
    def _opens_somehow(self) -> BreakerSpec:
        if self.failures is None and self.rate is None:
            raise ValueError("a breaker needs 'failures' or 'rate' (else it never opens)")
        return self


class Budget(BaseModel):
    """What a whole run may spend on model calls; crossing a limit ends the run (BudgetExceeded)."""

    model_config = _FROZEN

    max_cost_usd: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None
    max_tokens: Annotated[int, Strict(), Field(ge=0)] | None = None


class Sla(BaseModel):
    """How long a run and its steps should take; a breach raises an alert (the run goes on)."""

    model_config = _FROZEN

    run_ms: PositiveMs | None = None
    steps: dict[Text, PositiveMs] = Field(default_factory=dict)


MAX_CACHE_TTL_MS = 30 * 24 * 3600 * 1000  # the result cache bucket keeps nothing longer
_DURATION = re.compile(r"^\s*([0-9]+)\s*(ms|s|m|h|d)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def duration_ms(value: Any) -> int:
    """``1h``, ``30m``, ``45s``, ``500ms``, ``7d`` (or a whole number of seconds) in milliseconds.
    A five-unit grammar: a library (pytimeparse, isodate) would accept far more than we document."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value * 1000
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"invalid duration {value!r}: write a number and a unit (ms, s, m, h, d), e.g. 1h or 30m")
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


def _cache_ttl(value: Any) -> int:
    ms = duration_ms(value)
    if not 1000 <= ms <= MAX_CACHE_TTL_MS:
        raise ValueError(f"ttl {value!r} must be between 1s and 30d")
    return ms


class Cache(BaseModel):
    """``cache:`` on a job step: reuse the output of an earlier successful job of this tenant with
    the same rendered ``key`` and job hash, for ``ttl`` after it succeeded (issue 17)."""

    model_config = _FROZEN

    key: Text = Field(description="A template (``{{ input.customer }}``) rendered like the step's input")
    ttl_ms: Annotated[int, BeforeValidator(_cache_ttl)] = Field(alias="ttl")


class Concurrency(BaseModel):
    """At most ``limit`` jobs in flight at once. With ``key`` (a template such as
    ``"customer-{{ input.customer }}"``) the limit is per rendered value, shared by every
    workflow whose key renders the same; without, per workflow (or per step, on a step)."""

    model_config = _FROZEN

    limit: Annotated[int, Strict(), Field(ge=1)]
    key: Annotated[str, Strict(), AfterValidator(checked_template)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_int(cls, data: Any) -> Any:
        if isinstance(data, int) and not isinstance(data, bool):
            return {"limit": data}
        return data


class Rate(BaseModel):
    """At most ``per_s`` jobs a second on average, ``burst`` at once (a token bucket). With ``key``
    (a template), per rendered value, shared across workflows; without, per step."""

    model_config = _FROZEN

    per_s: Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
    burst: Annotated[int, Strict(), Field(ge=1)] = 1
    key: Annotated[str, Strict(), AfterValidator(checked_template)] | None = None


Priority = Annotated[int, Strict(), Field(ge=1, le=5)]
"""A run priority: 1 (lowest) to 5 (highest)."""


class Step(BaseModel):
    """One step. Field types are checked here; rules across fields are checked by Workflow."""

    model_config = _FROZEN

    type: StepType = StepType.JOB
    topic: Topic | None = None
    depends_on: Annotated[tuple[Text, ...], BeforeValidator(_one_or_many)] = ()
    input: Annotated[Any, AfterValidator(_json_like)] = None
    when: Text | None = None
    retries: RetryPolicy = RetryPolicy()
    timeout_ms: PositiveMs | None = None
    heartbeat_timeout_ms: PositiveMs | None = None
    for_each: Text | None = None
    max_parallel: Annotated[int, Strict(), Field(ge=1)] | None = None
    on_error: OnError = OnError.FAIL
    compensate: Topic | None = None
    require_approval: Annotated[bool, Strict()] = False
    input_schema: JsonSchema | None = None
    output_schema: JsonSchema | None = None
    labels: dict[Text, Text] = Field(default_factory=dict)
    cache: Cache | None = None  # job steps: the result cache (added later: not hashed while unset)
    # checks on a job's output, or what a guardrail step checks (left out of the hash while unset)
    guard: Annotated[Guard | None, Field(exclude_if=lambda v: v is None)] = None
    # workload control (issue 16): left out of the content hash while unset
    breaker: BreakerSpec | None = None
    agent_version: VersionRange | None = None
    concurrency: Concurrency | None = None  # workload limits (see interlock.dispatcher.gate)
    rate: Rate | None = None
    # approval steps
    approvers: Text = "approver"
    prompt: Text | None = None
    expires_ms: PositiveMs | None = None
    # notify steps
    channel: Text = "default"
    message: Text | None = None

    @model_validator(mode="before")
    @classmethod
    def _guardrail_input(cls, data: Any) -> Any:
        # a guardrail step checks its one dependency's output unless it says what to check
        if isinstance(data, Mapping) and data.get("type") == "guardrail" and data.get("input") is None:
            deps = data.get("depends_on")
            dep = deps if isinstance(deps, str) else deps[0] if isinstance(deps, list) and len(deps) == 1 else None
            if isinstance(dep, str):
                return {**data, "input": f"{{{{ steps.{dep}.output }}}}"}
        return data

    @field_validator("when", mode="before")
    @classmethod
    def _bool_condition(cls, value: Any) -> Any:
        # `when: false` in YAML is a bool; it is still a perfectly good condition.
        return str(value).lower() if isinstance(value, bool) else value


# not in the content hash while at their default
_ADDED_LATER = ("sensitive", "budget", "record_prompts", "sla", "schedule", "priority", "concurrency")
_STEP_ADDED_LATER = ("cache", "breaker", "agent_version", "concurrency", "rate")  # step fields likewise


class Workflow(BaseModel):
    """A validated workflow definition. Construct with ``parse_workflow``/``load_workflow``."""

    model_config = _FROZEN

    id: Annotated[str, Strict(), AfterValidator(_workflow_id)]
    name: Text
    version: Annotated[Text, BeforeValidator(_version)]
    description: Text | None = None
    triggers: Annotated[tuple[Subject, ...], BeforeValidator(_none_to_empty)] = ()
    schedule: Annotated[Schedule, AfterValidator(_json_like_schedule)] | None = None
    """Start a run at every tick (cron in a time zone, or every N): see ``_schedule``."""
    steps: dict[StepId, Step]
    timeout_ms: PositiveMs | None = None
    sensitive: Annotated[tuple[Text, ...], BeforeValidator(_none_to_empty)] = ()
    """Paths of sensitive values (``input.credentials.api_key``, ``steps.fetch.output.token``),
    sealed wherever they are stored (besides the keys the sensitive key patterns name)."""
    budget: Budget | None = None
    sla: Sla | None = None
    record_prompts: Annotated[bool, Strict()] = False  # let agents keep prompts in the log (LlmCall.prompt)
    priority: Priority | None = None  # the default priority of its runs (3 when unset)
    concurrency: Concurrency | None = None  # jobs of all its runs in flight at once

    @model_validator(mode="wrap")
    @classmethod
    def _validate_everything(cls, data: Any, handler: ModelWrapValidatorHandler[Workflow],
                             info: ValidationInfo) -> Workflow:
        # Collect pydantic's errors *and* the cross-field problems, so that one run reports all.
        if isinstance(data, Workflow):
            return data
        lines = (info.context or {}).get("lines")
        if not isinstance(data, Mapping):
            raise WorkflowInvalid(to_problems([Issue((), f"a workflow must be a mapping, not {_kind(data)}")], lines))
        if "name" not in data:
            # A bad or missing id is reported on its own; don't add "missing name" to it.
            data = {**data, "name": data["id"] if isinstance(data.get("id"), str) else ""}
        issues = semantic_issues(data)
        try:
            workflow: Workflow = handler(data)
        except ValidationError as exc:
            structural = [_translate(err) for err in exc.errors()]
            raise WorkflowInvalid(to_problems(structural + issues, lines)) from None
        if issues:
            raise WorkflowInvalid(to_problems(issues, lines))
        return workflow

    @cached_property
    def content_hash(self) -> str:
        """sha256 of the canonical JSON of the parsed definition (defaults filled in)."""
        # fields added later are left out while unset: definitions written before them keep their hash
        unset = {name for name in _ADDED_LATER if getattr(self, name) == type(self).model_fields[name].default}
        dumped = self.model_dump(mode="json", exclude=unset or None, by_alias=True)
        for sid, step in self.steps.items():
            for name in _STEP_ADDED_LATER:
                if getattr(step, name) is None:
                    dumped["steps"][sid].pop(name, None)
        files = self.rule_files
        if files:  # the rule files shipped with the version are part of it
            dumped["rule_files"] = files
        canonical = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @cached_property
    def rule_files(self) -> dict[str, str]:
        """The guard rule files this version ships (path -> sha256 of the text)."""
        return {path: digest for step in self.steps.values() if step.guard is not None
                for path, digest in step.guard.file_hashes.items()}

    @cached_property
    def _dependents(self) -> dict[str, tuple[str, ...]]:
        out: dict[str, list[str]] = {sid: [] for sid in self.steps}
        for sid, step in self.steps.items():
            for dep in step.depends_on:
                out[dep].append(sid)
        return {sid: tuple(v) for sid, v in out.items()}

    def topological_order(self) -> list[str]:
        """Step ids, dependencies first; among ready steps the earliest-defined comes first."""
        position = {sid: i for i, sid in enumerate(self.steps)}
        waiting = {sid: len(step.depends_on) for sid, step in self.steps.items()}
        ready = [position[sid] for sid, n in waiting.items() if n == 0]
        heapq.heapify(ready)
        ids = list(self.steps)
        order: list[str] = []
        while ready:
            sid = ids[heapq.heappop(ready)]
            order.append(sid)
            for child in self._dependents[sid]:
                waiting[child] -= 1
                if waiting[child] == 0:
                    heapq.heappush(ready, position[child])
        return order

    def upstream(self, step_id: str) -> frozenset[str]:
        """All steps ``step_id`` depends on, directly or transitively."""
        self._require(step_id)
        return frozenset(transitive({s: st.depends_on for s, st in self.steps.items()}, step_id))

    def downstream(self, step_id: str) -> frozenset[str]:
        """All steps that depend on ``step_id``, directly or transitively."""
        self._require(step_id)
        return frozenset(transitive(self._dependents, step_id))

    def sensitive_paths(self, root: str) -> frozenset[str]:
        """The ``sensitive`` paths at or under ``root`` (``input``, ``steps.ID.output``)."""
        return frozenset(p for p in self.sensitive if p == root or p.startswith(root + "."))

    def sensitive_output_paths(self, step_id: str) -> tuple[str, ...]:
        """The ``sensitive`` paths of a step's output, relative to it (``output.token``), for its jobs."""
        root = f"steps.{step_id}."
        return tuple(sorted(p.removeprefix(root) for p in self.sensitive if p.startswith(root)))

    def _require(self, step_id: str) -> None:
        if step_id not in self.steps:
            raise KeyError(f"unknown step {step_id!r}")


# --- pydantic error translation --------------------------------------------------------------

_FIELDS: dict[str, tuple[str, ...]] = {
    "workflow": tuple(Workflow.model_fields),
    "step": tuple(Step.model_fields),
    "retries": tuple(RetryPolicy.model_fields),
    "cache": ("key", "ttl"),
    "schedule": tuple(Schedule.model_fields),
    "guard": ("schema", *(f for f in Guard.model_fields if f != "schema_")),
    "breaker": tuple(BreakerSpec.model_fields),
    "concurrency": tuple(Concurrency.model_fields),
    "rate": tuple(Rate.model_fields),
}

_YAML_BOOL_HINT = " (YAML reads yes/no/on/off/true/false as booleans; quote it)"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _fields_at(parent: Path) -> tuple[str, ...]:
    if len(parent) == 0:
        return _FIELDS["workflow"]
    if len(parent) == 2 and parent[0] == "steps":
        return _FIELDS["step"]
    nested = ("retries", "cache", "guard", "breaker", "concurrency", "rate")
    if len(parent) == 3 and parent[0] == "steps" and parent[2] in nested:
        return _FIELDS[str(parent[2])]
    if parent in (("schedule",), ("concurrency",)):
        return _FIELDS[str(parent[0])]
    return ()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _translate(err: ErrorDetails) -> Issue:
    loc: Path = tuple(err["loc"])
    kind, value = err["type"], err.get("input")
    message = err["msg"]
    if loc and loc[-1] == "[key]":
        # pydantic reports a True key as 1; the input is the key as YAML produced it.
        loc = (*loc[:-2], value)
        if kind == "value_error":
            return Issue(loc, message.removeprefix("Value error, "))
        if kind == "string_type":
            hint = _YAML_BOOL_HINT if isinstance(value, bool) else ""
            return Issue(loc, f"key must be a string, got {_short(value)}{hint}")
        return Issue(loc, f"invalid key {_short(value)}: {_lower(message)}")
    if kind == "missing":
        return Issue(loc[:-1], f"missing required field '{loc[-1]}'")
    if kind == "extra_forbidden":
        field = str(loc[-1])
        return Issue(loc[:-1], f"unknown field {field!r}{did_you_mean(field, _fields_at(loc[:-1]))}", loc)
    if kind == "enum":
        expected = err.get("ctx", {}).get("expected", "")
        what = "step type" if loc[-1:] == ("type",) else "value"
        return Issue(loc, f"unknown {what} {_short(value)}; allowed: {expected.replace(' or ', ', ')}")
    if kind in ("value_error", "assertion_error"):
        return Issue(loc, message.removeprefix("Value error, ").removeprefix("Assertion failed, "))
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return Issue(loc, f"expected a mapping, got {_kind(value)}")
    if kind in ("list_type", "tuple_type"):
        return Issue(loc, f"expected a list, got {_kind(value)}")
    hint = _YAML_BOOL_HINT if isinstance(value, bool) and kind == "string_type" else ""
    return Issue(loc, f"{_lower(message)} (got {_short(value)}){hint}")


def _lower(message: str) -> str:
    return message.removeprefix("Input ")
