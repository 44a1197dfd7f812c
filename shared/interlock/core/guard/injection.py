"""A prompt-injection heuristic for text that will be fed to a model.

Each pattern is a phrasing seen in published injection and jailbreak examples (OWASP Top 10 for
LLM Applications, LLM01 "Prompt Injection"; the "ignore previous instructions" family; role and
chat-template markers smuggled into data). A match means "this text tries to instruct the model",
not proof of an attack: pair it with ``on_violation: approve`` where false positives hurt. Text
is normalised first (Unicode NFKC, zero-width characters removed) so that look-alike
characters and hidden joiners do not slip through.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator

from ._text import Match

_ANY = r"(?:all|any|the|your|my|these|those|every)?\s*"
_PRIOR = r"(?:previous|prior|preceding|above|earlier|foregoing|original|initial|system)"
_RULES = r"(?:instructions?|prompts?|rules|directions|guidelines|context|messages?|constraints)"

#: (name, regex): the name appears in findings as ``injection:NAME``.
_SOURCES: tuple[tuple[str, str], ...] = (
    ("ignore_instructions", rf"\b(?:ignore|disregard|forget|skip|override|bypass)\s+{_ANY}(?:of\s+)?{_ANY}{_PRIOR}?\s*"
                            rf"{_RULES}"),
    ("new_instructions", r"\b(?:new|updated|real|actual)\s+(?:system\s+)?instructions?\s*(?::|are\b|follow\b)"),
    ("role_override", r"\byou\s+are\s+(?:now|no\s+longer)\b|\bfrom\s+now\s+on,?\s+you\s+(?:are|will|must)\b"
                      r"|\bpretend\s+(?:to\s+be|you\s+are)\b|\bact\s+as\s+(?:if\s+you\s+(?:are|were)|an?\s+"
                      r"(?:unrestricted|unfiltered|jailbroken))"),
    ("reveal_prompt", r"\b(?:reveal|print|show|repeat|output|leak|tell\s+me)\s+(?:me\s+)?(?:your|the)\s+"
                      r"(?:(?:initial|hidden|secret|original)\s+)?(?:system\s+)?(?:prompt|instructions)"),
    ("jailbreak", r"\b(?:jailbreak|jailbroken|do\s+anything\s+now|developer\s+mode\s+(?:enabled|on)|DAN\s+mode)\b"),
    ("chat_markup", r"<\|(?:im_start|im_end|system|user|assistant|endoftext|eot_id|start_header_id)\|>"
                    r"|\[/?INST\]|<</?SYS>>|^\s*#{2,}\s*(?:system|instruction)s?\s*:?\s*$"),
    ("exfiltrate", r"\b(?:send|post|upload|forward|exfiltrate)\s+(?:all\s+|the\s+|your\s+)*(?:data|secrets?|"
                   r"credentials|api\s+keys?|passwords?|conversation)\s+to\b"),
)
PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(source, re.IGNORECASE | re.MULTILINE)) for name, source in _SOURCES)

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))


def normalise(text: str) -> str:
    """NFKC, zero-width characters dropped. Offsets refer to this form when it differs."""
    return unicodedata.normalize("NFKC", text).translate(_ZERO_WIDTH)


def find_injection(text: str, path: str) -> Iterator[Match]:
    """Phrases in ``text`` that try to instruct a model. When normalising changed the text, the
    offsets of the normalised form do not fit the original: the whole string is the span."""
    clean = normalise(text)
    for name, pattern in PATTERNS:
        for m in pattern.finditer(clean):
            if clean == text:
                yield Match(f"injection:{name}", path, m.start(), m.end(), m.group())
            else:
                yield Match(f"injection:{name}", path, 0, len(text), text)
