"""The credentials of the test session: one identity home, the server in operator mode trusts it.

Services connect with their service credential, workers with a worker credential of their tenant
and topics, test clients with admin (or a person's role, to test refusals). Credentials are
issued on first use and reused (issuing is a key pair and a signature: about a millisecond).
Once the server runs (``publish_to``), every credential issued is put in the keyring bucket at
once, as ``interlock creds issue`` does, so the services trust its signatures.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interlock.contracts import permissions as p
from interlock.contracts import subjects as s
from interlock.contracts.authorship import may_write
from interlock.core.eventstore.authenticity import Authenticity
from interlock.identity import IdentityHome, Permissions, Signer

DEFAULT_TENANT = "default"


class SignedByTheirWriter(Authenticity):
    """Signs each commit a test appends as the service that would have written it (the first role
    the contracts let write every event in it): a test standing in for all the services."""

    def __init__(self, principals: Principals) -> None:
        super().__init__()
        self.principals = principals

    def headers(self, subject: str, envelopes: Sequence[Mapping[str, Any]]) -> dict[str, str]:
        roles = ("planner", "policy", "approval", "dispatcher")
        role = next((r for r in roles if all(may_write(r, e) for e in envelopes)), "planner")
        return Authenticity(Signer.from_creds(self.principals.service(role))).headers(subject, envelopes)


@dataclass
class Principals:
    home: IdentityHome
    _issued: dict[tuple[str, str, tuple[str, ...], str], Path] = field(default_factory=dict)
    _counter: itertools.count[int] = field(default_factory=itertools.count)
    publish_to: tuple[str, Path] | None = None
    """(server URL, admin creds): where issued keys are published."""

    def publish_keyring(self) -> None:
        """Put the home's keyring in the bucket (from a thread: callers may be inside an event loop)."""
        if self.publish_to is None:
            return
        url, admin = self.publish_to

        async def publish() -> None:
            from interlock.runtime.connect import connect

            nc = await connect(url, creds=admin, patient=False)
            try:
                await self.home.publish_keyring(nc.jetstream())
            finally:
                await nc.close()

        errors: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(publish())
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        if errors:
            raise errors[0]

    def _get(self, role: str, tenant: str | None, topics: Sequence[str] = (), name: str | None = None) -> Path:
        key = (role, tenant or "*", tuple(sorted(topics)), name or "")
        if key not in self._issued:
            principal = name or (role if tenant is None else f"{role}-{tenant}")
            if role == "worker":  # several tests serve different topics: one credential each
                principal = f"{principal}-{next(self._counter)}"
            self._issued[key] = self.home.issue(role, tenant, key[2], name=principal)
            self.publish_keyring()
        return self._issued[key]

    def admin(self, tenant: str = DEFAULT_TENANT) -> Path:
        return self._get("admin", tenant)

    def service(self, name: str) -> Path:
        """A service kind's credential (planner, policy, approval, dispatcher, auditor, api)."""
        return self._get(name, None)

    def worker(self, topics: Sequence[str], tenant: str = DEFAULT_TENANT) -> Path:
        return self._get("worker", tenant, topics)

    def person(self, role: str, tenant: str = DEFAULT_TENANT, name: str | None = None) -> Path:
        return self._get(role, tenant, (), name)

    def custom(self, name: str, *, publish: Sequence[str] = (), subscribe: Sequence[str] = ()) -> Path:
        """A credential that may publish ``publish`` and subscribe ``subscribe`` (and its inbox),
        nothing else: no Interlock role (an external system, a bare listener)."""
        principal = f"{name}-{next(self._counter)}"
        return self.home.issue_custom(principal, Permissions(
            pub_allow=tuple(publish) or (s.JS_API_INFO,), sub_allow=(*subscribe, p.INBOX_ROOT + ".>")))
