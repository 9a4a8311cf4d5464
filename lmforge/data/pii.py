"""PII redaction: e-mail addresses, phone numbers, IPv4/IPv6 addresses, credit-card numbers (Luhn
checksum), IBANs (ISO 13616 country length + mod-97 check) and US social security numbers (SSA's
invalid ranges) are replaced by tokens; counts go to the document's `metadata["pii"]` and to the report.

Checksums keep precision high: a 16-digit order number that fails Luhn, a string shaped like an IBAN
whose length is wrong for its country or whose mod-97 remainder is not 1, or an SSN in a range the SSA
never issues is left alone. Cards and IBANs are found inside longer runs of digit groups (an expiry
date or a BIC after the number): every group-aligned candidate is checked, not only the longest.
Detection follows the regexes of BigScience's ROOTS and StarCoder PII pipelines in spirit; the kinds
and tokens are configurable.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from lmforge.core.config import option, require
from lmforge.data.readers import Document
from lmforge.data.steps import Step

EMAIL_RE = re.compile(r"(?<![\w.+-])[\w.+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])")
# a run of digit groups joined by single spaces or hyphens; candidates inside it are group-aligned
DIGIT_RUN_RE = re.compile(r"(?<![\w.-])(?<!\d[ -])\d+(?:[ -]\d+)*(?!\w)(?!\.\d)")
# a country code + check digits, then uppercase letters/digits, optionally in space-separated groups
IBAN_RUN_RE = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}[A-Z0-9]*(?: [A-Z0-9]+)*")
SSN_RE = re.compile(r"(?<![\w.-])(\d{3})([- ])(\d{2})\2(\d{4})(?![\w-])")
SSN_KEYWORD_RE = re.compile(  # nine digits in a row are an SSN only after the words that name one
    r"\b(?i:ssn|ss#|social security(?: number| no\.?| #)?)\W{0,4}(?:(?:is|no\.?)\W{1,3})?(\d{9})(?!\w)")
IPV4_RE = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)(?!\w)")  # "IP 10.0.0.1." ends a sentence
IPV6_RE = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
PHONE_RE = re.compile(  # +CC prefix (free grouping) | (area) local | grouped digits with separators; then
    # not more digits, but a short number after a space is separate ("call 415-555-0132 12 times")
    r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)|\d{1,4})[ .-]?\d{3,4}[ .-]?\d{3,4}"
    r"|\(\d{2,4}\)[ .-]?\d{3,4}[ .-]\d{3,4}|\d{2,4}[ .-]\d{3,4}[ .-]\d{3,4})(?![.-]?\d)(?! \d{3})(?!\w)")

# ISO 13616 IBAN lengths per country (SWIFT IBAN registry)
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21,
    "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28,
    "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22,
    "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25,
    "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}
Span = tuple[int, int]


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
    if not 15 <= len(s) <= 34 or not s.isalnum():
        return False
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def ssn_ok(area: str, group: str, serial: str) -> bool:
    """SSA never issues area 000, 666 or 900-999, group 00 or serial 0000."""
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _groups(m: re.Match) -> list[tuple[int, int]]:
    """(start, end) of each separator-delimited group of a run match, in text coordinates."""
    out, pos = [], m.start()
    for part in re.split(r"([ -])", m.group(0)):
        if part not in (" ", "-"):
            out.append((pos, pos + len(part)))
        pos += len(part)
    return out


def _card_shape_ok(text: str, groups: list[tuple[int, int]]) -> bool:
    """One block of 13-19 digits, or the printed layouts (4-4-4-4, 4-6-5, 4-4-4-4-3): the first group has
    4 digits, the middle ones 4-6, the last 3-6, all joined by the same separator."""
    sizes = [e - s for s, e in groups]
    if not 13 <= sum(sizes) <= 19 or text[groups[0][0]] not in "23456":  # issuer ranges start with 2-6
        return False
    if len(groups) == 1:
        return True
    seps = {text[e] for (_, e) in groups[:-1]}
    return len(seps) == 1 and sizes[0] == 4 and all(4 <= s <= 6 for s in sizes[1:-1]) and 3 <= sizes[-1] <= 6


def find_cards(text: str) -> Iterator[Span]:
    """Luhn-valid card numbers in a digit run: from the run's start (or the end of the card before), the
    longest card-shaped candidate is checked. Trailing short groups (an expiry "12 25") are not card-shaped,
    so the card before them is found; a card-shaped number failing Luhn is skipped whole, never searched
    for a shorter part that happens to pass."""
    for m in DIGIT_RUN_RE.finditer(text):
        groups = _groups(m)
        i = 0
        while i < len(groups):
            j = next((j for j in range(min(len(groups), i + 5), i, -1) if _card_shape_ok(text, groups[i:j])), 0)
            if not j:
                i += 1
                continue
            start, end = groups[i][0], groups[j - 1][1]
            if luhn_ok(re.sub(r"\D", "", text[start:end])):
                yield start, end
            i = j


def iban_shaped(text: str) -> Iterator[Span]:
    """Strings laid out as an IBAN of their country (right length, one block or groups of four), valid or not;
    what follows (more groups, a BIC) is not part of it."""
    for m in IBAN_RUN_RE.finditer(text):
        length = IBAN_LENGTHS.get(m.group(0)[:2])
        if length is None:
            continue
        groups = _groups(m)
        first_s, first_e = groups[0]
        if first_e - first_s == length:  # electronic form
            yield first_s, first_e
            continue
        want = [4] * (length // 4) + ([length % 4] if length % 4 else [])  # print form: the last group shorter
        if [e - s for s, e in groups[:len(want)]] == want:
            yield first_s, groups[len(want) - 1][1]


def find_ibans(text: str) -> Iterator[Span]:
    return ((s, e) for s, e in iban_shaped(text) if iban_ok(text[s:e]))


def find_ssns(text: str) -> Iterator[Span]:
    """US SSNs: AAA-GG-SSSS or AAA GG SSSS anywhere, nine digits in a row only after "SSN"/"social security"."""
    for m in SSN_RE.finditer(text):
        if ssn_ok(m.group(1), m.group(3), m.group(4)):
            yield m.span()
    for m in SSN_KEYWORD_RE.finditer(text):
        d = m.group(1)
        if ssn_ok(d[:3], d[3:5], d[5:]):
            yield m.span(1)


def _regex_finder(pattern: re.Pattern, valid: Callable[[str], bool] | None = None) -> Callable[[str], Iterator[Span]]:
    def find(text: str) -> Iterator[Span]:
        return (m.span() for m in pattern.finditer(text) if valid is None or valid(m.group(0)))
    return find


def _ip_ok(text: str) -> bool:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    # "::" and "::1" are valid IPv6 but, in text, mostly code or grammar ("a::b", "::="): want two hex groups
    return ip.version == 4 or sum(1 for g in text.split(":") if g) >= 2


def find_ips(text: str) -> Iterator[Span]:
    yield from _regex_finder(IPV4_RE, _ip_ok)(text)
    if ":" in text:
        yield from _regex_finder(IPV6_RE, _ip_ok)(text)


FINDERS: dict[str, Callable[[str], Iterator[Span]]] = {
    "email": lambda text: _regex_finder(EMAIL_RE)(text) if "@" in text else iter(()),
    "iban": find_ibans,
    "credit_card": find_cards,
    "ssn": find_ssns,
    "ip": find_ips,
    "phone": _regex_finder(PHONE_RE, lambda s: 7 <= len(re.sub(r"\D", "", s)) <= 15),
}


@dataclass
class PIIRedactor(Step):
    """Replace PII with tokens; kinds to detect and their tokens are parameters."""

    name = "pii"
    modifies = True
    kinds: list[str] = option(default_factory=lambda: ["email", "iban", "credit_card", "ssn", "ip", "phone"],
                              help="what to redact, in this order: " + ", ".join(FINDERS))
    email_token: str = option("<EMAIL>", help="replacement for e-mail addresses")
    phone_token: str = option("<PHONE>", help="replacement for phone numbers")
    ip_token: str = option("<IP>", help="replacement for IPv4/IPv6 addresses")
    credit_card_token: str = option("<CREDIT_CARD>", help="replacement for Luhn-valid card numbers")
    iban_token: str = option("<IBAN>", help="replacement for mod-97-valid IBANs")
    ssn_token: str = option("<SSN>", help="replacement for US social security numbers")
    _counts: Counter = field(default_factory=Counter, init=False, repr=False)

    def __post_init__(self) -> None:
        for kind in self.kinds:
            require(kind in FINDERS, "pii.kinds", kind, "one of " + ", ".join(FINDERS))

    def redact(self, text: str) -> tuple[str, Counter]:
        counts: Counter = Counter()
        for kind in self.kinds:
            spans = sorted(set(FINDERS[kind](text)))
            if spans and kind != "iban":  # an IBAN failing mod-97 is a typo or a code, not cards or phones
                shaped = list(iban_shaped(text))
                spans = [(s, e) for s, e in spans if not any(s < e2 and s2 < e for s2, e2 in shaped)]
            if not spans:
                continue
            token, parts, last = getattr(self, f"{kind}_token"), [], 0
            for start, end in spans:
                if start < last:  # overlaps the span before it
                    continue
                parts += [text[last:start], token]
                last = end
                counts[kind] += 1
            text = "".join(parts) + text[last:]
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
