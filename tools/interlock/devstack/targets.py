"""Loading a worker target (``module:object`` or ``path/to/file.py:object``), for ``interlock
worker`` and for the stack, which issues each worker a credential for the topics it serves."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any


class TargetError(ValueError):
    """The target cannot be loaded (str: one line)."""


def load_target(target: str) -> Any:
    """``module:object`` or ``path/to/file.py:object`` (object defaults to ``worker``)."""
    module_name, _, attr = target.partition(":")
    attr = attr or "worker"
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise TargetError(f"{module_name}: no such file")
        spec = importlib.util.spec_from_file_location(path.stem.replace("-", "_"), path)
        if spec is None or spec.loader is None:
            raise TargetError(f"{module_name}: cannot load it as a module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise TargetError(f"cannot import {module_name}: {e}") from None
    if not hasattr(module, attr):
        raise TargetError(f"{module_name} has no attribute {attr!r}")
    return getattr(module, attr)


def worker_topics(target: str) -> tuple[str, ...]:
    """The job topics the worker at ``target`` serves (sorted)."""
    from interlock.worker import Worker

    loaded = load_target(target)
    if not isinstance(loaded, Worker):
        raise TargetError(f"{target} is not an interlock.worker.Worker")
    if not loaded.handlers:
        raise TargetError(f"worker {target} has no job handlers")
    return tuple(sorted(loaded.handlers))
