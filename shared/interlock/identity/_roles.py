"""Roles and the subject permissions each one gets, derived from the contracts.

Services get what :mod:`interlock.contracts.catalog` says they publish and subscribe to (every
tenant); workers and people get their own tenant's subjects only. Nobody but ``admin`` may
change or remove a stream. Every principal subscribes only to its own inbox prefix, so
nobody reads another's replies.

Every tenant-owned subject carries the tenant (and a command its principal), so a worker's or a
person's permissions name their own tenant's (and own principal's) subjects only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from interlock.contracts import catalog as c
from interlock.contracts import permissions as p
from interlock.contracts import subjects as s
from interlock.identity._jwt import Permissions

ALL_TENANTS = "*"
"""The tenant of service credentials: services serve every tenant."""


class RoleError(ValueError):
    """An unknown role, or a role given the wrong scope (tenant, topics)."""


@dataclass(frozen=True)
class Scope:
    """Who a credential is for: the tenant, the worker's topics, its principal name and the
    owner token of its inbox prefix (the user's public key)."""

    tenant: str
    principal: str
    inbox_owner: str
    topics: tuple[str, ...] = ()


@dataclass(frozen=True)
class Role:
    name: str
    kind: str  # "service", "worker" or "person"
    description: str
    grant: Callable[[Scope], Grant]

    def permissions(self, scope: Scope) -> Permissions:
        if self.kind == "worker" and not scope.topics:
            raise RoleError("a worker credential needs at least one topic")
        if self.kind != "worker" and scope.topics:
            raise RoleError(f"topics apply to worker credentials only, not to role {self.name!r}")
        if self.kind == "service":
            if scope.tenant != ALL_TENANTS:
                raise RoleError(f"a {self.name} credential serves every tenant; give no tenant")
        elif scope.tenant == ALL_TENANTS:
            raise RoleError(f"a {self.name} credential needs a tenant")
        else:
            s.token(scope.tenant, "tenant")
        s.token(scope.principal, "principal")
        for topic in scope.topics:
            s.topic_tokens(topic)
        return self.grant(scope).permissions()


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True)
class Grant:
    """A role's rights in the terms the table shows; :meth:`permissions` expands them for the JWT.

    ``reads``: streams the principal reads through consumers it creates (any filter) and direct
    gets; ``filtered_reads``: (stream, filter) pairs read only through the principal's own
    consumers (``own_consumers``, names pinned per credential), each held by the server to that
    filter (the tenant's own subjects).
    """

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    filtered_reads: tuple[tuple[str, str], ...] = ()
    own_consumers: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    responds: bool = False

    def permissions(self) -> Permissions:
        pub = list(self.publish)
        for stream in self.reads:
            pub.extend(p.js_consumer_access(stream))
        for stream, filter_subject in self.filtered_reads:
            pub.append(p.js_stream_info(stream))
            for name in self.own_consumers:
                pub += [p.js_filtered_consumer_create(stream, filter_subject, name),
                        p.js_consumer_info(stream, name), p.js_consumer_delete(stream, name),
                        s.js_consumer_next(stream, name),
                        p.js_ack(stream, name), p.js_flow_control(stream, name)]
        return Permissions(pub_allow=_unique(pub), pub_deny=self.deny, sub_allow=self.subscribe,
                           responses=1 if self.responds else 0)


def _wild(pattern: c.Pattern) -> str:
    """A channel's subject with every parameter a wildcard (a topic, several tokens: ``>``)."""
    args = [(p.REST if a is c.TOPIC else p.ANY) if isinstance(a, c.Param) else a for a in pattern.args]
    return p.pattern(pattern.build, *args)


_BUCKET_STREAMS = tuple(p.kv_stream(b) for b in (s.WORKFLOWS_BUCKET, s.AGENTS_BUCKET, s.POLICIES_BUCKET,
                                                  s.APPROVERS_BUCKET, s.KEYRING_BUCKET, s.BREAKERS_BUCKET,
                                                  s.ROLLOUTS_BUCKET))
_API_KEYS = p.kv_stream(s.APIKEYS_BUCKET)  # not in _BUCKET_STREAMS: only the api service and admin read it
_PAYLOADS = p.object_stream(s.PAYLOADS_OBJECT_STORE)  # shared by tenants today (keys are content digests)
_NOT_ADMIN_DENY = p.js_stream_admin()


