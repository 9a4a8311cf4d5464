import importlib.util
import random

import numpy as np
import pytest
from textdata import FRENCH, GERMAN, SHAKESPEARE, gibberish, prose

from lmforge.core.errors import ConfigError
from lmforge.data.filters.c4 import C4Quality
from lmforge.data.filters.classifier import ClassifierFilter, HashedLogReg
from lmforge.data.filters.fineweb import FineWebQuality
from lmforge.data.filters.gopher import GopherQuality, GopherRepetition, duplicate_ngram_chars, top_ngram_chars
from lmforge.data.filters.keyword import KeywordFilter
from lmforge.data.filters.language import LanguageFilter
from lmforge.data.filters.perplexity import NGramModel, PerplexityFilter
from lmforge.data.filters.text import mix64, ngram_hashes, words
from lmforge.data.readers import Document


def doc(text: str) -> Document:
    return Document("d", text, "")


def shakespeare_chunks(n: int, start: int = 0, size: int = 40) -> list[str]:
    lines = SHAKESPEARE.read_text(encoding="utf-8").split("\n")
    return ["\n".join(lines[start + i * size:start + (i + 1) * size]) for i in range(n)]


@pytest.mark.parametrize("text, reason", [
    ("Too short to be a document.", "gopher_short_doc"),
    (" ".join(["supercalifragilistic"] * 30 + ["the", "and"] * 20), "gopher_above_avg_threshold"),
    ("the and of " + "#hashtag words " * 60, "gopher_too_many_hashes"),
    ("\n".join(f"- item {i} of the list and the rest" for i in range(60)), "gopher_too_many_bullets"),
    (" ".join(["123", "456", "the", "and", "789", "000"] * 20), "gopher_below_alpha_threshold"),
    (" ".join(["apple", "banana", "cherry", "melon"] * 30), "gopher_enough_stop_words"),
])
def test_gopher_quality_rules(text, reason):
    assert GopherQuality()(doc(text)) == reason


def test_gopher_quality_and_repetition_keep_prose():
    rng = random.Random(0)
    assert all(GopherQuality()(doc(prose(rng))) is None for _ in range(20))
    assert all(GopherRepetition()(doc(prose(rng))) is None for _ in range(20))


@pytest.mark.parametrize("text, reason", [
    ("\n\n".join(["The same paragraph again and again here."] * 6 + ["Another one."]), "dup_para_frac"),
    ("\n".join(["Same line over and over."] * 5 + ["A different line here, " * 3]), "dup_line_frac"),
    (" ".join(["of the"] * 60 + ["word"] * 10), "top_2_gram"),
])
def test_gopher_repetition_rules(text, reason):
    assert GopherRepetition()(doc(text)) == reason


def reference_duplicate_chars(ws: list[str], n: int) -> int:
    """The rule as written: scan left to right, a repeated n-gram counts its characters and is jumped over."""
    seen, total, i = set(), 0, 0
    while i < len(ws) - n + 1:
        gram = tuple(ws[i:i + n])
        if gram in seen:
            total += sum(map(len, gram))
            i += n
        else:
            seen.add(gram)
            i += 1
    return total


def test_vectorized_ngram_statistics_equal_the_plain_loop():
    rng = random.Random(1)
    for _ in range(300):
        ws = [rng.choice("abcd") * rng.randint(1, 3) for _ in range(rng.randint(3, 80))]
        vocab: dict[str, int] = {}
        ids = mix64(np.array([vocab.setdefault(w, len(vocab)) for w in ws], dtype=np.uint64))
        cum = np.concatenate([[0], np.cumsum([len(w) for w in ws])])
        for n in (2, 3, 5):
            if len(ws) < n:
                continue
            hashes = ngram_hashes(ids, n)
            assert duplicate_ngram_chars(hashes, cum[n:] - cum[:-n], n) == reference_duplicate_chars(ws, n)
            grams = [" ".join(ws[i:i + n]) for i in range(len(ws) - n + 1)]
            best = max(grams, key=lambda g: (grams.count(g), -grams.index(g)))
            assert top_ngram_chars(hashes, cum[n:] - cum[:-n] + n - 1) == len(best) * grams.count(best)


def test_words_follow_spacy_style_tokens():
    assert words("He's sure we don't know't... (a) sys.path!") == [
        "He", "'s", "sure", "we", "do", "n't", "know't", "...", "(", "a", ")", "sys.path", "!"]


def test_c4_rules_edit_lines_and_reject_pages():
    rng = random.Random(2)
    text = prose(rng, lines=4) + "\nHome | About\nThis site uses cookies to track you.\nEnable JavaScript to view it."
    d = doc(text)
    assert C4Quality()(d) is None
    assert "Home" not in d.text and "cookies" not in d.text and "JavaScript" not in d.text
    assert d.text.count("\n") == 3
    assert C4Quality()(doc(prose(rng) + "\nLorem ipsum dolor sit amet, consectetur.")) == "lorem_ipsum"
    assert C4Quality()(doc(prose(rng) + "\nThe function f(x) returns {a: b} as a mapping.")) == "curly_bracket"
    assert C4Quality()(doc("One sentence here. And two here.\nThree is here now.")) == "too_few_sentences"
    cited = doc(prose(rng, lines=2) + "\nThe war ended in 1945.[12] It was long.[citation needed]")
    C4Quality()(cited)
    assert "[12]" not in cited.text and "[citation needed]" not in cited.text


