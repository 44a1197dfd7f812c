"""``.creds`` files: a user JWT and its seed in the decorated format every NATS client reads."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from interlock.contracts import permissions
from interlock.identity._jwt import JwtError, Permissions, decode
from interlock.identity._keys import KeyKind, NKey

_BLOCK = re.compile(r"-{3,}[^\n]*-{3,}\r?\n([\w\-.=]+)\r?\n-{3,}[^\n]*-{3,}")


class CredsError(ValueError):
    """A creds file is missing, unreadable or not in the NATS format."""


def format_creds(jwt: str, seed: bytes) -> str:
    """The text of a ``.creds`` file (the layout nats-io/jwt ``FormatUserConfig`` writes)."""
    if not seed.startswith(b"SU"):
        raise CredsError("a creds file holds a user seed (SU…)")
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{jwt}\n"
        "------END NATS USER JWT------\n"
        "\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n"
        "\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed.decode()}\n"
        "------END USER NKEY SEED------\n"
        "\n"
        "*************************************************************\n"
    )


def write_private(path: Path, text: str | bytes) -> None:
    """Write a secret file atomically with mode 0600 (created so; never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode() if isinstance(text, str) else text
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)  # the umask cannot widen it, but an existing tmp could have other bits
    os.replace(tmp, path)


def write_creds(path: Path, jwt: str, seed: bytes) -> Path:
    """Write a ``.creds`` file with mode 0600; return its path."""
    write_private(path, format_creds(jwt, seed))
    return path


def read_creds(path: Path) -> tuple[str, NKey]:
    """The user JWT and key pair from a ``.creds`` file."""
    try:
        text = path.read_text()
    except OSError as e:
        raise CredsError(f"{path}: cannot read creds file ({e.strerror})") from None
    blocks = _BLOCK.findall(text)
    if len(blocks) < 2:
        raise CredsError(f"{path}: not a NATS creds file (want a USER JWT block and a USER NKEY SEED block)")
    try:
        key = NKey.from_seed(blocks[1], expect=KeyKind.USER)
    except ValueError as e:
        raise CredsError(f"{path}: {e}") from None
    return blocks[0], key


def creds_inbox_prefix(path: Path) -> str:
    """The inbox prefix a process holding only this ``.creds`` file must connect with
    (``nats.connect(..., user_credentials=path, inbox_prefix=creds_inbox_prefix(path))``):
    every credential may subscribe only to its own inboxes, named by its user key."""
    _, key = read_creds(path)
    return permissions.inbox_prefix(key.public_key)


def creds_permissions(path: Path) -> Permissions:
    """The permissions in a ``.creds`` file's user JWT, e.g. to refuse an action at once with a
    clear message (``allows_publish``) instead of waiting for the server to drop it."""
    token, _ = read_creds(path)
    try:
        claims = decode(token, expect="user")
    except JwtError as e:
        raise CredsError(f"{path}: {e}") from None
    return Permissions.from_claims(claims["nats"])
