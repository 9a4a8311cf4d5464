import random

import numpy as np
import pytest
from textdata import prose, read_jsonl, write_jsonl

from lmforge.core.errors import ConfigError
from lmforge.data.dedup.decontaminate import Decontaminate
from lmforge.data.dedup.exact import ExactDedup
from lmforge.data.dedup.minhash import MinHashDedup, cluster_roots, collision_probability, datatrove_roots
from lmforge.data.pipeline import clean_documents
from lmforge.data.readers import Document

_rng = random.Random(42)
VOCAB = sorted({"".join(_rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(7)) for _ in range(50_000)})


def shingle_set(text: str, n: int = 5) -> set[tuple[str, ...]]:
    t = text.split()
    return {tuple(t[i:i + n]) for i in range(len(t) - n + 1)}


def jaccard(a: str, b: str) -> float:
    x, y = shingle_set(a), shingle_set(b)
    return len(x & y) / len(x | y)


def planted_pair(rng: random.Random, target: float, length: int = 200) -> tuple[str, str]:
    """B = A with its tail replaced: the shared prefix fixes the 5-gram Jaccard to about `target`."""
    a = rng.sample(VOCAB, length)
    s = length - 4
    shared = round(2 * s * target / (1 + target))
    keep = shared + 4 if shared > 0 else 0
    b = a[:keep] + rng.sample(VOCAB, length - keep)
    return " ".join(a), " ".join(b)


def detected_pairs(pairs: list[tuple[str, str]]) -> list[bool]:
    """Run MinHash as the pipeline does (key per doc, one resolve) and say which pairs were merged."""
    step = MinHashDedup()
    docs = [t for pair in pairs for t in pair]
    keys = [step.key(Document(id=str(i), text=t, source="")) for i, t in enumerate(docs)]
    half = len(keys) // 2 // 2 * 2  # two shards, pairs never split
    plans = step.resolve([keys[:half], keys[half:]], [[str(i) for i in range(half)],
                                                      [str(i) for i in range(half, len(keys))]])
    removed = set(plans[0]) | {i + half for i in plans[1]}
    return [(2 * p + 1) in removed or (2 * p) in removed for p in range(len(pairs))]


def test_minhash_recall_and_false_positives_on_planted_pairs():
    rng = random.Random(0)
    high = [planted_pair(rng, t) for t in np.linspace(0.85, 1.0, 400)]
    low = [planted_pair(rng, t) for t in np.linspace(0.02, 0.49, 800)]
    assert min(jaccard(a, b) for a, b in high) >= 0.845 and max(jaccard(a, b) for a, b in low) < 0.5
    recall = np.mean(detected_pairs(high))
    false_positive = np.mean(detected_pairs(low))
    print(f"minhash recall(J>=0.85)={recall:.4f} false positives(J<0.5)={false_positive:.4f}")
    assert recall >= 0.95
    assert false_positive <= 0.01
    assert collision_probability(0.85) > 0.98 and collision_probability(0.3) < 0.002


def test_cluster_roots_is_connected_components():
    # 0-1 share band 0, 1-2 share band 1 (a chain), 3 alone, 4-5 share band 1
    keys = np.array([[1, 10], [1, 11], [2, 11], [3, 12], [4, 13], [5, 13]], dtype=np.uint64)
    assert cluster_roots(keys).tolist() == [0, 0, 0, 3, 4, 4]


def test_exact_and_minhash_in_the_pipeline_keep_the_first_copy(tmp_path):
    rng = random.Random(3)
    texts = [prose(rng) for _ in range(4)]
    near = texts[1].replace("the", "a", 1)
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "t0", "text": texts[0]}, {"id": "t1", "text": texts[1]}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "t0copy", "text": texts[0]}, {"id": "t1near", "text": near},
                                           {"id": "t2", "text": texts[2]}])
    clean_documents([a, b], tmp_path / "o1", steps=["exact_dedup"], workers=1, progress=False)
    assert [r["id"] for r in read_jsonl(tmp_path / "o1" / "rejects" / "exact_dedup.jsonl")] == ["t0copy"]
    clean_documents([a, b], tmp_path / "o2", steps=["minhash"], workers=1, progress=False)
    rejects = read_jsonl(tmp_path / "o2" / "rejects" / "minhash.jsonl")
    assert [(r["id"], r["metadata"]["duplicate_of"]) for r in rejects] == [("t0copy", "t0"), ("t1near", "t1")]
    assert ExactDedup(normalize_whitespace=True).key(Document("x", "a  b\n", "")) == \
        ExactDedup(normalize_whitespace=True).key(Document("y", "a b", ""))


