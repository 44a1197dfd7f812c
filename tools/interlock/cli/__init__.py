"""``interlock``, the command line: noun-verb groups (``interlock run start``, ``interlock approval
approve``, …) over :mod:`interlock.client`, plus the process commands (``up``, ``serve``, ``worker``).

The public surface is :data:`app` (the Typer application) and :func:`main` (the entry point).
"""

from __future__ import annotations

from interlock.cli._app import app, main

__all__ = ["app", "main"]