def test_fineweb_rules():
    rng = random.Random(3)
    assert FineWebQuality()(doc(prose(rng))) is None
    assert FineWebQuality()(doc("\n".join(["a menu item without any end"] * 2 + ["x"] * 20))) == "line_punct_ratio"
    assert FineWebQuality()(doc("\n".join(["Short line."] * 1 + [f"Item {i}." for i in range(30)]))) == \
        "short_line_ratio"
    dup = prose(rng, lines=6) + "\n" + "\n".join(["This exact line is repeated on the page today."] * 3)
    assert FineWebQuality()(doc(dup)) == "char_dup_ratio"


def test_language_filter_labels_and_rejects():
    rng = random.Random(4)
    step = LanguageFilter()
    english = doc(prose(rng))
    assert step(english) is None and english.metadata["language"] == "en" and english.metadata["language_score"] > 0.9
    assert step(doc(FRENCH)) == "language_fr"
    assert step(doc(GERMAN)) == "language_de"
    assert LanguageFilter(languages=["fr"])(doc(FRENCH)) is None
    assert LanguageFilter(identify=lambda t: ("xx", 0.99), languages=["xx"])(doc("anything")) is None


def test_keyword_filter():
    step = KeywordFilter(words=["casino", "free money"])
    assert step(doc("Win FREE MONEY at the big casino")) == "blocklist:free money"
    assert step(doc("The casinos are closed; money is not free here.")) is None  # whole words only
    with pytest.raises(ConfigError, match="blocklist is empty"):
        KeywordFilter()


def test_perplexity_separates_held_out_text_from_gibberish(tmp_path):
    train = tmp_path / "ref.txt"
    # 320 chunks must fit the text (tinyshakespeare, or the shorter pydoc fallback)
    size = min(40, len(SHAKESPEARE.read_text(encoding="utf-8").split("\n")) // 320)
    train.write_text("\n".join(shakespeare_chunks(300, size=size)), encoding="utf-8")
    model = NGramModel([train.read_text()], order=3)
    held_out = shakespeare_chunks(20, start=300 * size, size=size)
    assert all(t.strip() for t in held_out)
    rng = random.Random(5)
    junk = [gibberish(rng) for _ in range(20)]
    ppl_good = np.median([model.perplexity(t) for t in held_out])
    ppl_junk = np.median([model.perplexity(t) for t in junk])
    assert ppl_junk > 10 * ppl_good
    step = PerplexityFilter(reference=[str(train)], max_perplexity=float(np.sqrt(ppl_good * ppl_junk)))
    assert sum(step(doc(t)) is None for t in held_out) >= 19
    assert all(step(doc(t)) == "high_perplexity" for t in junk)


def test_hashed_logistic_regression_quality_classifier(tmp_path):
    rng = random.Random(6)
    good = shakespeare_chunks(120, size=20)
    other = [gibberish(rng, 60) for _ in range(60)] + [prose(rng, lines=3) for _ in range(60)]
    clf = HashedLogReg(dim=2**16).fit(good[:100], other[:50] + other[60:110])
    test_good, test_other = good[100:], other[50:60] + other[110:]
    accuracy = (sum(clf.score(t) >= 0.5 for t in test_good) + sum(clf.score(t) < 0.5 for t in test_other)) / (
        len(test_good) + len(test_other))
    print(f"classifier held-out accuracy {accuracy:.3f}")
    assert accuracy >= 0.9
    path = tmp_path / "clf.safetensors"
    clf.save(path)
    step = ClassifierFilter(model=str(path))
    d = doc(test_good[0])
    assert step(d) is None and d.metadata["quality_score"] >= 0.5
    with pytest.raises(ConfigError):
        ClassifierFilter()


@pytest.mark.skipif(importlib.util.find_spec("datatrove") is None or importlib.util.find_spec("spacy") is None,
                    reason="datatrove with spacy is the reference")
def test_decisions_agree_with_datatrove():
    from datatrove.data import Document as DTDocument
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    rng = random.Random(7)
    texts = shakespeare_chunks(60, size=25) + [prose(rng) for _ in range(20)] + [gibberish(rng) for _ in range(10)]
    texts += ["\n".join(["Same line over and over."] * 5), "Lorem ipsum dolor sit amet. " * 20]
    for mine, theirs in [(GopherRepetition(), GopherRepetitionFilter()), (GopherQuality(), GopherQualityFilter()),
                         (C4Quality(), C4QualityFilter()), (FineWebQuality(), FineWebQualityFilter())]:
        ours = [mine(doc(t)) is None for t in texts]
        ref = [theirs.filter(DTDocument(text=t, id="x")) is True for t in texts]
        agreement = np.mean(np.array(ours) == np.array(ref))
        print(f"{mine.name}: agreement {agreement:.3f}")
        assert agreement >= 0.95, mine.name
