import random

from textdata import prose

from lmforge.data.pii import PIIRedactor, iban_ok, luhn_ok
from lmforge.data.readers import Document

POSITIVES = {
    "email": ["jane.doe@example.org", "j_smith+news@mail.co.uk", "ADMIN@Sub.Domain.io", "x1@a-b.com"],
    "phone": ["+1 415-555-0132", "(212) 555-0199", "+44 20 7946 0958", "415.555.0143", "+49 30 1234 5678"],
    "ip": ["192.168.1.20", "10.0.0.1", "8.8.4.4", "2001:db8::8a2e:370:7334", "fe80::1ff:fe23:4567:890a"],
    "credit_card": ["4111 1111 1111 1111", "5500-0000-0000-0004", "378282246310005", "6011111111111117"],
    "iban": ["DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432", "FR1420041010050500013M02606"],
}
NEGATIVES = ["4111 1111 1111 1112",  # fails Luhn
             "DE89 3704 0044 0532 0130 01",  # fails mod-97
             "version 3.11.7", "999.300.1.1", "on 2024-05-17 at 12:30:45", "costs $1,299.99",
             "ratio 16:9", "item #12345", "user@localhost", "call extension 42"]


def test_luhn_and_iban_checksums():
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and not iban_ok("GB82 WEST 1234 5698 7654 33")


def test_pii_precision_and_recall_on_planted_cases():
    rng = random.Random(0)
    step = PIIRedactor()
    found = missed = false = 0
    per_kind = {}
    for kind, values in POSITIVES.items():
        for value in values:
            doc = Document("d", f"{prose(rng, lines=1)} Contact: {value} please. {prose(rng, lines=1)}", "")
            assert step(doc) is None
            hit = value not in doc.text and doc.metadata.get("pii", {}).get(kind, 0) == 1
            found += hit
            missed += not hit
            false += sum(doc.metadata.get("pii", {}).values()) - hit
            per_kind[kind] = per_kind.get(kind, 0) + hit
    for value in NEGATIVES:
        doc = Document("n", f"{prose(rng, lines=1)} Note: {value} here. {prose(rng, lines=1)}", "")
        step(doc)
        false += sum(doc.metadata.get("pii", {}).values())
    recall = found / (found + missed)
    precision = found / (found + false)
    print(f"pii recall={recall:.3f} precision={precision:.3f} per kind={per_kind}")
    assert recall >= 0.95 and precision >= 0.95
    assert step.pop_counters() and not step.pop_counters()  # counts reset after being reported


def test_tokens_are_configurable_and_counts_go_to_metadata():
    step = PIIRedactor(email_token="[mail]", kinds=["email"])
    doc = Document("d", "a@b.org and c@d.net but call 415-555-0132", "")
    step(doc)
    assert doc.text == "[mail] and [mail] but call 415-555-0132"
    assert doc.metadata["pii"] == {"email": 2}
