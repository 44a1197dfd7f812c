"""Workflow model: the full example, short forms, graph queries, content hash, retry delays."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from interlock.core.workflow import (
    OnError,
    RetryPolicy,
    Step,
    StepType,
    Workflow,
    WorkflowInvalid,
    load_workflow,
    parse_workflow,
)

DATA = Path(__file__).parent / "data" / "workflows"
EXAMPLE = DATA / "incident_remediation.yaml"


@pytest.fixture(scope="module")
def incident() -> Workflow:
    return load_workflow(EXAMPLE)


def minimal(**steps: object) -> dict[str, object]:
    return {"id": "wf", "version": 1, "steps": steps or {"a": {"topic": "t.a"}}}


# --- the full example ------------------------------------------------------------------------


def test_incident_example_loads(incident: Workflow) -> None:
    assert incident.id == "incident-remediation"
    assert incident.name == "Incident remediation"
    assert incident.version == "3"
    assert incident.triggers == ("alerts.incident.opened", "alerts.*.critical")
    assert incident.timeout_ms == 3_600_000
    assert list(incident.steps) == [
        "detect",
        "classify",
        "enrich",
        "patch_plan",
        "approval_gate",
        "apply_patch",
        "notify",
    ]


def test_incident_example_steps(incident: Workflow) -> None:
    steps = incident.steps
    assert steps["detect"].type is StepType.JOB
    assert steps["detect"].depends_on == ()
    assert steps["classify"].depends_on == ("detect",)  # a bare string becomes a list
    assert steps["enrich"].on_error is OnError.CONTINUE
    assert steps["patch_plan"].when == "steps.classify.output.severity in ['high', 'critical']"

    gate = steps["approval_gate"]
    assert gate.type is StepType.APPROVAL
    assert gate.topic is None
    assert gate.approvers == "sre-oncall"
    assert gate.expires_ms == 900_000

    apply = steps["apply_patch"]
    assert apply.retries == RetryPolicy(max_attempts=3, backoff_ms=200)
    assert apply.retries.max_backoff_ms == 60_000  # untouched defaults survive the short form
    assert apply.on_error is OnError.COMPENSATE
    assert apply.compensate == "incident.patch.rollback"
    assert apply.labels == {"risk": "high"}

    notify = steps["notify"]
    assert notify.type is StepType.NOTIFY
    assert notify.channel == "#incidents"
    assert notify.topic is None
    assert notify.message is not None and "{{ steps.apply_patch.status }}" in notify.message


def test_models_are_frozen(incident: Workflow) -> None:
    with pytest.raises(ValueError, match="frozen"):
        incident.steps["detect"].topic = "other"


def test_topological_order_keeps_definition_order_for_ties(incident: Workflow) -> None:
    assert incident.topological_order() == [
        "detect",
        "classify",
        "enrich",
        "patch_plan",
        "approval_gate",
        "apply_patch",
        "notify",
    ]


def test_topological_order_respects_dependencies_not_file_order() -> None:
    wf = parse_workflow(
        minimal(
            c={"topic": "t", "depends_on": ["b"]},
            b={"topic": "t", "depends_on": ["a"]},
            a={"topic": "t"},
            z={"topic": "t"},
        )
    )
    # Among ready steps the earliest-defined goes first.
    assert wf.topological_order() == ["a", "b", "c", "z"]


def test_upstream_and_downstream(incident: Workflow) -> None:
    assert incident.upstream("detect") == frozenset()
    assert incident.upstream("patch_plan") == {"detect", "classify", "enrich"}
    assert incident.upstream("apply_patch") == {"detect", "classify", "enrich", "patch_plan", "approval_gate"}
    assert incident.downstream("enrich") == {"patch_plan", "approval_gate", "apply_patch", "notify"}
    assert incident.downstream("notify") == frozenset()
    with pytest.raises(KeyError, match="nope"):
        incident.upstream("nope")


# --- short forms and defaults ----------------------------------------------------------------


def test_defaults() -> None:
    wf = parse_workflow(minimal())
    step = wf.steps["a"]
    assert wf.name == "wf"
    assert wf.triggers == ()
    assert step.type is StepType.JOB
    assert step.retries == RetryPolicy(max_attempts=1, backoff_ms=1000, max_backoff_ms=60_000)
    assert step.retries.multiplier == 2.0 and step.retries.jitter == 0.2
    assert step.on_error is OnError.FAIL
    assert step.require_approval is False
    assert step.labels == {}


def test_retries_bare_integer_means_max_attempts() -> None:
    wf = parse_workflow(minimal(a={"topic": "t", "retries": 3}))
    assert wf.steps["a"].retries == RetryPolicy(max_attempts=3)


def test_retries_short_mapping() -> None:
    wf = parse_workflow(minimal(a={"topic": "t", "retries": {"max_attempts": 2, "backoff_ms": 5000}}))
    assert wf.steps["a"].retries.max_attempts == 2
    assert wf.steps["a"].retries.backoff_ms == 5000


def test_version_string_or_int() -> None:
    assert parse_workflow({**minimal(), "version": 7}).version == "7"
    assert parse_workflow({**minimal(), "version": "2024.1"}).version == "2024.1"


def test_yaml_short_forms() -> None:
    wf = load_workflow(
        """
