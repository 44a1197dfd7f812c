"""Guard checks on step outputs: pure functions of a :class:`~interlock.core.workflow.Guard`
and a value.

:func:`check` runs every check the guard configures and returns one :class:`Verdict` per check
(the dispatcher records each as a ``GuardChecked`` event); :func:`redact` replaces what the
checks found with ``[redacted:KIND]``. Findings name the kind of thing found and where (path and
offsets), never the text: a secret found in an output does not reach the log through its report.
"""

from ._check import SECRET_KINDS, Outcome, Verdict, check, outcome, redact, summary
from ._text import Match
from .injection import find_injection
from .pii import find_pii
from .secrets import find_secrets

__all__ = [
    "SECRET_KINDS",
    "Match",
    "Outcome",
    "Verdict",
    "check",
    "find_injection",
    "find_pii",
    "find_secrets",
    "outcome",
    "redact",
    "summary",
]