def _service(name: str) -> Callable[[Scope], Grant]:
    def grant(scope: Scope) -> Grant:
        # stream info of every stream: a service checks at start that the topology is there
        pub: list[str] = [s.JS_API_INFO, p.JS_STREAM_NAMES, p.js_stream_info(p.ANY)]
        sub: list[str] = [p.inbox_all(scope.inbox_owner)]
        reads: list[str] = []
        responds = False
        for ch in c.CHANNELS:
            subject = _wild(ch.pattern)
            if name in ch.publishers:
                pub.append(subject)
            if name in ch.subscribers:
                if ch.stream:
                    reads.append(ch.stream)
                else:
                    sub.append(subject)
                    responds = responds or ch.transport == "request"
        pub.append(p.object_subjects(s.PAYLOADS_OBJECT_STORE))
        if name == c.DISPATCHER:  # the result cache (issue 17): no other principal but admin sees it
            pub.append(p.kv_keys(s.CACHE_BUCKET))
            reads.append(p.kv_stream(s.CACHE_BUCKET))
        # buckets the catalog says this service writes (breakers, rollouts: the dispatcher)
        pub += [p.kv_keys(entry.bucket) for entry in c.KEY_VALUE if name in entry.writers]
        if name == c.DISPATCHER:  # the workload gate's slots and tokens (catalog.WORKLOAD_GATE)
            pub.append(p.kv_keys(s.GATE_BUCKET))
            reads.append(p.kv_stream(s.GATE_BUCKET))
        return Grant(publish=_unique(pub), subscribe=_unique(sub), reads=_unique([*reads, *_BUCKET_STREAMS, _PAYLOADS]),
                     deny=_NOT_ADMIN_DENY, responds=responds)
    return grant


def _api(scope: Scope) -> Grant:
    """The HTTP API: a client for every tenant (it acts for the people who call it)."""
    pub: list[str] = [s.JS_API_INFO, p.JS_STREAM_NAMES]
    pub += [_wild(ch.pattern) for ch in c.CHANNELS if c.CLIENT in ch.publishers]
    pub += [p.object_subjects(s.PAYLOADS_OBJECT_STORE)]
    # what the API's keys may ask of it (it checks each key's role itself): API keys, checked on every
    # request and administered by admin keys; workflows (admin keys); policy bundles (policy-admin keys)
    pub += [p.kv_keys(s.APIKEYS_BUCKET), p.kv_keys(s.WORKFLOWS_BUCKET), p.kv_keys(s.POLICIES_BUCKET),
            p.js_stream_info(s.TRIGGERS_STREAM),  # a workflow's own trigger subjects: are they captured yet?
            p.js_stream_info(s.JOBS_STREAM)]  # queue depth per topic (`interlock agents`), as workers may read it
    # each API key's own signing key is put in the keyring when the key is created (and revoked with it)
    pub += [p.kv_keys(s.KEYRING_BUCKET)]
    # canary rollouts started and aborted through the API (operator keys, checked per tenant by the API)
    pub += [p.kv_keys(s.ROLLOUTS_BUCKET)]
    return Grant(publish=_unique(pub), subscribe=(p.inbox_all(scope.inbox_owner),),
                 reads=(s.EVENTS_STREAM, s.NOTIFY_STREAM, s.DLQ_STREAM, *_BUCKET_STREAMS, _API_KEYS, _PAYLOADS),
                 deny=_NOT_ADMIN_DENY)