id: short
version: 1
steps:
  a: {topic: t.a}
  b:
    topic: t.b
    depends_on: a
    retries: 2
    when: false
    require_approval: true
  fan:
    topic: t.fan
    depends_on: [a]
    for_each: "{{ steps.a.output.items }}"
    max_parallel: 4
    input: {item: "{{ item }}", n: "{{ index }}"}
"""
    )
    assert wf.steps["b"].depends_on == ("a",)
    assert wf.steps["b"].retries.max_attempts == 2
    assert wf.steps["b"].when == "false"
    assert wf.steps["b"].require_approval is True
    assert wf.steps["fan"].max_parallel == 4


def test_step_model_checks_types_only() -> None:
    # Rules across fields (a job needs a topic) belong to Workflow, which sees the whole graph.
    assert Step().type is StepType.JOB
    assert Step.model_validate({"type": "notify", "message": "hi"}).channel == "default"


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(WorkflowInvalid, match="dependency cycle"):
        Workflow.model_validate(minimal(a={"topic": "t", "depends_on": "b"}, b={"topic": "t", "depends_on": "a"}))


# --- content hash ----------------------------------------------------------------------------


def test_content_hash_is_sha256_hex(incident: Workflow) -> None:
    assert len(incident.content_hash) == 64
    int(incident.content_hash, 16)


def test_content_hash_ignores_key_order_and_formatting(incident: Workflow) -> None:
    reordered = load_workflow(DATA / "incident_remediation_reordered.yaml")
    assert reordered.content_hash == incident.content_hash


def test_content_hash_same_for_explicit_defaults() -> None:
    terse = parse_workflow(minimal(a={"topic": "t", "retries": 3}))
    explicit = parse_workflow(
        {
            "id": "wf",
            "name": "wf",
            "version": "1",
            "steps": {"a": {"type": "job", "topic": "t", "retries": {"max_attempts": 3}, "depends_on": []}},
        }
    )
    assert terse.content_hash == explicit.content_hash


def test_content_hash_changes_with_content(incident: Workflow) -> None:
    text = EXAMPLE.read_text()
    for old, new in [
        ("backoff_ms: 200", "backoff_ms: 201"),
        ("version: 3", "version: 4"),
        ("risk: high", "risk: low"),
        ("{{ input.alert }}", "{{ input.alert2 }}"),
    ]:
        assert old in text
        changed = load_workflow(text.replace(old, new))
        assert changed.content_hash != incident.content_hash, old


# --- retry delays ----------------------------------------------------------------------------


def test_delay_ms_examples() -> None:
    policy = RetryPolicy(backoff_ms=100, multiplier=2.0, max_backoff_ms=1000, jitter=0.0)
    assert [policy.delay_ms(n, 0.5) for n in range(1, 7)] == [100, 200, 400, 800, 1000, 1000]
    jittery = RetryPolicy(backoff_ms=1000, jitter=0.5)
    assert jittery.delay_ms(1, 0.0) == 500
    assert jittery.delay_ms(1, 0.5) == 1000
    assert jittery.delay_ms(1, 0.999) == 1499


def test_delay_ms_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="attempt"):
        RetryPolicy().delay_ms(0, 0.5)
    with pytest.raises(ValueError, match="rand"):
        RetryPolicy().delay_ms(1, 1.0)


def test_delay_ms_survives_huge_attempts() -> None:
    assert RetryPolicy(jitter=0.0).delay_ms(10_000, 0.0) == 60_000


policies = st.builds(
    lambda backoff, extra, multiplier, jitter: RetryPolicy(
        backoff_ms=backoff, max_backoff_ms=backoff + extra, multiplier=multiplier, jitter=jitter
    ),
    st.integers(0, 100_000),
    st.integers(0, 1_000_000),
    st.floats(1.0, 10.0),
    st.floats(0.0, 1.0),
)
rands = st.floats(0.0, 1.0, exclude_max=True)


@given(policies, st.integers(1, 200), rands)
def test_delay_ms_never_exceeds_cap(policy: RetryPolicy, attempt: int, rand: float) -> None:
    assert 0 <= policy.delay_ms(attempt, rand) <= policy.max_backoff_ms


@given(policies, st.integers(1, 200), rands)
def test_delay_ms_monotone_in_attempt_for_fixed_jitter(policy: RetryPolicy, attempt: int, rand: float) -> None:
    assert policy.delay_ms(attempt, rand) <= policy.delay_ms(attempt + 1, rand)


@given(policies, st.integers(1, 200))
def test_delay_ms_without_jitter_is_the_capped_exponential(policy: RetryPolicy, attempt: int) -> None:
    flat = policy.model_copy(update={"jitter": 0.0})
    expected = min(policy.backoff_ms * policy.multiplier ** (attempt - 1), policy.max_backoff_ms)
    assert flat.delay_ms(attempt, 0.3) == int(expected)


@given(policies, st.integers(1, 50), rands)
def test_delay_ms_jitter_stays_within_band(policy: RetryPolicy, attempt: int, rand: float) -> None:
    base = policy.model_copy(update={"jitter": 0.0}).delay_ms(attempt, 0.0)
    delay = policy.delay_ms(attempt, rand)
    # base is truncated to an int, hence the slack of one on either side.
    assert base * (1 - policy.jitter) - 1 <= delay <= min((base + 1) * (1 + policy.jitter), policy.max_backoff_ms)
