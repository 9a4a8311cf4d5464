"""A verifiable synthetic task suite: short prompts with exactly checkable answers.

Every post-training stage needs data whose quality can be measured without a human: SFT trains on
(prompt, answer) pairs, rejection sampling and GRPO score samples with `task_reward`, DPO builds
preference pairs from correct vs incorrect samples, and the evaluation is exact match on held-out
examples. Prompts and answers are a handful of tokens, so a ~1M-parameter model learns them on a CPU.

Train and held-out examples never share a prompt: a stable hash of (kind, prompt) splits the space
of all prompts in two, and the seed's parity picks the half (even seed = train, odd seed = held out).
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lmforge.core.errors import LmforgeError

TASK_KINDS: tuple[str, ...] = ("add", "count_letter", "spell", "sort", "copy", "reverse")

# Short common English words for spelling and letter counting (lower case ASCII, 3-6 letters).
WORDS: tuple[str, ...] = tuple("""
able acid aged also area army away baby back ball band bank base bath bear beat been beer bell belt best
bird blow blue boat body bond bone book boom born boss both bowl bulk burn bush busy cake call calm
came camp card care case cash cast cell chat chip city club coal coat code cold come cook cool cope copy
core cost crew crop dark data date dawn dead deal dear debt deep deny desk dial diet dirt dish disk dock
door dose down draw drew drop drug dual duke dust duty each earn ease east easy edge else even ever evil
exit face fact fail fair fall farm fast fate fear feed feel file fill film find fine fire firm fish five
flat flow food foot form fort four free from fuel full fund gain game gate gave gear gene gift girl give
glad goal gold golf gone good grew grey grow gulf hair half hall hand hang hard harm hate have head hear
heat held help here hero high hill hire hold hole holy home hope host hour huge hung hunt hurt idea
inch into iron item jack jane jean john join jump jury just keen keep kept kick kind king knee knew know
lack lady laid lake land lane last late lead left less life lift like line link list live load loan lock
long look lord lose loss lost love luck made mail main make male many mark mass meal mean meat meet menu
mere mild mile milk mill mind mine miss mode mood moon more most move much must name navy near neck need
news next nice nine none nose note okay once only open oral over pace pack page paid pain pair palm park
part pass past path peak pick pink pipe plan play plot plus poll pool poor port post pull pure push race
rail rain rank rare rate read real rear rely rent rest rice rich ride ring rise risk road rock role roll
roof room root rose rule rush safe said sake sale salt same sand save seat seed seek seem seen self sell
send sent ship shop shot show shut sick side sign site size skin slip slow snow soft soil sold sole some
song soon sort soul spot star stay step stop such suit sure take tale talk tall tank tape task team tech
tell tend term test text than that them then they thin this thus till time tiny told tone took tool tour
town tree trip true tune turn twin type unit upon used user vary vast very vice view vote wage wait wake
walk wall want ward warm wash wave ways weak wear week well went were west what when whom wide wife wild
will wind wine wing wire wise wish with wood word wore work yard yeah year your zero zone
""".split())

LETTERS = "abcdefghijklmnopqrstuvwxyz"
MIN_ITEMS, MAX_ITEMS = 2, 4  # list length of copy / reverse / sort


@dataclass(frozen=True)
class TaskExample:
    kind: str
    prompt: str
    answer: str


def _items(rng: random.Random, alphabet: str) -> list[str]:
    return [rng.choice(alphabet) for _ in range(rng.randint(MIN_ITEMS, MAX_ITEMS))]


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"add: {a} + {b}", str(a + b)


def _count_letter(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    letter = rng.choice(word) if rng.random() < 0.75 else rng.choice(LETTERS)
    return f"count {letter} in: {word}", str(word.count(letter))


def _spell(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"spell: {word}", " ".join(word)


def _sort(rng: random.Random) -> tuple[str, str]:
    items = _items(rng, "0123456789")
    return f"sort: {' '.join(items)}", " ".join(sorted(items))


def _copy(rng: random.Random) -> tuple[str, str]:
    items = _items(rng, LETTERS)
    return f"copy: {' '.join(items)}", " ".join(items)


def _reverse(rng: random.Random) -> tuple[str, str]:
    items = _items(rng, LETTERS)
    return f"reverse: {' '.join(items)}", " ".join(reversed(items))


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add, "count_letter": _count_letter, "spell": _spell, "sort": _sort, "copy": _copy, "reverse": _reverse,
}


def split_of(kind: str, prompt: str) -> int:
    """0 (train half) or 1 (held-out half) of the prompt space, by a hash stable across runs and machines."""
    return zlib.crc32(f"{kind}\0{prompt}".encode()) & 1


def make_examples(n: int, seed: int = 0, kinds: Sequence[str] = TASK_KINDS) -> list[TaskExample]:
    """`n` examples cycling through `kinds`; deterministic in (n, seed, kinds).

    Even seeds draw from the train half of each kind's prompt space, odd seeds from the held-out half,
    so `make_examples(n, 0)` and `make_examples(m, 1)` share no prompt. Within a call, prompts may repeat
    when a kind's space is small (single-digit addition has 100 prompts, about 50 per half).
    """
    if n < 0:
        raise LmforgeError(f"make_examples: n must be >= 0, got {n}")
    kinds = list(kinds)
    unknown = [k for k in kinds if k not in GENERATORS]
    if unknown or not kinds:
        raise LmforgeError(f"unknown task kind(s) {unknown or kinds}; choose from {', '.join(TASK_KINDS)}")
    rng = random.Random(seed)
    half = seed & 1
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        while True:  # rejection-sample into this seed's half of the prompt space
            prompt, answer = GENERATORS[kind](rng)
            if split_of(kind, prompt) == half:
                break
        out.append(TaskExample(kind, prompt, answer))
    return out


_ANSWER_PREFIX = re.compile(r"(?i)\banswer\s*[:=]\s*")


def extract_answer(completion: str) -> str:
    """The answer in a completion: the text after the last "answer:" if any, its first non-empty line,
    whitespace collapsed, a trailing period dropped."""
    found = list(_ANSWER_PREFIX.finditer(completion))
    if found:
        completion = completion[found[-1].end():]
    line = next((ln for ln in completion.splitlines() if ln.strip()), "")
    return " ".join(line.split()).rstrip(".")


def task_reward(example: TaskExample, completion: str) -> float:
    """1.0 when the completion's extracted answer equals the exact answer, else 0.0 (a verifiable reward)."""
    return 1.0 if extract_answer(completion) == example.answer else 0.0


def exact_match(examples: Sequence[TaskExample], completions: Sequence[str]) -> float:
    """Fraction of completions whose answer is exactly right."""
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
    if not examples:
        return 0.0
    return sum(task_reward(e, c) for e, c in zip(examples, completions)) / len(examples)
