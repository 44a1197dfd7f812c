"""The HTTP API with httpx against real uvicorn (port 0), the real services and a real nats-server in
operator mode: runs, idempotency, approvals attributed to the key's principal, timelines, SSE,
errors as problem documents, the role table, console sessions with CSRF."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from interlock.api.access import ROLE_ACTIONS, Action
from interlock.api.routes import route_actions
from interlock.api.server import ApiServer
from interlock.api.settings import ApiSettings
from interlock.client import Client
from interlock.contracts import events as ev
from interlock.worker import JobContext, Worker
from tests.integration.api_fixtures import Api
from tests.integration.harness import Harness, types, unique

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PROBLEM = "application/problem+json"


def gated(wf: str, topic: str) -> str:
    return f"""
id: {wf}
version: 1
steps:
  prepare: {{topic: {topic}, input: {{n: "{{{{ input.n }}}}"}}}}
  gate: {{type: approval, depends_on: [prepare], approvers: finance, prompt: "go?"}}
  pay: {{topic: {topic}, depends_on: [gate], input: {{n: 1}}}}
"""


def plain(wf: str, topic: str) -> str:
    return f"""
id: {wf}
version: 1
steps:
  a: {{topic: {topic}, input: {{n: "{{{{ input.n }}}}"}}}}
  b: {{topic: {topic}, depends_on: [a], input: {{n: "{{{{ steps.a.output.n }}}}"}}}}