def _worker(scope: Scope) -> Grant:
    t = scope.tenant
    pub: list[str] = [s.JS_API_INFO, p.JS_STREAM_NAMES, p.js_stream_info(s.JOBS_STREAM)]
    for topic in scope.topics:
        durable = s.worker_consumer(t, topic)
        pub += [p.js_filtered_consumer_create(s.JOBS_STREAM, s.job(t, topic), durable),
                p.js_consumer_info(s.JOBS_STREAM, durable), s.js_consumer_next(s.JOBS_STREAM, durable),
                p.js_ack(s.JOBS_STREAM, durable), p.kv_key(s.AGENTS_BUCKET, p.pattern(s.agent_key, t, topic, p.ANY))]
        # the version slots: consumers held to this tenant's versioned jobs of this topic (any version)
        for slot in range(s.VERSION_SLOTS):
            durable = s.worker_version_consumer(t, topic, slot)
            pub += [p.js_filtered_consumer_create(s.JOBS_STREAM, p.pattern(s.versioned_job, t, p.ANY, topic), durable),
                    p.js_consumer_info(s.JOBS_STREAM, durable), s.js_consumer_next(s.JOBS_STREAM, durable),
                    p.js_ack(s.JOBS_STREAM, durable)]
    pub += [p.pattern(s.result, t, p.ANY), p.pattern(s.heartbeat, t, p.ANY), s.dead_letter(c.WORKER),
            p.js_stream_info(p.kv_stream(s.AGENTS_BUCKET)), p.object_subjects(s.PAYLOADS_OBJECT_STORE)]
    sub = (p.inbox_all(scope.inbox_owner), s.tenant_control_cancel(t))
    return Grant(publish=_unique(pub), subscribe=sub, reads=(_PAYLOADS,), deny=_NOT_ADMIN_DENY)


def _person(extra: Callable[[Scope], Sequence[str]], *, admin: bool = False) -> Callable[[Scope], Grant]:
    """Every person of a tenant asks queries, reads the tenant's run logs and notifications
    (consumers held to the tenant's subjects) and reads the buckets; roles add to that."""
    def grant(scope: Scope) -> Grant:
        t = scope.tenant
        # the jobs stream's info: queue depth per topic (`interlock agents`), as every worker may read it
        pub = [s.JS_API_INFO, p.JS_STREAM_NAMES, p.js_stream_info(s.JOBS_STREAM), p.pattern(s.query, t, p.ANY),
               *extra(scope)]
        reads = list(_BUCKET_STREAMS)
        if admin:
            pub += [p.JS_API_ALL, p.kv_keys(s.APPROVERS_BUCKET), p.kv_keys(s.WORKFLOWS_BUCKET),
                    p.kv_keys(s.KEYRING_BUCKET), *_dead_letter_admin(), p.kv_keys(s.APIKEYS_BUCKET)]
            reads += [s.DLQ_STREAM, p.kv_stream(s.DLQ_STATUS_BUCKET), _API_KEYS]
        return Grant(publish=_unique(pub), subscribe=(p.inbox_all(scope.inbox_owner),), reads=tuple(reads),
                     filtered_reads=((s.EVENTS_STREAM, s.tenant_events(t)),
                                     (s.NOTIFY_STREAM, p.pattern(s.notify, t, p.ANY))),
                     own_consumers=tuple(p.principal_consumer(scope.inbox_owner, i)
                                         for i in range(p.PRINCIPAL_CONSUMER_SLOTS)),
                     deny=() if admin else _NOT_ADMIN_DENY)
    return grant


def _dead_letter_admin() -> list[str]:
    """Dead letters (`interlock dlq`): record what was done about one (resolve, replay), and publish
    a dead letter's original again to its subject. Admins only: dead letters are not per tenant
    (``il.dlq.{service}`` holds every tenant's), so reading them is not a tenant operator's right."""
    return [p.kv_keys(s.DLQ_STATUS_BUCKET), *(_wild(ch.pattern) for ch in c.REPLAYABLE)]


INTERVENTIONS = ("retry", "skip", "resume", "pause", "unpause")
"""The commands with which an operator intervenes in a run."""


def _commands(scope: Scope, *names: str) -> list[str]:
    return [s.command(scope.tenant, n, scope.principal) for n in names]


def _operator(scope: Scope) -> list[str]:
    # runs start with a trigger: there is no start command (nothing would answer it)
    # intervening in a run (issue 17): retry or skip a step, resume, pause and unpause; rate outputs
    return [*_commands(scope, "cancel", *INTERVENTIONS, "feedback"), p.pattern(s.trigger, scope.tenant, p.ANY),
            # canary rollouts of the tenant's agents (interlock agents rollout)
            p.kv_key(s.ROLLOUTS_BUCKET, p.pattern(s.rollout_key, scope.tenant, p.REST))]


