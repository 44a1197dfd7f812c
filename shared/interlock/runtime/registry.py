"""Registered workflow versions, kept in the ``il_workflows`` KV bucket.

A version is immutable: applying different content under a registered version is refused, so a
run's recorded (version, definition hash) always names exactly one definition.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from interlock.contracts import subjects as s
from interlock.core.topology import add_stream_subjects
from interlock.core.workflow import Workflow, load_workflow
from interlock.runtime.kvkeys import matching_keys


class WorkflowNotFound(LookupError):
    pass


class VersionConflict(ValueError):
    pass


class WorkflowRegistry:
    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self._kv: KeyValue | None = None
        self._cache: dict[tuple[str, str], Workflow] = {}

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.js.key_value(s.WORKFLOWS_BUCKET)
        return self._kv

    async def apply(self, source: str, *, filename: str | None = None,
                    files: Mapping[str, str] | None = None) -> tuple[Workflow, bool]:
        """Register a workflow version from YAML text and the guard rule files it names
        (relative path -> text, kept with the version; their hashes are in its content hash);
        returns (workflow, newly_registered)."""
        workflow = load_workflow(source, filename=filename, files=files or {})
        if workflow.version == "latest":
            raise VersionConflict("'latest' is reserved and cannot be used as a version")
        kv = await self.kv()
        key = f"{workflow.id}.{workflow.version}"
        created = True
        try:
            entry = await kv.get(key)
            existing = json.loads(entry.value or b"{}")
            if existing.get("hash") != workflow.content_hash:
                raise VersionConflict(
                    f"workflow {workflow.id} version {workflow.version} is already registered with other "
                    f"content (hash {existing.get('hash', '?')[:12]}…); bump the version"
                )
            created = False
        except KeyNotFoundError:
            record: dict[str, object] = {"source": source, "hash": workflow.content_hash,
                                         "applied_at": datetime.now(UTC).isoformat()}
            if workflow.rule_files:  # only the files the version reads
                record["files"] = {name: (files or {})[name] for name in workflow.rule_files}
            await kv.put(key, json.dumps(record).encode())
        await kv.put(f"{workflow.id}.latest", workflow.version.encode())
        subjects = [subj for subj in workflow.triggers if not s.is_trigger_subject(subj)]
        if subjects:
            await add_stream_subjects(self.js, s.TRIGGERS_STREAM, subjects)
        self._cache[(workflow.id, workflow.version)] = workflow
        return workflow, created

    async def latest_version(self, workflow_id: str) -> str:
        kv = await self.kv()
        try:
            entry = await kv.get(f"{workflow_id}.latest")
        except KeyNotFoundError:
            raise WorkflowNotFound(f"workflow {workflow_id!r} is not registered "
                                   f"(register it with `interlock workflows apply FILE`)") from None
        return (entry.value or b"").decode()

    async def get(self, workflow_id: str, version: str | None = None) -> Workflow:
        if version is None:
            version = await self.latest_version(workflow_id)
        cached = self._cache.get((workflow_id, version))
        if cached is not None:
            return cached
        kv = await self.kv()
        try:
            entry = await kv.get(f"{workflow_id}.{version}")
        except KeyNotFoundError:
            raise WorkflowNotFound(f"workflow {workflow_id!r} has no version {version!r}") from None
        record = json.loads(entry.value or b"{}")
        workflow = load_workflow(record["source"], filename=f"{workflow_id}@{version}",
                                 files=record.get("files") or {})
        self._cache[(workflow_id, version)] = workflow
        return workflow

    async def list(self) -> list[tuple[str, str]]:
        kv = await self.kv()
        out = []
        for key in await matching_keys(kv):
            wf, _, version = key.partition(".")
            if version != "latest":
                out.append((wf, version))
        return sorted(out)

    async def trigger_subjects(self) -> dict[str, str]:
        """Subject -> workflow id for every workflow's extra trigger subjects (latest versions)."""
        result: dict[str, str] = {}
        for wf_id, _ in await self.list():
            workflow = await self.get(wf_id)
            for subj in workflow.triggers:
                result[subj] = wf_id
        return result