def test_line_dedup_removes_corpus_wide_boilerplate(tmp_path):
    rng = random.Random(4)
    footer = "Copyright 2024 Example Corp. All rights reserved."
    records = [{"id": f"d{i}", "text": prose(rng, lines=3) + "\n" + footer} for i in range(6)]
    records.append({"id": "only", "text": footer})
    path = write_jsonl(tmp_path / "a.jsonl", records)
    stats = clean_documents([path], tmp_path / "o", steps=[{"name": "line_dedup", "min_docs": 5}], workers=1,
                            progress=False)
    kept = read_jsonl(tmp_path / "o" / "kept" / "00000-a.jsonl")
    assert len(kept) == 6 and all(footer not in r["text"] and r["metadata"]["repeated_lines_removed"] == 1
                                  for r in kept)
    assert [r["reason"] for r in read_jsonl(tmp_path / "o" / "rejects" / "line_dedup.jsonl")] == [
        "only_repeated_lines"]
    assert stats["steps"][1]["chars_out"] < stats["steps"][1]["chars_in"]


def test_c4_span_dedup_cuts_repeated_three_sentence_spans(tmp_path):
    rng = random.Random(5)
    shared = "The red fox runs. The old dog sleeps. The small bird sings."
    first = prose(rng, lines=2) + " " + shared
    second = prose(rng, lines=2) + " " + shared + " " + prose(rng, lines=1)
    path = write_jsonl(tmp_path / "a.jsonl", [{"id": "first", "text": first}, {"id": "second", "text": second}])
    clean_documents([path], tmp_path / "o", steps=[{"name": "c4_span_dedup", "min_doc_words": 10}], workers=1,
                    progress=False)
    kept = {r["id"]: r for r in read_jsonl(tmp_path / "o" / "kept" / "00000-a.jsonl")}
    assert shared in kept["first"]["text"]
    assert "The old dog sleeps." not in kept["second"]["text"]
    assert kept["second"]["metadata"]["duplicate_sentences_removed"] == 3


def test_decontamination_against_eval_files(tmp_path):
    rng = random.Random(6)
    question = ("Which planet in our solar system has the largest number of confirmed moons orbiting it "
                "according to the most recent survey")
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"question": question, "choices": ["Saturn", "Jupiter"]}])
    step = Decontaminate(eval_files=[str(evals)])
    leaked = Document("leak", prose(rng, lines=2) + " " + question.upper() + "? " + prose(rng, lines=1), "")
    assert step(leaked) == "contaminated" and leaked.metadata["contaminated_ngrams"] >= 1
    partial = Document("part", " ".join(question.split()[:12]) + " and other things entirely", "")
    assert step(partial) is None  # 12 shared words < 13
    assert step(Document("clean", prose(rng), "")) is None


SHORT_RECORDS = [  # e: empty, p: punctuation only, s: under 5 words; l and w: duplicates MinHash must find
    {"id": "e0", "text": ""}, {"id": "e1", "text": "   \n"}, {"id": "p0", "text": "!!! ... ---"},
    {"id": "s0", "text": "Hello there"}, {"id": "s1", "text": "Hello there"},
    {"id": "s2", "text": "one two three four"}, {"id": "s3", "text": "One two three, four!"},
    {"id": "l0", "text": prose(random.Random(7), lines=2)}, {"id": "l1", "text": prose(random.Random(7), lines=2)},
    {"id": "w5a", "text": "one two three four five"}, {"id": "w5b", "text": "One two three four five."}]


def test_minhash_leaves_empty_and_short_documents_alone(tmp_path):
    """Documents of fewer than 5 words have no 5-gram and are never removed (before, every empty document
    fell into one cluster and all but one were dropped, and a short one was a single shingle)."""
    path = write_jsonl(tmp_path / "a.jsonl", SHORT_RECORDS)
    clean_documents([path], tmp_path / "o", steps=["minhash"], workers=1, progress=False)
    rejects = read_jsonl(tmp_path / "o" / "rejects" / "minhash.jsonl")
    assert sorted((r["id"], r["metadata"]["duplicate_of"]) for r in rejects) == [("l1", "l0"), ("w5b", "w5a")]
    step = MinHashDedup()
    keys = [step.key(Document(r["id"], r["text"], "")) for r in SHORT_RECORDS]
    skip = np.array([r["id"][0] in "eps" for r in SHORT_RECORDS])
    assert cluster_roots(np.stack(keys), skip=skip).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 7, 9, 9]


