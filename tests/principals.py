"""The credentials of the test session: one identity home, the server in operator mode trusts it.

Services connect with their service credential, workers with a worker credential of their tenant
and topics, test clients with admin (or a person's role, to test refusals). Credentials are
issued on first use and reused (issuing is a key pair and a signature: about a millisecond).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from interlock.contracts import permissions as p
from interlock.contracts import subjects as s
from interlock.identity import IdentityHome, Permissions

DEFAULT_TENANT = "default"


@dataclass
class Principals:
    home: IdentityHome
    _issued: dict[tuple[str, str, tuple[str, ...], str], Path] = field(default_factory=dict)
    _counter: itertools.count[int] = field(default_factory=itertools.count)

    def _get(self, role: str, tenant: str | None, topics: Sequence[str] = (), name: str | None = None) -> Path:
        key = (role, tenant or "*", tuple(sorted(topics)), name or "")
        if key not in self._issued:
            principal = name or (role if tenant is None else f"{role}-{tenant}")
            if role == "worker":  # several tests serve different topics: one credential each
                principal = f"{principal}-{next(self._counter)}"
            self._issued[key] = self.home.issue(role, tenant, key[2], name=principal)
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
