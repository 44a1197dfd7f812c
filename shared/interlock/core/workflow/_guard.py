"""The ``guard:`` block of a step: which checks run on its output and what a violation does.

Content rules may live in rule files shipped with the workflow version (``deny_file``,
``allow_file``, paths relative to the workflow file). The loader passes their text in the
validation context (``files``); each file is parsed and its regexes compiled here, so a bad
pattern is an error at ``steps.S.guard.content.deny_file`` before the version is registered,
and the file's sha256 goes into the workflow's content hash (a changed rule file needs a new
version).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    ValidationInfo,
    field_validator,
    model_validator,
)

Text = Annotated[str, Strict()]
_FROZEN = ConfigDict(frozen=True, extra="forbid")
_RULE_ID = re.compile(r"^[A-Za-z0-9_.:-]+$")
MAX_PATTERN_CHARS = 1000  # a rule is a short regex; longer ones are refused (and slow)


class OnViolation(StrEnum):
    FAIL = "fail"
    APPROVE = "approve"
    REDACT = "redact"


PII_KINDS = ("email", "iban", "credit_card")


@dataclass(frozen=True)
class Rule:
    """One compiled content rule: its id names it in findings (never the text it matched)."""

    id: str
    pattern: re.Pattern[str]


def json_schema(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """``value`` if it is a valid JSON Schema (2020-12); else ValueError naming where it is wrong."""
    if value is None:
        return None
    try:
        Draft202012Validator.check_schema(value)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise ValueError(f"invalid JSON Schema{f' at {where}' if where else ''}: {exc.message}") from None
    return value


def _as_list(value: Any) -> Any:
    if value is None:
        return ()
    return [value] if isinstance(value, str) else value


def compile_rules(raw: Any, where: str, *, words: bool = False, prefix: str | None = None) -> tuple[Rule, ...]:
    """Rules from a list of regexes (or words) or ``{id, regex}`` / ``{id, word}`` mappings; an
    entry without an id is named ``{prefix}{index}`` (default prefix: ``where``). Raises
    ValueError naming the entry (``where[2]``)."""
    prefix = where if prefix is None else prefix
    if not isinstance(raw, list | tuple):
        raise ValueError(f"{where}: expected a list, got {type(raw).__name__}")
    rules: list[Rule] = []
    for i, entry in enumerate(raw):
        at = f"{where}[{i}]"
        key = "word" if words else "regex"
        if isinstance(entry, str):
            rule_id, source = f"{prefix}{i}", entry
        elif isinstance(entry, Mapping) and isinstance(entry.get(key), str) and set(entry) <= {"id", key}:
            rule_id, source = str(entry.get("id") or f"{prefix}{i}"), entry[key]
        else:
            raise ValueError(f"{at}: expected a string or a mapping {{id: NAME, {key}: …}}")
        if not _RULE_ID.match(rule_id):
            raise ValueError(f"{at}: invalid rule id {rule_id!r}: letters, digits, '_', '-', '.' and ':'")
        if not source.strip():
            raise ValueError(f"{at}: empty {key}")
        if len(source) > MAX_PATTERN_CHARS:
            raise ValueError(f"{at}: the {key} is longer than {MAX_PATTERN_CHARS} characters")
        if words:  # a whole word or phrase, any case
            source = r"(?i)(?<!\w)" + re.escape(source) + r"(?!\w)"
        try:
            pattern = re.compile(source)
        except re.error as e:
            raise ValueError(f"{at}: invalid regex {source!r}: {e}") from None
        if pattern.search(""):
            raise ValueError(f"{at}: the {key} {source!r} matches the empty string (it would match everything)")
        rules.append(Rule(rule_id, pattern))
    return tuple(rules)


def parse_rules_file(text: str, name: str) -> tuple[Rule, ...]:
    """A rules file: YAML ``{patterns: [regex | {id, regex}], words: [word | {id, word}]}``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"rules file {name!r} is not valid YAML: {e}") from None
    if not isinstance(data, Mapping) or not set(data) <= {"version", "patterns", "words"} or not data:
        raise ValueError(f"rules file {name!r} must be a mapping with 'patterns' and/or 'words' (and 'version')")
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return (compile_rules(data.get("patterns") or [], f"{name}: patterns", prefix=f"{stem}:patterns")
            + compile_rules(data.get("words") or [], f"{name}: words", words=True, prefix=f"{stem}:words"))


def safe_relative(path: str) -> str | None:
    """``path`` normalised, if it stays inside the workflow's folder (else None)."""
    if not path or path.startswith(("/", "\\")) or "\\" in path or ":" in path:
        return None
    norm = posixpath.normpath(path)
    return None if norm == ".." or norm.startswith("../") or norm == "." else norm


