"""Sealed values: the envelope codec, which values are sensitive, the keyring, and the workflow rules."""

from __future__ import annotations

import base64
import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest

from interlock.core import sealed
from interlock.core.sealed import (
    REDACTED,
    SEALED,
    DataKeyDestroyed,
    DataKeyMissing,
    Header,
    SealedInvalid,
    SensitiveRules,
    key_matches,
)
from interlock.core.workflow import WorkflowInvalid, format_problems, load_workflow, render_input, render_text
from interlock.runtime.datakeys import DataKeyError, DataKeyring, PayloadSealer

KEY = bytes(range(32))
HEAD = Header(kid="k1", tenant="acme", run="run-1")


@pytest.mark.parametrize("value", ["s3cr3t-value", 42, 1.5, True, None, ["a", 1], {"nested": {"x": "é"}}])
def test_seal_then_open_gives_the_value_back(value: Any) -> None:
    envelope = sealed.seal(KEY, HEAD, value)
    assert sealed.is_sealed(envelope)
    assert sealed.open_sealed(KEY, envelope) == value


def test_envelope_names_key_tenant_run_and_hides_the_value() -> None:
    envelope = sealed.seal(KEY, HEAD, "hunter2-clear")
    body = envelope[SEALED]
    assert set(body) == {"v", "alg", "kid", "tenant", "run", "nonce", "ct"}
    head = (body["v"], body["alg"], body["kid"], body["tenant"], body["run"])
    assert head == (1, "AES-256-GCM", "k1", "acme", "run-1")
    assert len(base64.b64decode(body["nonce"])) == 12
    assert b"hunter2" not in json.dumps(envelope).encode()
    # a fresh nonce every time: the same value seals differently
    assert sealed.seal(KEY, HEAD, "hunter2-clear")[SEALED]["ct"] != body["ct"]


@pytest.mark.parametrize("field,value", [("tenant", "other"), ("run", "run-2"), ("kid", "k2")])
def test_the_header_is_authenticated(field: str, value: str) -> None:
    envelope = sealed.seal(KEY, HEAD, "v")
    moved = copy.deepcopy(envelope)
    moved[SEALED][field] = value
    with pytest.raises(SealedInvalid, match="does not authenticate"):
        sealed.open_sealed(KEY, moved)


def test_altered_ciphertext_or_wrong_key_is_refused() -> None:
    envelope = sealed.seal(KEY, HEAD, "v")
    ct = bytearray(base64.b64decode(envelope[SEALED]["ct"]))
    ct[0] ^= 1
    altered = copy.deepcopy(envelope)
    altered[SEALED]["ct"] = base64.b64encode(bytes(ct)).decode()
    with pytest.raises(SealedInvalid):
        sealed.open_sealed(KEY, altered)
    with pytest.raises(SealedInvalid):
        sealed.open_sealed(bytes(32), envelope)
    bad = copy.deepcopy(envelope)
    bad[SEALED]["nonce"] = "not base64!"
    with pytest.raises(SealedInvalid, match="nonce"):
        sealed.open_sealed(KEY, bad)


def test_redact_replaces_every_envelope_and_leaves_the_rest() -> None:
    envelope = sealed.seal(KEY, HEAD, "v")
    value = {"a": 1, "b": [envelope, {"c": envelope}], "d": "x"}
    assert sealed.redact(value) == {"a": 1, "b": [REDACTED, {"c": REDACTED}], "d": "x"}
    plain = {"a": [1, 2]}
    assert sealed.redact(plain) is plain
    assert not sealed.is_sealed({SEALED: {}, "other": 1})


@pytest.mark.parametrize("name", ["api_key", "API_KEY", "X-Api-Key", "password", "db_password", "secret",
                                  "client_secret", "token", "access_token", "Authorization"])
def test_default_patterns_match_sensitive_key_names(name: str) -> None:
    assert key_matches(name, sealed.DEFAULT_SENSITIVE_KEYS)


@pytest.mark.parametrize("name", ["tokens", "max_tokens", "input_tokens", "secretary", "host", "keyword", "pass"])
def test_default_patterns_leave_ordinary_names_alone(name: str) -> None:
    assert not key_matches(name, sealed.DEFAULT_SENSITIVE_KEYS)


def test_glob_patterns() -> None:
    assert key_matches("my_passphrase", ["*pass*"])
    assert not key_matches("host", ["*pass*"])


def test_seal_tree_by_path_and_by_key_name() -> None:
    rules = SensitiveRules(paths=frozenset({"input.credentials.user", "input.list.pin"}))
    value = {"credentials": {"user": "u1", "api_key": "k1", "note": None, "password": None},
             "list": [{"pin": 1, "n": 2}, {"pin": 3}], "plain": "p", "tokens": 7}
    out = rules.seal_tree(value, "input", lambda clear: {SEALED: {"clear": clear}})
    assert out == {"credentials": {"user": {SEALED: {"clear": "u1"}}, "api_key": {SEALED: {"clear": "k1"}},
                                   "note": None, "password": None},
                   "list": [{"pin": {SEALED: {"clear": 1}}, "n": 2}, {"pin": {SEALED: {"clear": 3}}}],
                   "plain": "p", "tokens": 7}
    # already sealed values are left as they are: sealing twice changes nothing
    assert rules.seal_tree(out, "input", lambda clear: pytest.fail("sealed twice")) == out
    assert not rules.needs_sealing(out, "input")
    assert rules.needs_sealing(value, "input")
    assert SensitiveRules(paths=frozenset({"output"})).seal_tree([1], "output", lambda c: {SEALED: {"all": c}}) \
        == {SEALED: {"all": [1]}}


