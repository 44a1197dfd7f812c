"""Role permissions, checked subject by subject with NATS matching rules (no server)."""

from __future__ import annotations

import pytest

from interlock.contracts import catalog as c
from interlock.contracts import permissions as p
from interlock.contracts import subjects as s
from interlock.identity import (
    ALL_TENANTS,
    ROLE_NAMES,
    ROLES,
    Permissions,
    RoleError,
    permission_table,
    permissions_for,
    role,
)
from interlock.identity import subject_matches as matches

USER = "U" + "A" * 55
SERVICES = ("planner", "policy", "approval", "dispatcher", "auditor", "api")
PEOPLE = ("viewer", "operator", "approver", "policy-admin", "admin")


def perms(name: str, tenant: str = "acme", principal: str = "alice", topics: tuple[str, ...] = ()) -> Permissions:
    if name == "worker" and not topics:
        topics = ("llm.summarize",)
    if name in SERVICES:
        tenant = ALL_TENANTS
    return permissions_for(name, tenant, principal, USER, topics)


def test_roles_are_one_per_service_kind_worker_and_people() -> None:
    assert (*SERVICES, "worker", *PEOPLE) == ROLE_NAMES


def test_subject_matching_follows_nats_rules() -> None:
    assert matches("a.*", "a.b") and not matches("a.*", "a.b.c")
    assert matches("a.>", "a.b.c") and not matches("a.>", "a")
    assert not matches("a.*", "a.>") and matches("a.>", "a.*")


@pytest.mark.parametrize("name", ROLE_NAMES)
def test_every_principal_subscribes_to_its_own_inbox_only(name: str) -> None:
    granted = perms(name)
    assert granted.allows_subscribe(f"{p.inbox_prefix(USER)}.x")
    assert not granted.allows_subscribe(f"{p.inbox_prefix('U' + 'B' * 55)}.x")
    assert not granted.allows_subscribe(f"{p.INBOX_ROOT}.>")
    assert not granted.allows_subscribe(">")


@pytest.mark.parametrize("name", [n for n in ROLE_NAMES if n != "admin"])
def test_nobody_but_admin_changes_or_removes_streams(name: str) -> None:
    granted = perms(name)
    for stream in (s.EVENTS_STREAM, s.DLQ_STREAM, s.JOBS_STREAM):
        for action in p.STREAM_ADMIN_ACTIONS:
            assert not granted.allows_publish(p.js_stream(action, stream)), (name, action, stream)
    assert perms("admin").allows_publish(p.js_stream("UPDATE", s.EVENTS_STREAM))
    assert perms("admin").allows_publish(p.js_stream("DELETE", s.EVENTS_STREAM))


@pytest.mark.parametrize("name", SERVICES[:5])
def test_services_may_check_every_stream_but_change_none(name: str) -> None:
    granted = perms(name)
    assert all(granted.allows_publish(p.js_stream_info(st)) for st in (s.EVENTS_STREAM, s.JOBS_STREAM, s.DLQ_STREAM))
    assert not granted.allows_publish(p.js_stream("CREATE", s.EVENTS_STREAM))


def test_only_the_four_appending_services_append_to_run_logs() -> None:
    subject = s.commit_subject("acme", "run-1", "planner", "flow")
    allowed = {n for n in ROLE_NAMES if perms(n).allows_publish(subject)}
    assert allowed == set(c.SERVICES_APPENDING_EVENTS)


def test_only_the_approval_service_receives_approval_decisions() -> None:
    receivers = {n for n in ROLE_NAMES if perms(n).allows_subscribe(s.command("acme", "approve", "alice"))}
    assert receivers == {"approval"}
    assert perms("approval").responses == 1  # it answers the requester's inbox without a publish right on it


