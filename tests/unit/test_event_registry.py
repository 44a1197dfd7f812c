"""The event registry: ``ev.EVENT_TYPES`` and the tables derived from it.

Every table that must handle every event type (the run aggregate's state changes, the auditor's
row handlers, the timeline text) is keyed by data class and checked against the registry when its
module is imported; adding an event type without its entries must fail that import.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any

import pytest
from eventsourcing.utils import get_topic, resolve_topic

from interlock.auditor.projection import Projection
from interlock.contracts import events as ev
from interlock.core import codec
from interlock.core.run import Run, event_class_name
from interlock.core.timeline import describe
from interlock.core.verify import verify_envelopes

# a run log written by the code before the registry (every event type but the other run endings)
OLD_LOG = json.loads((Path(__file__).parent / "data" / "run_log_main_d6f306c.json").read_text())

# the aggregate's event classes as they have always been named (eventsourcing topic = module:qualname)
LIFECYCLE_TOPICS = {
    "RunStarted": "interlock.core.run:Run.Started",
    "RunAdmitted": "interlock.core.run:Run.Admitted",
    "RunSucceeded": "interlock.core.run:Run.Succeeded",
    "RunFailed": "interlock.core.run:Run.Failed",
    "RunDenied": "interlock.core.run:Run.Denied",
    "RunCancelled": "interlock.core.run:Run.Cancelled",
    "RunTimedOut": "interlock.core.run:Run.TimedOut",
    # issue 17: a person's acts on a whole run follow the same naming
    "RunResumed": "interlock.core.run:Run.Resumed",
    "RunPaused": "interlock.core.run:Run.Paused",
    "RunUnpaused": "interlock.core.run:Run.Unpaused",
}

# module -> the name its completeness error gives the table
DERIVED_TABLES = {
    "interlock.core.run": "Run state changes",
    "interlock.core.timeline": "timeline descriptions",
    "interlock.auditor.projection._rows": "auditor projection row handlers",
}


def defined_event_classes() -> dict[str, type[ev.EventData]]:
    return {name: value for name, value in vars(ev).items()
            if inspect.isclass(value) and issubclass(value, ev.EventData) and value.__module__ == ev.__name__}


def test_the_registry_is_every_event_data_class_but_the_bases() -> None:
    classes = defined_event_classes()
    bases = {name for name, cls in classes.items() if cls.is_base}
    # _Decided: approval decisions (via); _Intervention: a person's acts on a run (by, via, reason)
    assert bases == {"EventData", "StepEventData", "_Decided", "_Intervention"}
    assert dict(ev.EVENT_TYPES) == {name: cls for name, cls in classes.items() if name not in bases}
    assert all(cls.type_name == name for name, cls in ev.EVENT_TYPES.items())
    assert len(ev.EVENT_TYPES) == 38  # 28, StepCacheHit, GuardChecked, StepHeld, StepThrottled, issue 17's six


def test_the_registry_cannot_be_changed_by_accident() -> None:
    with pytest.raises(TypeError):
        ev.EVENT_TYPES["Extra"] = ev.RunStarted  # type: ignore[index]


def test_a_subclass_of_an_event_type_is_an_event_type_of_its_own() -> None:
    class Later(ev.StepReady):
        pass

    assert Later.type_name == "Later" and not Later.is_base
    assert ev.kinds(Later, ev.StepReady) == frozenset({"Later", "StepReady"})


def test_complete_table_keys_the_table_by_type_name_in_registry_order() -> None:
    table = {cls: name.lower() for name, cls in reversed(list(ev.EVENT_TYPES.items()))}
    keyed = ev.complete_table("test table", table)
    assert list(keyed) == list(ev.EVENT_TYPES)
    assert keyed["StepReady"] == "stepready"


def test_complete_table_names_what_is_missing_and_what_is_not_an_event_type() -> None:
    class NotRegistered(ev.EventData):
        pass

    table: dict[type[ev.EventData], Any] = {cls: None for cls in ev.EVENT_TYPES.values()}
    del table[ev.StepHeartbeat], table[ev.RunAdmitted]
    table[NotRegistered] = None
    with pytest.raises(RuntimeError) as caught:
        ev.complete_table("test table", table)
    assert str(caught.value) == ("test table: no entry for RunAdmitted, StepHeartbeat; entries for "
                                 f"{NotRegistered.__qualname__}, which are not event types")


def load_copy(module: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import a second, private copy of ``module`` (the real one stays as it is)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    name = "_registry_probe_" + module.replace(".", "_")
    copy_spec = importlib.util.spec_from_file_location(name, spec.origin)
    assert copy_spec is not None and copy_spec.loader is not None
    copy = importlib.util.module_from_spec(copy_spec)
    monkeypatch.setitem(sys.modules, name, copy)  # eventsourcing looks the aggregate's module up
    copy_spec.loader.exec_module(copy)
    return copy


@pytest.mark.parametrize("module", sorted(DERIVED_TABLES))
def test_a_derived_table_loads_against_the_registry(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    load_copy(module, monkeypatch)  # the check itself passes: the control for the test below


@pytest.mark.parametrize("module", sorted(DERIVED_TABLES))
def test_an_event_type_added_without_its_entry_fails_the_import(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    class WithoutHandlers(ev.EventData):
        pass

    monkeypatch.setattr(ev, "EVENT_TYPES", MappingProxyType({**ev.EVENT_TYPES, "WithoutHandlers": WithoutHandlers}))
    with pytest.raises(RuntimeError, match=f"^{DERIVED_TABLES[module]}: no entry for WithoutHandlers$"):
        load_copy(module, monkeypatch)


def test_the_aggregate_has_one_event_class_per_event_type_with_stable_topics() -> None:
    assert set(Run.EVENT_CLASSES) == set(ev.EVENT_TYPES)
    for type_name, event_cls in Run.EVENT_CLASSES.items():
        topic = LIFECYCLE_TOPICS.get(type_name, f"interlock.core.run:Run.{type_name}")
        assert get_topic(event_cls) == topic
        assert resolve_topic(topic) is event_cls
        assert issubclass(event_cls, Run.Event)
    assert issubclass(Run.EVENT_CLASSES["RunStarted"], Run.Started)


def test_only_a_whole_run_prefix_is_dropped_from_the_event_class_name() -> None:
    class RunnerMoved(ev.EventData):
        pass

    class RunLabelled(ev.EventData):
        pass

    assert [event_class_name(t) for t in (RunnerMoved, RunLabelled, ev.RunStarted, ev.RetryScheduled)] == \
        ["RunnerMoved", "Labelled", "Started", "RetryScheduled"]


# -- a log written before the registry ---------------------------------------------------------
def test_an_old_log_verifies_and_replays_to_the_state_it_had() -> None:
    envelopes = OLD_LOG["events"]
    report = verify_envelopes(envelopes, run_id=envelopes[0]["run_id"], tenant=OLD_LOG["tenant"])
    assert report.ok, report.problems
    # both replay paths: through the aggregate events, and the store's fast path
    by_events = None
    for envelope in envelopes:
        event = codec.event_from_envelope(envelope)
        by_events = event.mutate(by_events)
        # the stored form is unchanged: the event encodes back to the very same envelope
        again = codec.envelope_from_event(event, tenant=OLD_LOG["tenant"], service=envelope["service"],
                                          prev_hash=envelope["prev_hash"])
        assert again == envelope
    fast = codec.event_from_envelope(envelopes[0]).mutate(None)
    for envelope in envelopes[1:]:
        codec.apply_envelope(fast, envelope)
    expected = OLD_LOG["expected"]
    for run in (by_events, fast):
        assert isinstance(run, Run)
        assert (run.status, run.reason, run.version) == (expected["status"], expected["reason"], expected["version"])
        steps = {sid: {"status": st.status, "attempt": st.attempt,
                       "approval": st.approval.status if st.approval else None,
                       "approver_role": st.approval.approver_role if st.approval else None}
                 for sid, st in run.steps.items()}
        assert steps == expected["steps"]
        assert run.compensation is not None and vars(run.compensation) == expected["compensation"]


async def test_an_old_log_has_the_timeline_it_had() -> None:
    envelopes = OLD_LOG["events"]
    assert [list(describe(e["type"], e["data"])) for e in envelopes] == OLD_LOG["summaries"]
    async with Projection(":memory:") as projection:
        result = await projection.apply_commit(OLD_LOG["tenant"], envelopes[0]["run_id"], envelopes, stream_seq=1)
        assert result.chain_ok and result.applied == len(envelopes) and result.problems == []
        timeline = await projection.timeline(envelopes[0]["run_id"])
    assert timeline is not None
    assert [[e["summary"], e["details"]] for e in timeline] == OLD_LOG["summaries"]