# -- keyring -------------------------------------------------------------------------------------
def test_keyring_file_is_created_0600_rotates_and_forgets(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "data-keys.json"
    sealer = PayloadSealer(DataKeyring(path))
    first = sealer.seal_value("acme", "r1", "value-one")
    assert path.stat().st_mode & 0o777 == 0o600
    kid1 = sealer.keyring.tenants()["acme"]["active"]
    kid2 = DataKeyring(path).rotate("acme")  # another process: this one sees it on its next use
    assert kid2 != kid1
    second = sealer.seal_value("acme", "r1", "value-two")
    assert second[SEALED]["kid"] == kid2
    assert sealer.open("acme", first) == "value-one"  # the old key still reads
    assert sealer.open("acme", second) == "value-two"
    other = sealer.seal_value("globex", "r9", "theirs")
    with pytest.raises(SealedInvalid, match="of tenant globex reached tenant acme"):
        sealer.open("acme", other)

    assert sorted(DataKeyring(path).forget("acme")) == sorted([kid1, kid2])
    for envelope in (first, second):
        with pytest.raises(DataKeyDestroyed, match="data key destroyed"):
            sealer.open("acme", envelope)
    with pytest.raises(DataKeyDestroyed, match="was forgotten"):
        sealer.seal_value("acme", "r2", "new")
    assert sealer.open("globex", other) == "theirs"  # other tenants are untouched
    assert "value" not in path.read_text() and base64.b64encode(KEY).decode() not in path.read_text()
    DataKeyring(path).rotate("acme")  # a forgotten tenant gets a key only when asked
    assert sealer.open_tree("acme", {"a": sealer.seal_value("acme", "r3", "back")}) == {"a": "back"}


def test_keyring_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "data-keys.json"
    DataKeyring(path).rotate("acme")
    os.chmod(path, 0o644)
    with pytest.raises(DataKeyError, match=r"readable by others.*chmod 600"):
        DataKeyring(path).active("acme")


def test_inline_keyring_is_read_only_and_never_creates_keys(tmp_path: Path) -> None:
    path = tmp_path / "data-keys.json"
    DataKeyring(path).rotate("acme")
    ring = DataKeyring(inline=path.read_text())
    kid, key = ring.active("acme")
    assert len(key) == 32 and kid
    with pytest.raises(DataKeyMissing, match="no data key for tenant globex"):
        ring.active("globex")
    with pytest.raises(DataKeyError, match="read-only"):
        ring.rotate("acme")
    with pytest.raises(DataKeyError, match="not JSON"):
        DataKeyring(inline="{nope")


# -- workflows -----------------------------------------------------------------------------------
WORKFLOW = """\
id: creds
version: 1
sensitive:
  - input.credentials.api_key
  - steps.fetch.output.session
steps:
  fetch:
    topic: creds.fetch
    input: {key: "{{ input.credentials.api_key }}"}
  use:
    topic: creds.use
    depends_on: [fetch]
    input: {session: "{{ steps.fetch.output.session }}"}
"""


def test_sensitive_paths_are_kept_and_hash_is_unchanged_without_them() -> None:
    wf = load_workflow(WORKFLOW)
    assert wf.sensitive_paths("input") == {"input.credentials.api_key"}
    assert wf.sensitive_output_paths("fetch") == ("output.session",)
    assert wf.sensitive_output_paths("use") == ()
    declared = "sensitive:\n  - input.credentials.api_key\n  - steps.fetch.output.session\n"
    without = load_workflow(WORKFLOW.replace(declared, ""))
    assert without.content_hash != wf.content_hash
    assert not without.sensitive
    # a definition without `sensitive` hashes as it did before the field existed (registered
    # versions stay equal to their files): this hash was computed by the code before it
    plain = load_workflow("id: plain\nversion: 1\nsteps:\n  a: {topic: x.y, input: {n: 1}}\n")
    assert plain.content_hash == "9ccef16d095a576d0b1c465ba1655fccb59db488459390e2cfaa04abb93a91f6"


def _problems(text: str) -> list[str]:
    with pytest.raises(WorkflowInvalid) as e:
        load_workflow(text)
    return format_problems(e.value.problems, "wf.yaml").splitlines()


def test_bad_sensitive_paths_are_reported_with_their_line() -> None:
    text = WORKFLOW.replace("  - steps.fetch.output.session\n",
                            "  - steps.fetch.output.session\n  - steps.nope.output.x\n  - 'input.{{ x }}'\n")
    problems = _problems(text)
    assert "wf.yaml:6: sensitive[2]: unknown step 'nope' in 'steps.nope.output.x'" in problems
    assert any(p.startswith("wf.yaml:7: sensitive[3]: invalid sensitive path") for p in problems), problems


@pytest.mark.parametrize("template", ["Bearer {{ input.credentials.api_key }}", "{{ input.password }} and more",
                                      "x{{ steps.fetch.output.session }}", "{{ input.credentials }}!"])
def test_interpolating_a_sensitive_value_into_a_string_is_refused(template: str) -> None:
    text = WORKFLOW.replace('input: {session: "{{ steps.fetch.output.session }}"}', f'input: {{s: "{template}"}}')
    problems = _problems(text)
    assert len(problems) == 1, problems
    assert problems[0].startswith("wf.yaml:13: steps.use.input.s: ") and "cannot be interpolated" in problems[0]


def test_templates_pass_envelopes_whole_and_redact_them_in_text() -> None:
    envelope = sealed.seal(KEY, HEAD, "clear")
    context = {"input": {"api_key": envelope, "name": "n"}}
    assert render_input({"k": "{{ input.api_key }}"}, context) == {"k": envelope}
    assert render_text("key={{ input.api_key }} all={{ input }}", context) == \
        "key=[sensitive] all={'api_key': '[sensitive]', 'name': 'n'}"