def test_worker_is_held_to_its_tenant_and_topics() -> None:
    w = perms("worker", topics=("llm.summarize",))
    durable = s.worker_consumer("acme", "llm.summarize")
    assert w.allows_publish(p.js_filtered_consumer_create(s.JOBS_STREAM, s.job("acme", "llm.summarize"),
                                                          durable))
    assert w.allows_publish(s.js_consumer_next(s.JOBS_STREAM, durable))
    assert w.allows_publish(p.js_ack(s.JOBS_STREAM, durable).replace(">", "1.1.1.0.1"))
    assert w.allows_publish(s.result("acme", "run-1")) and w.allows_publish(s.heartbeat("acme", "run-1"))
    assert w.allows_subscribe(s.control_cancel("acme", "run-1"))
    # refused: another tenant's jobs, results, heartbeats, cancel notices; another topic; the run log
    other = s.worker_consumer("globex", "llm.summarize")
    assert not w.allows_publish(p.js_filtered_consumer_create(s.JOBS_STREAM, s.job("globex", "llm.summarize"),
                                                              durable))
    assert not w.allows_publish(s.js_consumer_next(s.JOBS_STREAM, other))
    assert not w.allows_publish(s.js_consumer_next(s.JOBS_STREAM, s.worker_consumer("acme", "llm.other")))
    assert not w.allows_publish(s.result("globex", "run-1")) and not w.allows_publish(s.heartbeat("globex", "run-1"))
    assert not w.allows_subscribe(s.control_cancel("globex", "run-1"))
    assert not w.allows_publish(s.commit_subject("acme", "run-1", "planner", "flow"))
    assert not w.allows_publish(s.command("acme", "approve", "alice"))
    assert not w.allows_publish(s.js_consumer_next(s.JOBS_STREAM, s.worker_consumer("globex", "llm.summarize")))
    # the agent registry: its own tenant's keys of its topics only
    assert w.allows_publish(p.kv_key(s.AGENTS_BUCKET, s.agent_key("acme", "llm.summarize", "w-1")))
    assert not w.allows_publish(p.kv_key(s.AGENTS_BUCKET, s.agent_key("globex", "llm.summarize", "w-1")))
    assert not w.allows_publish(p.kv_key(s.AGENTS_BUCKET, s.agent_key("acme", "llm.other", "w-1")))


def test_worker_consumer_names_never_collide_across_tenant_and_topic() -> None:
    assert s.worker_consumer("a_b", "c") != s.worker_consumer("a", "b.c")
    assert s.worker_consumer("a", "b_c") != s.worker_consumer("a", "b.c")


def test_people_act_only_in_their_tenant_and_role() -> None:
    def can(name: str, subject: str) -> bool:
        return perms(name).allows_publish(subject)

    query = s.query("acme", "runs")
    assert all(can(n, query) for n in PEOPLE) and not any(can(n, s.query("globex", "runs")) for n in PEOPLE)
    cancel = s.command("acme", "cancel", "alice")
    approve = s.command("acme", "approve", "alice")
    assert {n for n in PEOPLE if can(n, cancel)} == {"operator", "admin"}
    assert {n for n in PEOPLE if can(n, approve)} == {"approver", "admin"}
    # intervening in a run is an operator's (issue 17); rating an output also an approver's
    for act in ("retry", "skip", "resume", "pause", "unpause"):
        assert {n for n in PEOPLE if can(n, s.command("acme", act, "alice"))} == {"operator", "admin"}, act
        assert not can("operator", s.command("globex", act, "alice"))
        assert not can("operator", s.command("acme", act, "mallory"))
    assert {n for n in PEOPLE if can(n, s.command("acme", "feedback", "alice"))} == {"operator", "approver", "admin"}
    # an approver approves only as itself, only in its tenant
    assert not can("approver", s.command("acme", "approve", "mallory"))
    assert not can("approver", s.command("globex", "approve", "alice"))
    policy = p.kv_keys(s.POLICIES_BUCKET).replace(">", "active")
    assert {n for n in PEOPLE if can(n, policy)} == {"policy-admin", "admin"}
    directory = p.kv_keys(s.APPROVERS_BUCKET).replace(">", "alice")
    assert {n for n in ROLE_NAMES if can(n, directory)} == {"admin"}