"""


async def add_one_worker(harness: Harness, topic: str) -> Worker:
    worker = Worker(unique("w"))

    @worker.job(topic)
    async def add_one(ctx: JobContext) -> dict[str, int]:
        return {"n": int(ctx.input["n"]) + 1}

    return await harness.start_worker(worker)


async def apply(api: Api, http: httpx.AsyncClient, source: str) -> None:
    r = await http.post("/api/v1/workflows", json={"source": source})
    assert r.status_code == 201, r.text


async def until(check: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.05)


def assert_problem(r: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM), r.headers
    body = r.json()
    assert body["status"] == status and body["title"] and body["type"].startswith("https://")
    for word in words:
        assert word in body["detail"], body
    return dict(body)


async def test_start_run_is_idempotent_and_approval_is_attributed_to_the_key(api: Api, harness: Harness) -> None:
    wf, topic = unique("api-gated"), unique("api-t")
    await add_one_worker(harness, topic)
    admin_key, approver_key = await api.key("admin"), await api.key("approver", principal=unique("alice"))
    async with api.http(admin_key, **{"X-Tenant-ID": "default"}) as http, api.http(approver_key) as approver:
        await apply(api, http, gated(wf, topic))
        key = unique("idem")
        first = await http.post(f"/api/v1/workflows/{wf}/runs", json={"input": {"n": 1}},
                                headers={"Idempotency-Key": key})
        assert first.status_code == 201, first.text
        run_id = first.json()["run_id"]
        assert first.headers["location"] == f"/api/v1/workflow-runs/{run_id}"
        again = await http.post(f"/api/v1/workflows/{wf}/runs", json={"input": {"n": 1}},
                                headers={"Idempotency-Key": key})
        assert again.status_code == 200 and again.json()["run_id"] == run_id and again.json()["created"] is False

        async def pending() -> Any:
            items = (await http.get("/api/v1/approvals")).json()["items"]
            return [a for a in items if a["run_id"] == run_id]

        (request,) = await until(pending, what="the approval request")
        assert request["step_id"] == "gate" and request["approver_role"] == "finance"
        principal = (await approver.get("/console/session")).json()["principal"]
        await api.admin.grant_approver(principal, ["finance"])  # the directory may be enforcing in this session
        try:
            r = await approver.post(f"/api/v1/approvals/{run_id}/gate/approve", json={"reason": "ok"})
            assert r.status_code == 200 and r.json()["ok"], r.text
        finally:
            await api.admin.revoke_approver(principal)

        async def ended() -> Any:
            body = (await http.get(f"/api/v1/workflow-runs/{run_id}")).json()
            return body if body.get("status") == "succeeded" else None

        detail = await until(ended, what="the run's success")
        assert {s["step_id"] for s in detail["steps"]} >= {"prepare", "gate", "pay"}
        events = [e for e in await api.admin.events(run_id) if e["type"] == ev.ApprovalGranted.type_name]
        record = await api.client.check_api_key(approver_key)
        assert record is not None
        assert [(e["data"]["approver"], e["data"]["via"]) for e in events] == [(principal, f"api:{record.key_id}")]
        signed = events[0]["data"]["signed"]  # signed with the key's own signing key, not the api service's
        assert signed["key_id"] == record.signer_key_id and signed["statement"]["principal"] == principal
        assert (await api.admin.load_run(run_id)).requested_by.startswith("key-")

        # the timeline, a page at a time
        page = (await http.get(f"/api/v1/workflow-runs/{run_id}/timeline", params={"limit": 3})).json()
        assert [row["seq"] for row in page["items"]] == [1, 2, 3] and page["next_cursor"] == "3"
        rest = (await http.get(f"/api/v1/workflow-runs/{run_id}/timeline",
                               params={"cursor": page["next_cursor"], "limit": 200})).json()
        assert rest["items"][0]["seq"] == 4 and rest["next_cursor"] is None
        assert any("via api" in row["summary"] for row in rest["items"])

        verify = (await http.get(f"/api/v1/workflow-runs/{run_id}/verify")).json()
        assert verify["ok"] and verify["events"] == len(page["items"]) + len(rest["items"])
        export = (await http.get(f"/api/v1/workflow-runs/{run_id}/export")).json()
        assert len(export["events"]) == verify["events"] and export["events"][-1]["hash"] == verify["head_hash"]


async def test_reject_fails_the_run_and_says_so(api: Api, harness: Harness) -> None:
    wf, topic = unique("api-rej"), unique("api-t")
    await add_one_worker(harness, topic)
    async with api.http(await api.key("admin")) as http:
        await apply(api, http, gated(wf, topic))
        run_id = (await http.post(f"/api/v1/workflows/{wf}/runs", json={"input": {"n": 1}})).json()["run_id"]

        async def pending() -> Any:
            return [a for a in (await http.get("/api/v1/approvals")).json()["items"] if a["run_id"] == run_id]

        await until(pending, what="the approval request")
        principal = (await http.get("/console/session")).json()["principal"]
        await api.admin.grant_approver(principal, ["finance"])
        try:
            missing = await http.post(f"/api/v1/approvals/{run_id}/gate/reject", json={})
            assert_problem(missing, 422, "reason")
            r = await http.post(f"/api/v1/approvals/{run_id}/gate/reject", json={"reason": "too risky"})
            assert r.status_code == 200, r.text
        finally:
            await api.admin.revoke_approver(principal)

        async def failed() -> Any:
            body = (await http.get(f"/api/v1/workflow-runs/{run_id}")).json()
            return body if body.get("status") == "failed" else None

        await until(failed, what="the run's failure")
        rejected = [e for e in await api.admin.events(run_id) if e["type"] == ev.ApprovalRejected.type_name]
        assert [(e["data"]["reason"], e["data"]["via"].split(":")[0]) for e in rejected] == [("too risky", "api")]


async def test_runs_list_filters_and_pages(api: Api, harness: Harness) -> None:
    wf, topic = unique("api-list"), unique("api-t")
    await add_one_worker(harness, topic)
    async with api.http(await api.key("operator")) as http, api.http(await api.key("admin")) as admin:
        await apply(api, admin, plain(wf, topic))
        keys = [unique("k") for _ in range(3)]
        ids = [(await http.post(f"/api/v1/workflows/{wf}/runs", json={"input": {"n": i}},
                                headers={"Idempotency-Key": k})).json()["run_id"] for i, k in enumerate(keys)]

        async def all_done() -> Any:
            rows = (await http.get("/api/v1/workflow-runs", params={"workflow": wf, "status": "succeeded"})).json()
            return rows if len(rows["items"]) == 3 else None

        await until(all_done, what="three succeeded runs")
        seen: list[str] = []
        cursor = None
        for _ in range(4):
            params: dict[str, Any] = {"workflow": wf, "limit": 1, **({"cursor": cursor} if cursor else {})}
            page = (await http.get("/api/v1/workflow-runs", params=params)).json()
            seen += [row["run_id"] for row in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert sorted(seen) == sorted(ids) and len(seen) == 3
        one = (await http.get("/api/v1/workflow-runs", params={"idempotency_key": keys[1]})).json()["items"]
        assert [row["run_id"] for row in one] == [ids[1]]
        started = one[0]["started_at"]
        later = (await http.get("/api/v1/workflow-runs", params={"workflow": wf, "started_after": started})).json()
        assert ids[1] in [row["run_id"] for row in later["items"]]
        assert (await http.get("/api/v1/workflow-runs", params={"workflow": wf, "status": "failed"})).json()[
            "items"] == []
        assert_problem(await http.get("/api/v1/workflow-runs", params={"cursor": "garbage!"}), 422, "cursor")


async def test_events_stream_live_as_server_sent_events(api: Api, harness: Harness) -> None:
    wf, topic = unique("api-sse"), unique("api-t")
    await add_one_worker(harness, topic)
    async with api.http(await api.key("admin")) as http:
        await apply(api, http, plain(wf, topic))
        run_id = (await http.post(f"/api/v1/workflows/{wf}/runs", json={"input": {"n": 1}})).json()["run_id"]
        kinds: list[str] = []
        ids: list[str] = []
        async with http.stream("GET", f"/api/v1/workflow-runs/{run_id}/events") as stream:
            assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
            async for line in stream.aiter_lines():
                if line.startswith("event:"):
                    kinds.append(line.split(":", 1)[1].strip())
                elif line.startswith("id:"):
                    ids.append(line.split(":", 1)[1].strip())
                elif line.startswith("data:") and kinds and kinds[-1] == ev.RunStarted.type_name:
                    assert json.loads(line.split(":", 1)[1])["run_id"] == run_id
                if kinds and kinds[-1] == "end":
                    break
        assert kinds[0] == ev.RunStarted.type_name and kinds[-2:] == [ev.RunSucceeded.type_name, "end"]
        assert ids[0] == "1" and [int(i) for i in ids] == sorted(int(i) for i in ids)
        assert_problem(await http.get("/api/v1/workflow-runs/no-such-run/events"), 404, "no-such-run")


async def test_errors_are_problem_documents_never_5xx(api: Api) -> None:
    admin = await api.key("admin")
    other_tenant = await api.key("viewer", tenant="globex")
    async with api.http(admin) as http:
        r = await http.post("/api/v1/workflows/x/runs", content=b"{not json",
                            headers={"content-type": "application/json"})
        assert_problem(r, 400, "not valid JSON")
        assert_problem(await http.post("/api/v1/workflows/no-such-workflow/runs", json={"input": {}}), 404,
                       "no-such-workflow")
        assert_problem(await http.post("/api/v1/workflows/x/runs", json={"input": 3}), 422, "body input")
        assert_problem(await http.post("/api/v1/workflows/x/runs", json={"inptu": {}}), 422, "inptu")
        assert_problem(await http.get("/api/v1/workflow-runs", headers={"X-Tenant-ID": "globex"}), 403, "globex")
        assert_problem(await http.post("/api/v1/workflows/x/runs", content=b"x" * (65 * 1024),
                                       headers={"content-type": "application/json"}), 413, "exceeds")
        assert_problem(await http.get("/api/v1/workflow-runs/not-a-run"), 404, "not-a-run")
        assert_problem(await http.get("/api/v1/nothing-here"), 404, "no such route")
        assert_problem(await http.post("/api/v1/workflows", json={"source": "id: [unclosed"}), 422)
        assert_problem(await http.post("/api/v1/workflows", json=["not", "an", "object"]), 422, "body")
        assert_problem(await http.post("/api/v1/workflows", content=b"{nope",
                                       headers={"content-type": "application/json"}), 400, "not valid JSON")
        assert_problem(await http.post("/api/v1/workflows", content=b"\xff\xfe",
                                       headers={"content-type": "application/yaml"}), 400, "UTF-8")
    async with api.http() as anonymous:
        assert_problem(await anonymous.get("/api/v1/workflow-runs"), 401, "X-API-Key")
    async with api.http("ilk_000000000000_" + "A" * 43) as forged, api.http("nonsense") as bad:
        assert_problem(await forged.get("/api/v1/workflow-runs"), 401, "not a valid key")
        assert_problem(await bad.get("/api/v1/workflow-runs"), 401, "not a valid key")
    async with api.http(other_tenant) as globex:  # a key of another tenant sees only its own tenant's runs
        assert (await globex.get("/api/v1/workflow-runs")).json()["items"] == [] or all(
            row["tenant"] == "globex" for row in (await globex.get("/api/v1/workflow-runs")).json()["items"])
        assert_problem(await globex.get("/api/v1/workflow-runs", headers={"X-Tenant-ID": "default"}), 403)


async def test_nats_failures_are_503(api: Api, harness: Harness, principals: Any, tmp_path: Any) -> None:
    client = await Client.connect(harness.url, creds=principals.service("api"), name="api-closed")
    server = ApiServer(ApiSettings(port=0, session_secret_file=tmp_path / "s.secret"), client=client)
    url = await server.start()
    try:
        await client.close()
        async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": await api.key("admin")}) as http:
            assert_problem(await http.get("/api/v1/workflow-runs"), 503, "NATS")
    finally:
        await server.stop()


def _fill(path: str) -> str:
    return (path.replace("{workflow_id}", "no-such-workflow").replace("{run_id}", "no-such-run")
            .replace("{step_id}", "s").replace("{key_id}", "000000000000").replace("{topic}", "no.such.topic"))


async def test_every_role_may_do_exactly_what_the_table_says(api: Api) -> None:
    table = route_actions()
    assert set(table.values()) == set(Action) and len(table) >= 25
    for role, actions in ROLE_ACTIONS.items():
        async with api.http(await api.key(role)) as http:
            for (method, path), action in sorted(table.items()):
                if path.endswith("/events"):
                    continue  # a stream: checked by the SSE test; its action is READ like the other reads
                # a body no route accepts: an allowed call stops at validation (422) and changes nothing
                body = {"zz_unexpected": 1} if method == "POST" else None
                r = await http.request(method, _fill(path), json=body)
                if action in actions:
                    assert r.status_code not in (401, 403), (role, method, path, r.text)
                    assert r.status_code < 500, (role, method, path, r.text)
                else:
                    assert_problem(r, 403, role)
    assert table[("GET", "/api/v1/workflow-runs/{run_id}/events")] is Action.READ


async def test_api_keys_through_the_api_and_revocation(api: Api) -> None:
    async with api.http(await api.key("admin")) as http:
        created = await http.post("/api/v1/api-keys", json={"role": "viewer", "principal": unique("bob")})
        assert created.status_code == 201, created.text
        key, key_id = created.json()["key"], created.json()["record"]["key_id"]
        listed = (await http.get("/api/v1/api-keys")).json()["items"]
        assert key_id in [k["key_id"] for k in listed] and all("sha256" not in k and "key" not in k for k in listed)
        assert_problem(await http.post("/api/v1/api-keys", json={"role": "root"}), 422, "role")
        async with api.http(key) as viewer:
            assert (await viewer.get("/api/v1/workflow-runs")).status_code == 200
            assert (await http.delete(f"/api/v1/api-keys/{key_id}")).json()["revoked_at"]

            async def refused() -> bool:
                return (await viewer.get("/api/v1/workflow-runs")).status_code == 401

            await until(refused, timeout=10, what="the revoked key's refusal")
        assert_problem(await http.delete("/api/v1/api-keys/000000000000"), 404)


async def test_console_session_needs_csrf_for_unsafe_methods(api: Api) -> None:
    key = await api.key("operator")
    async with api.http() as browser:
        assert_problem(await browser.post("/console/login", data={"api_key": "wrong"}), 401, "api_key")
        r = await browser.post("/console/login", data={"api_key": key})
        assert r.status_code == 200, r.text
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        csrf = r.json()["csrf_token"]
        assert (await browser.get("/api/v1/workflow-runs")).status_code == 200
        unsafe = "/api/v1/workflow-runs/no-such-run/cancel"
        assert_problem(await browser.post(unsafe, json={}), 403, "CSRF")
        assert_problem(await browser.post(unsafe, json={}, headers={"X-CSRF-Token": "forged"}), 403, "CSRF")
        passed = await browser.post(unsafe, json={}, headers={"X-CSRF-Token": csrf})
        assert passed.status_code not in (401, 403), passed.text
        redirect = await browser.post("/console/login", data={"api_key": key, "next": "/runs"})
        assert redirect.status_code == 303 and redirect.headers["location"] == "/runs"
        assert (await browser.post("/console/logout")).status_code == 204
        browser.cookies.clear()
        assert_problem(await browser.get("/api/v1/workflow-runs"), 401)


async def test_openapi_is_3_1_with_docs(api: Api) -> None:
    async with api.http() as http:
        doc = (await http.get("/openapi.json")).json()
        assert doc["openapi"].startswith("3.1")
        start = doc["paths"]["/api/v1/workflows/{workflow_id}/runs"]["post"]
        assert {"201", "200", "404", "422"} <= set(start["responses"])
        assert "application/problem+json" in start["responses"]["404"]["content"]
        assert (await http.get("/docs")).status_code == 200


async def test_apply_workflow_as_yaml(api: Api) -> None:
    wf = unique("api-yaml")
    async with api.http(await api.key("admin")) as http:
        source = plain(wf, unique("t")).encode()
        first = await http.post("/api/v1/workflows", content=source, headers={"content-type": "application/yaml"})
        assert first.status_code == 201 and first.json() == {"workflow_id": wf, "version": "1", "created": True}
        again = await http.post("/api/v1/workflows", content=source, headers={"content-type": "application/yaml"})
        assert again.status_code == 200 and again.json()["created"] is False
        changed = source.replace(b"steps.a.output.n", b"input.n")
        assert_problem(await http.post("/api/v1/workflows", content=changed,
                                       headers={"content-type": "application/yaml"}), 409, "bump the version")


async def test_a_workflow_with_new_trigger_subjects_needs_an_admin_credential(api: Api) -> None:
    wf = unique("api-trig")
    source = plain(wf, unique("t")).replace("steps:", f"triggers: [api-test.{wf}]\nsteps:")
    async with api.http(await api.key("admin")) as http:
        refused = await http.post("/api/v1/workflows", json={"source": source})
        assert_problem(refused, 409, "admin credential", f"api-test.{wf}")
        assert_problem(await http.get(f"/api/v1/workflows/{wf}/versions"), 404)  # nothing was written
        await api.admin.apply_workflow(source)  # an admin adds the subject to the stream
        again = await http.post("/api/v1/workflows", json={"source": source})
        assert again.status_code == 200 and again.json()["created"] is False, again.text


async def test_policy_routes(api: Api, harness: Harness) -> None:
    wf, topic = unique("api-pol"), unique("api-t")
    async with api.http(await api.key("policy-admin")) as policy, api.http(await api.key("admin")) as admin, \
            api.http(await api.key("viewer")) as viewer:
        await apply(api, admin, plain(wf, topic))
        versions = (await viewer.get(f"/api/v1/workflows/{wf}/versions")).json()
        assert versions == {"workflow_id": wf, "versions": ["1"], "latest": "1"}
        assert wf in [w["workflow_id"] for w in (await viewer.get("/api/v1/workflows")).json()]
        decision = (await viewer.post("/api/v1/policy/eval", json={"workflow_id": wf, "step_id": "a",
                                                                   "input": {"n": 1}})).json()
        assert decision["decision"] in ("allow", "deny", "require_approval") and decision["explain"] == []
        explained = (await viewer.post("/api/v1/policy/explain", json={"workflow_id": wf, "step_id": "a"})).json()
        assert explained["explain"] and explained["decision"] == decision["decision"]
        assert_problem(await viewer.post("/api/v1/policy/eval", json={"workflow_id": wf, "step_id": "zz"}), 404, "zz")
        active = (await viewer.get("/api/v1/policy")).json()
        # publish the active source again as a new version, then roll back: the policy in force is unchanged
        version = unique("v1")
        published = await policy.post("/api/v1/policy/publish", json={"source": active["source"], "version": version})
        assert published.status_code == 200, published.text
        assert published.json()["version"] == version and published.json()["published_by"].startswith("key-")
        assert version in [r["version"] for r in (await viewer.get("/api/v1/policy/history")).json()]
        simulated = await policy.post("/api/v1/policy/simulate", json={"source": active["source"], "limit": 20})
        assert simulated.status_code == 200 and simulated.json()["changes"] == []
        rolled = await policy.post("/api/v1/policy/rollback", json={})
        if active["builtin"]:  # nothing was published before: nothing to roll back to
            assert rolled.status_code in (200, 409), rolled.text
        else:
            assert rolled.status_code == 200 and rolled.json()["snapshot_id"] == active["snapshot_id"], rolled.text
        assert_problem(await policy.post("/api/v1/policy/publish", json={"source": "permit(oops"}), 409, "policy")
        assert_problem(await viewer.post("/api/v1/policy/publish", json={"source": "x"}), 403, "viewer")


async def test_first_api_key_is_created_once_and_kept_0600(harness: Harness, tmp_path: Any,
                                                           identity_home: Any) -> None:
    from interlock.devstack.stack import Stack

    stack = Stack(home=tmp_path, nats_url=harness.url, identity_dir=identity_home.root, tenant="default")
    key, path = await stack.first_api_key()
    assert key is not None and path.read_text().strip() == key and path.stat().st_mode & 0o777 == 0o600
    again, same = await stack.first_api_key()
    assert again is None and same == path and path.read_text().strip() == key


async def test_cli_apikeys_create_list_revoke(api: Api, harness: Harness) -> None:
    from tests.integration.test_cli import cli

    principal = unique("carol")
    created = await cli(harness, "apikeys", "create", "--tenant", "default", "--role", "approver",
                        "--principal", principal)
    assert created.exit_code == 0, created.output
    key = created.output.strip().splitlines()[-1]
    assert key.startswith("ilk_")
    record = await api.client.check_api_key(key)
    assert record is not None and (record.role, record.principal) == ("approver", principal)
    listed = await cli(harness, "apikeys", "list", "-o", "json")
    assert record.key_id in listed.output and key not in listed.output and record.sha256 not in listed.output
    bad = await cli(harness, "apikeys", "create", "--role", "root")
    assert bad.exit_code == 2 and "unknown role 'root'" in bad.output
    revoked = await cli(harness, "apikeys", "revoke", record.key_id)
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    assert any(r.key_id == record.key_id and r.revoked_at for r in await api.admin.api_keys())


async def test_a_run_started_with_a_priority_carries_it_and_queues_are_listed(api: Api, harness: Harness) -> None:
    wf, topic = unique("api-prio"), unique("api-t")
    admin_key = await api.key("admin")
    async with api.http(admin_key, **{"X-Tenant-ID": "default"}) as http:
        await apply(api, http, f"id: {wf}\nversion: 1\nsteps:\n  work: {{topic: {topic}}}\n")
        bad = await http.post(f"/api/v1/workflows/{wf}/runs", json={"input": {}, "priority": 6})
        assert_problem(bad, 422, "priority")
        r = await http.post(f"/api/v1/workflows/{wf}/runs", json={"input": {}, "priority": 5})
        assert r.status_code == 201, r.text
        run_id = r.json()["run_id"]
        events = await harness.wait_for(run_id, lambda evs: "StepDispatched" in types(evs))
        assert events[0]["data"]["priority"] == 5
        # nobody serves the topic: its job waits in the queue
        queues = await until(lambda: _queued(http, topic), what="the job counted in its topic's queue")
        assert queues[topic] == 1


async def _queued(http: httpx.AsyncClient, topic: str) -> dict[str, int] | None:
    r = await http.get("/api/v1/queues")
    assert r.status_code == 200, r.text
    return r.json() if r.json().get(topic) else None