def _approver(scope: Scope) -> list[str]:
    return _commands(scope, "approve", "reject", "feedback")  # a reviewer rates what they review


def _policy_admin(scope: Scope) -> list[str]:
    return [p.kv_keys(s.POLICIES_BUCKET)]


def _admin(scope: Scope) -> list[str]:
    return [*_operator(scope), *_approver(scope), *_policy_admin(scope)]


ROLES: tuple[Role, ...] = (
    *(Role(name, "service", c.SERVICES[name], _service(name))
      for name in (c.PLANNER, c.POLICY, c.APPROVAL, c.DISPATCHER, c.AUDITOR)),
    Role("api", "service", "The HTTP API and web console: a client of the services for every tenant.", _api),
    Role("worker", "worker", "An agent worker of one tenant: pulls that tenant's jobs of its topics only, "
         "reports results and heartbeats for that tenant.", _worker),
    Role("viewer", "person", "Reads the tenant's runs, timelines, events and notifications; asks queries.",
         _person(lambda scope: ())),
    Role("operator", "person", "A viewer who may also start, cancel and rerun the tenant's runs, "
         "intervene in them (retry or skip a step, resume, pause) and give feedback on step outputs.",
         _person(_operator)),
    Role("approver", "person", "A viewer who may also approve and reject the tenant's pending approvals "
         "(as the principal named in the credential) and give feedback on step outputs.",
         _person(_approver)),
    Role("policy-admin", "person", "A viewer who may also publish and roll back policy bundles.",
         _person(_policy_admin)),
    Role("admin", "person", "Everything the other people may do, plus streams, consumers, buckets, the approver "
         "directory, workflows and dead letters (the JetStream API is account-wide).",
         _person(_admin, admin=True)),
)
ROLE_NAMES = tuple(r.name for r in ROLES)


def role(name: str) -> Role:
    """The role called ``name`` (see :data:`ROLE_NAMES`)."""
    for r in ROLES:
        if r.name == name:
            return r
    raise RoleError(f"unknown role {name!r}; roles are: {', '.join(ROLE_NAMES)}")


def permissions_for(name: str, tenant: str, principal: str, inbox_owner: str,
                    topics: Sequence[str] = ()) -> Permissions:
    """The permissions of a credential of role ``name`` for ``tenant`` (:data:`ALL_TENANTS` for services)."""
    return role(name).permissions(Scope(tenant, principal, inbox_owner, tuple(topics)))


# -- the documentation table, from the same data -----------------------------------------------
_PLACEHOLDERS = {"zztenantzz": "{tenant}", "zztopiczz": "{topic}", "zzprincipalzz": "{principal}",
                 "zzuserzz": "{user}"}
_DIGEST = re.compile(r"(\{topic\})_[0-9a-f]{16}")


def _placeholders(subject: str) -> str:
    for sentinel, shown in _PLACEHOLDERS.items():
        subject = subject.replace(sentinel, shown)
    return _DIGEST.sub(r"\1_{digest}", subject)


def _cell(subjects: Sequence[str]) -> str:
    return "<br>".join(f"`{_placeholders(x)}`" for x in subjects) or "—"


def permission_table() -> str:
    """The roles and their permissions as a Markdown table (for the README), placeholders in braces.

    "reads" means: consumers and direct gets on those streams (and their stream info); a stream
    given with a filter means the server holds every consumer the principal creates to it.
    """
    rows = ["| role | who | may publish | may subscribe | reads (streams) | denied publish |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in ROLES:
        topics = ("zztopiczz",) if r.kind == "worker" else ()
        tenant = ALL_TENANTS if r.kind == "service" else "zztenantzz"
        g = r.grant(Scope(tenant, "zzprincipalzz", "zzuserzz", topics))
        reads = [*g.reads, *(f"{stream} filter {f}, own consumers only" for stream, f in g.filtered_reads)]
        resp = "<br>replies to requests it received" if g.responds else ""
        rows.append(f"| `{r.name}` | {r.description} | {_cell(g.publish)} | {_cell(g.subscribe)}{resp} "
                    f"| {_cell(reads)} | {_cell(g.deny)} |")
    return "\n".join(rows) + "\n"
