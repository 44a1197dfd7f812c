"""``interlock.devstack``: Interlock on one machine for development, demos and drills.

``stack`` runs embedded NATS (or a local ``cluster``), the five services and workers as
processes; ``demo`` and ``drill`` drive them through :mod:`interlock.client`. The example
workflow and its agents ship as package data (:func:`example_file`), so they work from an
installed wheel as well as from a checkout.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

EXAMPLE = "incident-remediation"


def example_file(name: str, example: str = EXAMPLE) -> Path:
    """A file of a bundled example (``workflow.yaml``, ``agents.py``), as a path on disk.

    Workers load ``agents.py`` by path in another process, so the example must be a real file:
    true for a checkout and for an installed (unzipped) wheel.
    """
    path = Path(str(files(__name__).joinpath("examples", example, name)))
    if not path.is_file():
        raise FileNotFoundError(f"example file {example}/{name} is missing from the installed package ({path})")
    return path
