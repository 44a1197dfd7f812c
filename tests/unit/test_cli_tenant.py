"""``interlock tenant keys rotate|list`` and ``interlock tenant forget`` on a keyring file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from interlock.cli import app
from interlock.core.sealed import DataKeyDestroyed
from interlock.runtime.datakeys import DataKeyring, PayloadSealer


def _cli(*args: str, input: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), input=input)
    return result.exit_code, result.output


def test_rotate_list_and_forget(tmp_path: Path) -> None:
    keys = str(tmp_path / "data-keys.json")
    code, out = _cli("tenant", "keys", "rotate", "acme", "--keys-file", keys)
    assert code == 0 and "tenant acme: new active data key k" in out
    first = DataKeyring(Path(keys)).tenants()["acme"]["active"]
    envelope = PayloadSealer(DataKeyring(Path(keys))).seal_value("acme", "r", "clear")
    code, out = _cli("tenant", "keys", "rotate", "acme", "--keys-file", keys)
    second = DataKeyring(Path(keys)).tenants()["acme"]["active"]
    assert code == 0 and second in out and second != first

    code, out = _cli("tenant", "keys", "list", "--keys-file", keys, "-o", "json")
    assert code == 0
    (row,) = json.loads(out)
    assert row["tenant"] == "acme" and row["active"] == second and sorted(row["keys"]) == sorted([first, second])
    assert "clear" not in out and "=" not in "".join(row["keys"])  # ids only, never key material

    code, out = _cli("tenant", "forget", "acme", "--keys-file", keys, input="n\n")
    assert code == 1 and "Destroy every data key of tenant acme" in out  # refused at the prompt: nothing gone
    assert DataKeyring(Path(keys)).tenants()["acme"]["active"] == second
    code, out = _cli("tenant", "forget", "acme", "--keys-file", keys, "--yes")
    assert code == 0 and "tenant acme: destroyed 2 data key(s)" in out
    with pytest.raises(DataKeyDestroyed, match="data key destroyed"):
        PayloadSealer(DataKeyring(Path(keys))).open("acme", envelope)


def test_a_bad_tenant_name_is_a_usage_error(tmp_path: Path) -> None:
    code, out = _cli("tenant", "keys", "rotate", "a.b", "--keys-file", str(tmp_path / "k.json"))
    assert code == 2 and "tenant" in out