class ContentRules(BaseModel):
    """Deny rules (a match is a violation) and allow rules (a match found by any check whose text
    an allow rule matches is let through), inline or in rule files."""

    model_config = _FROZEN

    deny: Annotated[tuple[Text, ...], BeforeValidator(_as_list)] = ()
    deny_words: Annotated[tuple[Text, ...], BeforeValidator(_as_list)] = ()
    allow: Annotated[tuple[Text, ...], BeforeValidator(_as_list)] = ()
    deny_file: Text | None = None
    allow_file: Text | None = None

    _deny: tuple[Rule, ...] = PrivateAttr(default=())
    _allow: tuple[Rule, ...] = PrivateAttr(default=())
    _files: dict[str, str] = PrivateAttr(default_factory=dict)  # path -> sha256 of its text

    @field_validator("deny", "allow")
    @classmethod
    def _regexes(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        compile_rules(list(value), str(info.field_name))
        return value

    @field_validator("deny_words")
    @classmethod
    def _words(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        compile_rules(list(value), "deny_words", words=True)
        return value

    @field_validator("deny_file", "allow_file")
    @classmethod
    def _file(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        norm = safe_relative(value)
        if norm is None:
            raise ValueError(f"rules file {value!r} must be a relative path inside the workflow's folder")
        files: Mapping[str, str] | None = (info.context or {}).get("files")
        if files is None or norm not in files:
            raise ValueError(f"rules file {value!r} was not shipped with the workflow (apply the workflow "
                             "from its file, `interlock workflows apply FILE`, which sends the files it names)")
        parse_rules_file(files[norm], value)  # errors name the file and the entry
        return norm

    @model_validator(mode="after")
    def _compile(self, info: ValidationInfo) -> ContentRules:
        files: Mapping[str, str] = (info.context or {}).get("files") or {}
        deny = compile_rules(list(self.deny), "deny") + compile_rules(list(self.deny_words), "deny_words", words=True)
        allow = compile_rules(list(self.allow), "allow")
        for name, bucket in ((self.deny_file, "deny"), (self.allow_file, "allow")):
            if name is None:
                continue
            text = files[name]
            self._files[name] = hashlib.sha256(text.encode()).hexdigest()
            rules = parse_rules_file(text, name)
            if bucket == "deny":
                deny += rules
            else:
                allow += rules
        self._deny, self._allow = deny, allow
        return self

    @property
    def deny_rules(self) -> tuple[Rule, ...]:
        return self._deny

    @property
    def allow_rules(self) -> tuple[Rule, ...]:
        return self._allow

    @property
    def file_hashes(self) -> dict[str, str]:
        """The rule files this block read, with the sha256 of each one's text."""
        return dict(self._files)


def _pii(value: Any) -> Any:
    if value is True:
        return PII_KINDS
    if value is False or value is None:
        return ()
    return _as_list(value)


class Guard(BaseModel):
    """Checks on a step's output (or, for a guardrail step, on the value it checks)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: Annotated[dict[str, Any] | None, Field(alias="schema"), AfterValidator(json_schema)] = None
    content: ContentRules | None = None
    secrets: Annotated[bool, Strict()] = False
    pii: Annotated[tuple[Text, ...], BeforeValidator(_pii)] = ()
    injection: Annotated[bool, Strict()] = False
    on_violation: OnViolation = OnViolation.FAIL
    approvers: Text = "approver"

    @field_validator("pii")
    @classmethod
    def _pii_kinds(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [kind for kind in value if kind not in PII_KINDS]
        if unknown:
            raise ValueError(f"unknown PII kind {unknown[0]!r}; known: {', '.join(PII_KINDS)} (or true for all)")
        return value

    @model_validator(mode="after")
    def _something(self) -> Guard:
        if self.schema_ is None and self.content is None and not (self.secrets or self.pii or self.injection):
            raise ValueError("a guard needs at least one check: schema, content, secrets, pii or injection")
        return self

    @property
    def file_hashes(self) -> dict[str, str]:
        return self.content.file_hashes if self.content is not None else {}


def guard_files(data: Any) -> list[str]:
    """The rule files a raw workflow mapping names (``steps.*.guard.content.{deny,allow}_file``),
    normalised; paths that leave the workflow's folder are left out (validation reports them)."""
    found: list[str] = []
    steps = data.get("steps") if isinstance(data, Mapping) else None
    if not isinstance(steps, Mapping):
        return found
    for step in steps.values():
        guard = step.get("guard") if isinstance(step, Mapping) else None
        content = guard.get("content") if isinstance(guard, Mapping) else None
        if not isinstance(content, Mapping):
            continue
        for key in ("deny_file", "allow_file"):
            value = content.get(key)
            norm = safe_relative(value) if isinstance(value, str) else None
            if norm is not None and norm not in found:
                found.append(norm)
    return found
