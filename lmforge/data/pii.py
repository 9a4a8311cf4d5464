"""PII redaction: e-mail addresses, phone numbers, IPv4/IPv6 addresses, credit-card numbers (Luhn
checksum) and IBANs (ISO 13616 mod-97 check) are replaced by tokens; counts go to the document's
`metadata["pii"]` and to the report.

Checksums keep precision high: a 16-digit order number that fails Luhn, or a string shaped like an
IBAN whose mod-97 remainder is not 1, is left alone. Detection follows the regexes of BigScience's
ROOTS and StarCoder PII pipelines in spirit; thresholds and tokens are configurable.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass, field

from lmforge.core.config import option
from lmforge.data.readers import Document
from lmforge.data.steps import Step

EMAIL_RE = re.compile(r"(?<![\w.+-])[\w.+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])")
CARD_RE = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
IBAN_RE = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
IPV4_RE = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
IPV6_RE = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
PHONE_RE = re.compile(  # +CC prefix (free grouping) | (area) local | grouped digits with separators
    r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)|\d{1,4})[ .-]?\d{3,4}[ .-]?\d{3,4}"
    r"|\(\d{2,4}\)[ .-]?\d{3,4}[ .-]\d{3,4}|\d{2,4}[ .-]\d{3,4}[ .-]\d{3,4})(?![ .-]?\d)(?!\w)")


def luhn_ok(digits: str) -> bool:
    """Luhn checksum: double every second digit from the right; the sum must be a multiple of 10."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters to 10..35; the number mod 97 is 1."""
    s = iban.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _ip_ok(text: str) -> bool:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    # "::" and "::1" are valid IPv6 but, in text, mostly code or grammar ("a::b", "::="): want two hex groups
    return ip.version == 4 or sum(1 for g in text.split(":") if g) >= 2


@dataclass
class PIIRedactor(Step):
    """Replace PII with tokens; kinds to detect and their tokens are parameters."""

    name = "pii"
    modifies = True
    kinds: list[str] = option(default_factory=lambda: ["email", "credit_card", "iban", "ip", "phone"],
                              help="what to redact, in this order")
    email_token: str = option("<EMAIL>", help="replacement for e-mail addresses")
    phone_token: str = option("<PHONE>", help="replacement for phone numbers")
    ip_token: str = option("<IP>", help="replacement for IPv4/IPv6 addresses")
    credit_card_token: str = option("<CREDIT_CARD>", help="replacement for Luhn-valid card numbers")
    iban_token: str = option("<IBAN>", help="replacement for mod-97-valid IBANs")
    _counts: Counter = field(default_factory=Counter, init=False, repr=False)

    def redact(self, text: str) -> tuple[str, Counter]:
        counts: Counter = Counter()

        def sub(kind: str, pattern: re.Pattern, token: str, valid=None) -> None:
            nonlocal text

            def repl(m: re.Match) -> str:
                if valid is not None and not valid(m.group(0)):
                    return m.group(0)
                counts[kind] += 1
                return token

            text = pattern.sub(repl, text)

        for kind in self.kinds:
            if kind == "email" and "@" in text:
                sub("email", EMAIL_RE, self.email_token)
            elif kind == "credit_card":
                sub("credit_card", CARD_RE, self.credit_card_token,
                    lambda s: luhn_ok(re.sub(r"\D", "", s)) and 13 <= len(re.sub(r"\D", "", s)) <= 19)
            elif kind == "iban":
                sub("iban", IBAN_RE, self.iban_token, iban_ok)
            elif kind == "ip":
                sub("ip", IPV4_RE, self.ip_token, _ip_ok)
                if ":" in text:
                    sub("ip", IPV6_RE, self.ip_token, _ip_ok)
            elif kind == "phone":
                sub("phone", PHONE_RE, self.phone_token, lambda s: 7 <= len(re.sub(r"\D", "", s)) <= 15)
        return text, counts

    def __call__(self, doc: Document) -> str | None:
        text, counts = self.redact(doc.text)
        if counts:
            doc.text = text
            doc.metadata["pii"] = dict(counts)
            self._counts.update(counts)
        return None

    def pop_counters(self) -> dict[str, int]:
        out = dict(self._counts)
        self._counts.clear()
        return out