def _patch_datatrove_xxhash() -> None:
    """datatrove passes str to xxhash, which xxhash>=4 refuses: encode first (as benchmarks/data_pipeline.py)."""
    import xxhash
    from datatrove.utils.hashes import xxhash as dt_xxhash

    dt_xxhash.xxhash64 = lambda data: xxhash.xxh64_intdigest(data.encode() if isinstance(data, str) else data)


def near_duplicate_corpus(rng: random.Random, bases: int = 12, copies: int = 4) -> list[dict]:
    """Clusters of lightly edited copies (some chained through each other), shuffled."""
    records = []
    for b in range(bases):
        words = prose(rng, lines=3).split(" ")
        for c in range(copies):
            for _ in range(rng.randint(0, 4)):  # each copy edits the one before: a chain of near-duplicates
                words[rng.randrange(len(words))] = rng.choice(["red", "blue", "cold", "warm", "tall"])
            records.append({"id": f"b{b}c{c}", "text": " ".join(words)})
    records += [{"id": f"x{i}", "text": prose(rng, lines=2)} for i in range(10)]
    records += [{"id": "short0", "text": "Hello there"}, {"id": "short1", "text": "Hello there"}]
    rng.shuffle(records)
    return records


def test_datatrove_survivor_rule_is_union_by_size():
    # band 0: docs 1 and 2 collide first (a set of 2 rooted at 1); band 1 then joins doc 0 to it
    keys = np.array([[10, 7], [11, 7], [11, 8]], dtype=np.uint64)
    first = np.zeros_like(keys)
    assert datatrove_roots(keys, first).tolist() == [1, 1, 1]
    assert cluster_roots(keys).tolist() == [0, 0, 0]
    assert datatrove_roots(keys, first, skip=np.array([False, True, False])).tolist() == [0, 1, 2]
    with pytest.raises(ConfigError, match="minhash.keep must be one of datatrove, first"):
        MinHashDedup(keep="last")


@pytest.mark.slow  # datatrove's spaCy word tokenizer takes seconds to load
def test_minhash_removes_what_datatrove_removes(tmp_path):
    """The oracle: datatrove's own four MinHash stages on the same two files remove the same documents
    (signatures, clusters and survivors), and skip the documents MinHash skips."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from lmforge.data.dedup.minhash import shingles

    _patch_datatrove_xxhash()
    signer = MinhashDedupSignature(output_folder=str(tmp_path / "sigs"))
    for r in SHORT_RECORDS:  # datatrove writes no signature for a document without shingles
        assert (signer.get_shingles(r["text"]).size == 0) == (shingles(r["text"], 5).size == 0), r["id"]
    text = prose(random.Random(8), lines=2)
    assert MinHashDedup().signature(text).tolist() == np.concatenate(
        signer.get_signature(signer.get_shingles(text))).tolist()

    records = near_duplicate_corpus(random.Random(9))
    half = len(records) // 2
    write_jsonl(tmp_path / "in" / "a.jsonl", records[:half])
    write_jsonl(tmp_path / "in" / "b.jsonl", records[half:])
    logs = tmp_path / "logs"
    for i, (pipeline, tasks) in enumerate([
        ([JsonlReader(str(tmp_path / "in")), MinhashDedupSignature(output_folder=str(tmp_path / "sigs"))], 2),
        ([MinhashDedupBuckets(str(tmp_path / "sigs"), str(tmp_path / "buckets"))], 14),
        ([MinhashDedupCluster(str(tmp_path / "buckets"), str(tmp_path / "remove"))], 1),
        ([JsonlReader(str(tmp_path / "in")), MinhashDedupFilter(str(tmp_path / "remove")),
          JsonlWriter(str(tmp_path / "dt"), output_filename="${rank}.jsonl", compression=None)], 2)]):
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=str(logs / str(i))).run()
    dt_kept = {r["id"] for f in (tmp_path / "dt").glob("*.jsonl") for r in read_jsonl(f)}
    removed = {}
    for keep in ("datatrove", "first"):
        clean_documents([tmp_path / "in"], tmp_path / keep, steps=[{"name": "minhash", "keep": keep}], workers=1,
                        progress=False)
        removed[keep] = {r["id"] for r in read_jsonl(tmp_path / keep / "rejects" / "minhash.jsonl")}
    assert {r["id"] for r in records} - removed["datatrove"] == dt_kept
    assert removed["first"] != removed["datatrove"]  # the corpus tells the two survivor rules apart
