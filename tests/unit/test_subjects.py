"""The tenant-carrying subjects: builders, the wildcards services subscribe to, and the parsers
that give a service the tenant and principal of a request (never the body)."""

from __future__ import annotations

import pytest

from interlock.contracts import subjects as s
from interlock.identity import subject_matches


def test_builders_put_the_tenant_first_and_the_principal_last() -> None:
    assert s.job("acme", "llm.summarize") == "il.job.acme.llm.summarize"  # literal: pinned layout
    assert s.trigger("acme", "wf") == "il.trigger.acme.wf"  # literal: pinned layout
    assert s.command("acme", "approve", "alice") == "il.cmd.acme.approve.alice"  # literal: pinned layout
    assert s.query("acme", "runs") == "il.q.acme.runs"  # literal: pinned layout
    assert s.agent_key("acme", "llm.summarize", "w-1") == "acme.llm.summarize.w-1"


def test_parsers_invert_the_builders() -> None:
    assert s.parse_job(s.job("acme", "llm.summarize")) == ("acme", "llm.summarize")
    assert s.parse_trigger(s.trigger("acme", "wf-1")) == ("acme", "wf-1")
    assert s.parse_command(s.command("acme", "cancel", "bob_2")) == ("acme", "cancel", "bob_2")
    assert s.parse_query(s.query("globex", "timeline")) == ("globex", "timeline")
    assert s.parse_run_events(s.run_events("acme", "r1")) == ("acme", "r1")


def test_subscriber_wildcards_match_every_tenant_and_principal_only_of_their_name() -> None:
    assert subject_matches(s.commands("approve"), s.command("acme", "approve", "alice"))
    assert subject_matches(s.commands("approve"), s.command("globex", "approve", "bob"))
    assert not subject_matches(s.commands("approve"), s.command("acme", "reject", "alice"))
    assert subject_matches(s.queries("runs"), s.query("acme", "runs"))
    assert not subject_matches(s.queries("runs"), s.query("acme", "status"))
    assert subject_matches(s.tenant_jobs("acme"), s.job("acme", "llm.summarize"))
    assert not subject_matches(s.tenant_jobs("acme"), s.job("globex", "llm.summarize"))
    assert subject_matches(s.tenant_control_cancel("acme"), s.control_cancel("acme", "r1"))
    assert not subject_matches(s.tenant_control_cancel("acme"), s.control_cancel("globex", "r1"))
    assert subject_matches(s.JOBS_ALL, s.job("acme", "t")) and subject_matches(s.TRIGGERS_ALL, s.trigger("a", "w"))


@pytest.mark.parametrize(("parse", "subject", "message"), [
    (s.parse_command, s.PREFIX + ".cmd.approve",
     r"^'il\.cmd\.approve' is not a command subject \(expected il\.cmd\.\{tenant\}\.\{name\}\.\{principal\}\)$"),
    (s.parse_command, s.PREFIX + ".cmd.acme.approve.alice.extra", r"is not a command subject"),
    (s.parse_command, s.PREFIX + ".cmd.acme.approve.*",
     r"^'il\.cmd\.acme\.approve\.\*': principal '\*' is not a valid subject token"),
    (s.parse_query, s.PREFIX + ".q.runs",
     r"^'il\.q\.runs' is not a query subject \(expected il\.q\.\{tenant\}\.\{name\}\)$"),
    (s.parse_query, s.PREFIX + ".evt.acme.runs", r"is not a query subject"),
    (s.parse_trigger, s.PREFIX + ".trigger.wf", r"is not a trigger subject \(expected il\.trigger\.\{tenant\}"),
    (s.parse_job, s.PREFIX + ".job.summarize", r"is not a job subject \(expected il\.job\.\{tenant\}\.\{topic\}\)"),
    (s.parse_job, s.PREFIX + ".job.acme.a..b", r"job topic 'a\.\.b' must be dot-separated tokens"),
    (s.parse_run_events, s.PREFIX + ".evt.acme", r"is not a run event subject"),
])
def test_parsers_name_the_subject_and_the_layout(parse: object, subject: str, message: str) -> None:
    with pytest.raises(s.SubjectError, match=message):
        parse(subject)  # type: ignore[operator]


def test_builders_refuse_tokens_that_would_change_the_layout() -> None:
    for bad in ("a.b", "a*", "", "a b", ">"):
        with pytest.raises(s.SubjectError, match="tenant"):
            s.job(bad, "t")
        with pytest.raises(s.SubjectError, match="principal"):
            s.command("acme", "approve", bad)


def test_worker_consumers_are_per_tenant_and_topic_and_never_collide() -> None:
    names = {s.worker_consumer(t, topic) for t in ("acme", "globex", "a_b", "a") for topic in ("b.c", "b_c", "c")}
    assert len(names) == 12
    assert all(s.token(n, "consumer") == n for n in names)  # a durable name: one token
    assert s.worker_consumer("acme", "llm.summarize").startswith("worker_acme_llm_summarize_")
