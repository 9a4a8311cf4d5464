"""One big input file is read as several shards (byte ranges of JSONL, row groups of Parquet): the output, read in
shard order, and every count are those of the one-shard run."""

import json
import random
from pathlib import Path

import pytest
from textdata import prose

from lmforge.data.pipeline import Pipeline, make_step
from lmforge.data.readers import InputPart, iter_records, split_input

STEPS = ["gopher_repetition", "exact_dedup", "minhash", "pii"]


def big_jsonl(path: Path, n: int = 120) -> Path:
    """Prose, exact and near copies, PII, a malformed line, and one very long line (it crosses part bounds)."""
    rng = random.Random(1)
    texts = [prose(rng) for _ in range(n)]
    lines = []
    for i, text in enumerate(texts):
        if i % 10 == 3:
            text = texts[i - 3]  # exact copy
        elif i % 10 == 7:
            text = texts[i - 2].replace(" the ", " a ", 1)  # near copy
        elif i % 10 == 5:
            text += f"\nmail me at user{i}@example.org"
        lines.append(json.dumps({"id": f"d{i}", "text": text}))
        if i == 40:
            lines.append('{"id": "broken", "text": ')
        if i == 60:
            lines.append(json.dumps({"id": "long", "text": " ".join(prose(rng) for _ in range(40))}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run(inputs: list[Path], out: Path, split_bytes: int, workers: int, executor: str = "local") -> dict:
    steps = [make_step(s, i) for i, s in enumerate(STEPS)]
    return Pipeline(steps, workers=workers, executor=executor, split_bytes=split_bytes, progress=False).run(inputs, out)


def concatenated(out: Path) -> dict[str, bytes]:
    """kept/ as one stream in shard order, and each rejects file."""
    kept = b"".join(f.read_bytes() for f in sorted((out / "kept").iterdir()))
    return {"kept": kept, **{f.name: f.read_bytes() for f in sorted((out / "rejects").iterdir())}}


def counts(stats: dict) -> list:
    return [(s["name"], s["docs_in"], s["docs_out"], s["chars_in"], s["chars_out"], s["reasons"])
            for s in stats["steps"]] + [stats["docs_in"], stats["docs_kept"], stats["records_rejected_at_read"]]


@pytest.mark.parametrize("workers", [2, 4])
def test_one_big_jsonl_on_every_worker_matches_one_shard(tmp_path, workers):
    src = big_jsonl(tmp_path / "in" / "big.jsonl")
    size = src.stat().st_size
    whole = run([src], tmp_path / "one", 0, 1)
    split = run([src], tmp_path / "split", size // 4 + 1, workers)
    assert len(list((tmp_path / "split" / "kept").iterdir())) == 4  # 4 shards, each with its own kept file
    assert (split["inputs"], split["shards"], whole["shards"]) == (1, 4, 1)
    assert len(list((tmp_path / "one" / "kept").iterdir())) == 1
    assert concatenated(tmp_path / "split") == concatenated(tmp_path / "one")
    assert counts(split) == counts(whole)
    assert whole["docs_in"] == 120 + 2  # every line counted once: the 120 documents, the long one, the broken one
    assert whole["steps"][2]["docs_in"] > whole["steps"][2]["docs_out"]  # minhash did remove near copies


def test_a_line_crossing_a_boundary_is_read_once_with_its_line_number(tmp_path):
    lines = [json.dumps({"id": str(i), "text": "x" * (i * 7 % 50)}) for i in range(200)]
    src = tmp_path / "a.jsonl"
    src.write_text("\n".join(lines), encoding="utf-8")  # no final newline
    whole = [(d.id, d.source) for d in iter_records(src)]
    size = src.stat().st_size
    for n_bytes in (1, 7, 64, 333, size // 3, size - 1):
        parts = split_input(src, n_bytes)
        assert len(parts) > 1 and parts[0].start == 0 and parts[-1].end == size
        got = [(d.id, d.source) for p in parts for d in iter_records(src, part=p)]
        assert got == whole, n_bytes
    # a part starting inside a line skips it; one starting right after a newline keeps that line
    first_nl = src.read_bytes().index(b"\n")
    inside = InputPart(src, 1, 2, 3, size, 0)
    assert next(iter_records(src, part=inside)).source == f"{src}:2"
    at_start = InputPart(src, 1, 2, first_nl + 1, size, 1)
    assert next(iter_records(src, part=at_start)).source == f"{src}:2"


def test_compressed_and_text_files_stay_one_shard(tmp_path):
    import gzip

    raw = "\n".join(json.dumps({"text": "word " * 20}) for _ in range(100)).encode()
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress(raw))
    zst = tmp_path / "a.jsonl.zst"
    zst.write_bytes(pytest.importorskip("zstandard").ZstdCompressor().compress(raw))
    txt = tmp_path / "a.txt"
    txt.write_bytes(raw)
    for f in (gz, zst, txt):  # a compressed stream cannot be entered in the middle; a text file is one document
        assert split_input(f, 16) == [InputPart(f)]


def test_parquet_is_split_by_row_group(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    src = big_jsonl(tmp_path / "in" / "big.jsonl")
    records = [json.loads(line) for line in src.read_text().splitlines() if line.endswith("}")]
    table = pa.table({"id": [r["id"] for r in records], "text": [r["text"] for r in records]})
    path = tmp_path / "pq" / "big.parquet"
    path.parent.mkdir()
    pq.write_table(table, path, row_group_size=20)
    parts = split_input(path, path.stat().st_size // 3 + 1)
    assert [(p.start, p.end) for p in parts] == [(0, 2), (2, 4), (4, 7)]  # 121 rows in 7 row groups: 3 parts
    whole = run([path], tmp_path / "one", 0, 1)
    split = run([path], tmp_path / "split", path.stat().st_size // 3 + 1, 2)
    assert concatenated(tmp_path / "split") == concatenated(tmp_path / "one")
    assert counts(split) == counts(whole)
    rows = [d.source for p in parts for d in iter_records(path, part=p)]
    assert rows == [f"{path}:{i}" for i in range(1, len(records) + 1)]


@pytest.mark.slow  # starting Ray takes 10-40 s on a shared 2-core machine
def test_one_big_file_on_ray_matches_the_local_executor(tmp_path):
    ray = pytest.importorskip("ray")
    src = big_jsonl(tmp_path / "in" / "big.jsonl")
    local = run([src], tmp_path / "local", src.stat().st_size // 3 + 1, 2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = run([src], tmp_path / "ray", src.stat().st_size // 3 + 1, 2, executor="ray")
    finally:
        ray.shutdown()
    names = [sorted(f.name for f in (tmp_path / run / "kept").iterdir()) for run in ("ray", "local")]
    assert names[0] == names[1] and len(names[0]) == 3
    assert concatenated(tmp_path / "ray") == concatenated(tmp_path / "local")
    assert counts(on_ray) == counts(local)


def test_a_split_run_resumes_at_the_missing_part_with_other_worker_counts(tmp_path):
    src = big_jsonl(tmp_path / "in" / "big.jsonl")
    split = src.stat().st_size // 3 + 1
    first = run([src], tmp_path / "out", split, 2)
    expected = concatenated(tmp_path / "out")
    marker = next((tmp_path / "out" / ".work" / "stage0").glob("*-part00001.done.json"))
    marker.unlink()  # as if the run was killed while part 1 of stage 0 ran
    again = run([src], tmp_path / "out", split, 1)  # fewer workers: the same parts, so it resumes
    assert concatenated(tmp_path / "out") == expected and counts(again) == counts(first)
