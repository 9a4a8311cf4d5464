"""The toxicity step: a classifier trained by `lmforge data train-classifier` on labelled examples, measured on
held-out labels. The labelled set is SYNTHETIC: built here from templates (hostile vs neutral messages that share
most of their words, plus neutral texts that use "violent" words in harmless senses), so the numbers say the
machinery works, not how well it would do on real web text."""

import json
import random
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.core.errors import LmforgeError
from lmforge.data.filters.classifier import HashedLogReg, TrainClassifierConfig, train_classifier
from lmforge.data.pipeline import clean_documents, make_step
from lmforge.data.readers import Document

SUBJECTS = ["you", "your friend", "that guy", "the new moderator", "this user", "the author", "my neighbour"]
INSULTS = ["a worthless idiot", "a pathetic loser", "a disgusting pig", "a brainless moron", "utter scum",
           "a stupid clown", "a useless waste of space"]
THREATS = ["I will find you and hurt you", "someone should shut you up for good", "you deserve to suffer",
           "I hope you choke on it", "go crawl back under your rock", "nobody wants you here, just disappear"]
PRAISE = ["a thoughtful writer", "a patient teacher", "a careful reviewer", "a helpful colleague", "a kind person",
          "a great cook", "a clear thinker"]
NEUTRAL = ["thanks for the detailed answer", "I will try that tomorrow", "the meeting moved to Friday",
           "can you share the link again", "the recipe needs more salt", "the train was late this morning"]
HARMLESS_VIOLENT = ["kill the process and restart the server", "this bug is killing my build", "the joke killed",
                    "we need to shoot the photos before noon", "the stupid printer jammed again",
                    "attack the problem from the other side", "the pig farm opens at nine"]
OPENERS = ["", "honestly, ", "well, ", "look, ", "again: ", "to be clear, "]
CLOSERS = ["", ".", "!", " and everyone knows it.", ", see you later.", " - posted at 10:42"]


def synthetic_example(rng: random.Random, toxic: bool) -> str:
    opener, closer = rng.choice(OPENERS), rng.choice(CLOSERS)
    if toxic:
        body = (f"{rng.choice(SUBJECTS)} {'are' if rng.random() < .5 else 'is'} {rng.choice(INSULTS)}"
                if rng.random() < 0.6 else rng.choice(THREATS))
    else:
        r = rng.random()
        body = (f"{rng.choice(SUBJECTS)} {'are' if rng.random() < .5 else 'is'} {rng.choice(PRAISE)}" if r < 0.4
                else rng.choice(NEUTRAL) if r < 0.7 else rng.choice(HARMLESS_VIOLENT))
    extra = rng.choice(NEUTRAL) if rng.random() < 0.3 else ""  # toxic and neutral share words
    return f"{opener}{body}{closer} {extra}".strip()


def labelled_file(path: Path, n: int = 1200, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        toxic = rng.random() < 0.4
        rows.append(json.dumps({"id": f"ex{i}", "text": synthetic_example(rng, toxic), "label": int(toxic)}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return path


def test_train_classifier_cli_measures_held_out_and_toxicity_step_uses_it(tmp_path, capsys):
    data = labelled_file(tmp_path / "labelled.jsonl")
    model = tmp_path / "tox" / "toxicity.safetensors"
    assert main(["data", "train-classifier", "--input", str(data), "--output", str(model), "--dim", "65536"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads(model.with_suffix(".json").read_text())
    print(out, metrics)
    assert metrics["held_out_examples"] == 240 and metrics["train_examples"] == 960
    assert metrics["precision"] >= 0.95 and metrics["recall"] >= 0.95  # synthetic: see the module docstring
    assert f"precision {metrics['precision']:.3f}" in out
    assert model.read_bytes()[8:9] == b"{"  # safetensors: an 8-byte length, then a JSON header (no pickle)

    docs = tmp_path / "in" / "comments.jsonl"
    docs.parent.mkdir()
    docs.write_text("\n".join(json.dumps({"id": i, "text": t}) for i, t in enumerate([
        "you are a worthless idiot and everyone knows it.",
        "kill the process and restart the server, thanks for the detailed answer",
        "the new moderator is a careful reviewer!",
        "I will find you and hurt you"])) + "\n")
    stats = clean_documents([docs], tmp_path / "out", steps=[{"name": "toxicity", "model": str(model)}],
                            workers=1, progress=False)
    assert stats["steps"][1]["reasons"] == {"toxic": 2}
    kept = [json.loads(line) for line in (tmp_path / "out" / "kept" / "00000-comments.jsonl").read_text().splitlines()]
    assert [r["id"] for r in kept] == ["1", "2"] and all(r["metadata"]["toxicity"] < 0.5 for r in kept)
    # a keyword list cannot tell these apart: the words that make the threats also make the harmless texts
    keywords = make_step({"name": "keyword", "words": ["kill", "stupid", "pig", "hurt", "shoot", "attack"]})
    harmless = [Document(str(i), t, "s") for i, t in enumerate(HARMLESS_VIOLENT)]
    assert sum(keywords(d) is not None for d in harmless) >= 5
    clf = HashedLogReg.load(model)
    assert sum(clf.score(d.text) >= 0.5 for d in harmless) == 0


def test_bad_labels_and_bad_model_files_are_one_line_errors(tmp_path):
    data = tmp_path / "l.jsonl"
    data.write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(LmforgeError, match=r"l.jsonl:2: no 'label' field"):
        train_classifier(TrainClassifierConfig(input=[str(data)], output=str(tmp_path / "m.safetensors")))
    data.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 0}\n')
    with pytest.raises(LmforgeError, match="every example has the same label"):
        train_classifier(TrainClassifierConfig(input=[str(data)], output=str(tmp_path / "m.safetensors")))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04not a model")
    with pytest.raises(LmforgeError, match="bad.safetensors: not a classifier file"):
        make_step({"name": "toxicity", "model": str(bad)})
    with pytest.raises(LmforgeError, match="no such classifier file"):
        HashedLogReg.load(tmp_path / "missing.safetensors")
