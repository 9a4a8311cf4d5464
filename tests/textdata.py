"""Text for tests, present on every machine.

- `SHAKESPEARE`: tinyshakespeare from the workspace's `shared/data/` when the checkout sits beside it (CI
  does); otherwise the English documentation every Python ships (`pydoc_data.topics`), written once to a
  temp file so tests can treat both alike.
- `prose`, `gibberish`, `FRENCH`, `GERMAN`: synthetic documents for the cleaning tests, English prose that
  passes the default filters and planted bad cases.
- `preference_file`: a learnable preference data set for the reward and DPO tests.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path


def shared_file(name: str) -> Path | None:
    roots = [os.environ.get("LMFORGE_SHARED_DATA", "")]
    roots += [str(p / "shared" / "data") for p in Path(__file__).resolve().parents]
    for root in roots:
        if root and (Path(root) / name).is_file():
            return Path(root) / name
    return None


def _pydoc_english() -> Path:
    from pydoc_data.topics import topics

    path = Path(tempfile.gettempdir()) / "lmforge-tests-pydoc-english.txt"
    if not path.is_file():
        text = "\n\n".join(topics[k] for k in sorted(topics))
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return path


PYDOC_ENGLISH: Path = _pydoc_english()  # on every machine: what tiny tokenizers train on
SHAKESPEARE: Path = shared_file("tinyshakespeare.txt") or PYDOC_ENGLISH


# synthetic documents for the cleaning tests
ADJ = ("quiet ancient bright narrow heavy gentle distant careful hidden modern simple rapid golden wooden "
       "curious steady hollow silent broken tender").split()
NOUN = ("river garden teacher village engine window letter forest market bridge doctor painter harbor "
        "library mountain kitchen soldier student captain farmer merchant sailor castle station museum").split()
VERB = ("follows carries remembers watches builds crosses repairs visits describes paints finds opens "
        "guards studies measures").split()
ADV = ("slowly often quietly rarely gladly always nearly simply early later").split()


def sentence(rng: random.Random) -> str:
    c = rng.choice
    forms = [
        f"The {c(ADJ)} {c(NOUN)} {c(VERB)} the {c(NOUN)} with a {c(ADJ)} {c(NOUN)}.",
        f"A {c(NOUN)} {c(ADV)} {c(VERB)} every {c(ADJ)} {c(NOUN)} near the {c(NOUN)}.",
        f"In the {c(ADJ)} {c(NOUN)}, the {c(NOUN)} {c(VERB)} that {c(NOUN)} and {c(ADV)} rests.",
        f"Nobody {c(VERB).rstrip('s')}s the {c(NOUN)} of the {c(ADJ)} {c(NOUN)} to be {c(ADJ)}.",
    ]
    return c(forms)


def prose(rng: random.Random, lines: int = 8, per_line: int = 3) -> str:
    """English-looking paragraphs: every line ends in a period, enough stop words, little repetition."""
    return "\n".join(" ".join(sentence(rng) for _ in range(per_line)) for _ in range(lines))


def gibberish(rng: random.Random, words: int = 150) -> str:
    return " ".join("".join(rng.choice("qxzjkvbwpfg") for _ in range(rng.randint(2, 14))) for _ in range(words))


FRENCH = ("Le petit village se trouve au bord de la rivière, et les habitants y vivent depuis des siècles. "
          "Chaque matin, le boulanger ouvre sa boutique et prépare le pain pour toute la famille du quartier. ")
GERMAN = ("Die alte Stadt liegt an einem breiten Fluss, und die Menschen arbeiten dort seit vielen Jahren. "
          "Jeden Morgen öffnet der Bäcker seinen Laden und backt frisches Brot für die ganze Nachbarschaft. ")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def preference_file(path: Path, n: int = 160) -> Path:
    """A learnable preference: the chosen reply repeats the prompt's word, the rejected one a different word."""
    rng = random.Random(0)
    words = ["red", "blue", "green", "gold", "grey", "pink"]
    with open(path, "w") as f:
        for _ in range(n):
            w, other = rng.sample(words, 2)
            f.write(json.dumps({"prompt": f"say {w}", "chosen": w, "rejected": other}) + "\n")
    return path