def test_people_read_run_logs_only_through_their_own_consumers_held_to_their_tenant() -> None:
    viewer = perms("viewer")
    mine = p.principal_consumer(USER, 0)
    own = p.js_filtered_consumer_create(s.EVENTS_STREAM, s.run_log("acme", "run-1"), mine)
    assert viewer.allows_publish(own)
    assert viewer.allows_publish(s.js_consumer_next(s.EVENTS_STREAM, mine))
    assert viewer.allows_publish(p.js_ack(s.EVENTS_STREAM, mine).replace(">", "1.5.5.1.1"))
    # refused: another tenant's filter, an unfiltered or unnamed create, someone else's (a service's) consumer
    assert not viewer.allows_publish(p.js_filtered_consumer_create(s.EVENTS_STREAM, s.run_log("globex", "r"), mine))
    assert not viewer.allows_publish(f"{s.JS_API_PREFIX}.CONSUMER.CREATE.{s.EVENTS_STREAM}")
    assert not viewer.allows_publish(f"{s.JS_API_PREFIX}.CONSUMER.CREATE.{s.EVENTS_STREAM}.{mine}")
    assert not viewer.allows_publish(p.js_filtered_consumer_create(s.EVENTS_STREAM, s.run_log("acme", "r"),
                                                                   "planner"))
    assert not viewer.allows_publish(s.js_consumer_next(s.EVENTS_STREAM, "planner"))
    assert not viewer.allows_publish(s.js_consumer_next(s.EVENTS_STREAM, p.principal_consumer("U" + "B" * 55, 0)))
    assert not viewer.allows_publish(s.js_direct_get(s.EVENTS_STREAM))  # a batch get names no subject
    assert not viewer.allows_subscribe(s.commit_subject("acme", "run-1", "planner", "flow"))


def test_principal_consumer_slots_are_bounded() -> None:
    names = {p.principal_consumer(USER, i) for i in range(p.PRINCIPAL_CONSUMER_SLOTS)}
    assert len(names) == p.PRINCIPAL_CONSUMER_SLOTS
    with pytest.raises(ValueError, match="out of range"):
        p.principal_consumer(USER, p.PRINCIPAL_CONSUMER_SLOTS)


def test_scope_is_checked() -> None:
    with pytest.raises(RoleError, match="needs at least one topic"):
        permissions_for("worker", "acme", "w", USER)
    with pytest.raises(RoleError, match="topics apply to worker credentials only"):
        permissions_for("viewer", "acme", "v", USER, ("x",))
    with pytest.raises(RoleError, match="unknown role 'root'; roles are: planner, policy"):
        role("root")
    with pytest.raises(RoleError, match="a planner credential serves every tenant; give no tenant"):
        permissions_for("planner", "acme", "p", USER)
    with pytest.raises(RoleError, match="a viewer credential needs a tenant"):
        permissions_for("viewer", ALL_TENANTS, "v", USER)
    with pytest.raises(ValueError, match=r"tenant 'a\.b' is not a valid subject token"):
        permissions_for("viewer", "a.b", "v", USER)


def test_permission_table_has_a_row_per_role_with_placeholders() -> None:
    table = permission_table()
    lines = table.splitlines()
    assert len(lines) == 2 + len(ROLES)
    for r in ROLES:
        assert any(line.startswith(f"| `{r.name}` |") for line in lines)
    worker_row = next(line for line in lines if line.startswith("| `worker` |"))
    results = p.pattern(s.result, "zztenantzz", p.ANY).replace("zztenantzz", "{tenant}")
    assert f"`{results}`" in worker_row and "worker_{tenant}_{topic}_{digest}" in worker_row
    assert "zz" not in table  # every sentinel replaced


def test_only_the_auditor_hears_api_advisories_and_records_admin_changes() -> None:
    hears = {n for n in ROLE_NAMES if perms(n).allows_subscribe(s.JS_API_AUDIT)}
    records = {n for n in ROLE_NAMES if perms(n).allows_publish(s.ADMIN_AUDIT)}
    assert hears == records == {c.AUDITOR}
    # nobody publishes the server's own stream action advisories
    assert not any(perms(n).allows_publish(s.js_stream_action("UPDATED", s.EVENTS_STREAM)) for n in ROLE_NAMES)


@pytest.mark.parametrize("name", [n for n in ROLE_NAMES if n != "admin"])
def test_roles_send_only_commands_that_a_service_answers(name: str) -> None:
    # il.cmd.{tenant}.start was granted but never served (NoRespondersError): runs start with a trigger
    served = {ch.pattern.args[1] for ch in c.CHANNELS if ch.id.startswith("cmd") and not ch.id.endswith("Reply")}
    assert served == {"approve", "reject", "cancel", "retry", "skip", "resume", "pause", "unpause", "feedback"}
    assert not perms(name).allows_publish(s.command("acme", "start", "alice"))
