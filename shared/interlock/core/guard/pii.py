"""Personal data: e-mail addresses, IBANs and payment card numbers.

Candidates are found by documented patterns and confirmed with ``python-stdnum``: an IBAN by
its ISO 13616 check digits (mod 97), a card number by its length and the Luhn checksum, so an
order number or a random digit run is not reported. E-mail addresses follow the WHATWG HTML
"valid e-mail address" grammar (what browsers accept), requiring a dot in the domain.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from stdnum import iban, luhn

from ._text import Match

# https://html.spec.whatwg.org/multipage/input.html#valid-e-mail-address (plus: a dotted domain)
EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+")
# two letters, two check digits, then up to 30 letters/digits, optionally grouped by spaces
IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}(?: ?[A-Za-z0-9]){11,30}(?![A-Za-z0-9])")
# 13 to 19 digits, optionally grouped by single spaces or dashes
CARD = re.compile(r"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])")


def find_pii(text: str, path: str, kinds: tuple[str, ...]) -> Iterator[Match]:
    """The personal data of ``kinds`` (``email``, ``iban``, ``credit_card``) in ``text``."""
    if "email" in kinds:
        for m in EMAIL.finditer(text):
            yield Match("email", path, m.start(), m.end(), m.group())
    if "iban" in kinds:
        for m in IBAN.finditer(text):
            if iban.is_valid(m.group()):
                yield Match("iban", path, m.start(), m.end(), m.group())
    if "credit_card" in kinds:
        for m in CARD.finditer(text):
            digits = re.sub(r"[ -]", "", m.group())
            if 13 <= len(digits) <= 19 and luhn.is_valid(digits):
                yield Match("credit_card", path, m.start(), m.end(), m.group())
