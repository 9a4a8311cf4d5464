"""lmforge's cleaning pipeline vs datatrove on the same corpus: Gopher repetition -> Gopher quality -> C4 ->
FineWeb -> MinHash (5-grams, 14 x 8), both with a 2-process local executor, one run each.

The corpus (>= 100k documents) is built from tinyshakespeare and the Python stdlib (code and pydoc
topics): random spans of 8-40 lines, perturbed (word substitutions, boilerplate, shouting, lorem ipsum),
so filters and near-duplicate removal both have work. Prints docs/s for both, the ratio, and how often
the two agree on keep/remove, per filter chain and end to end (with dedup), and appends the rows to
benchmarks/RESULTS.md with the machine's load average at the start.

Two layouts: `many` files (one shard per file for both tools) and `one` large file, which lmforge splits
into byte ranges (`split_bytes`) so every worker has work, while datatrove reads a file in one task.

    .venv/bin/python benchmarks/data_pipeline.py --docs 100000 --workers 2 --layout both
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

from common import append_results, machine_line, scratch_dir, table
from textdata import SHAKESPEARE  # tests/, on the import path through common

from lmforge.data.corpus import pydoc_topic_documents, stdlib_code_documents
from lmforge.data.pipeline import Pipeline, make_step

BOILERPLATE = ["Home | About | Contact", "Subscribe to our newsletter!", "All rights reserved."]


def build_corpus(out: Path, n_docs: int, n_files: int, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    sources = [SHAKESPEARE.read_text(encoding="utf-8").split("\n")]
    sources.append([line for d in pydoc_topic_documents() for line in d["text"].split("\n")])
    sources.append([line for d in stdlib_code_documents() for line in d["text"].split("\n")][:400_000])
    vocab = list({w for line in sources[0][:20000] for w in line.split()})
    files = [out / f"part{i:02d}.jsonl" for i in range(n_files)]
    handles = [open(f, "w", encoding="utf-8") for f in files]
    for i in range(n_docs):
        lines = sources[rng.choices((0, 1, 2), weights=(5, 3, 2))[0]]
        start = rng.randrange(len(lines) - 40)
        text = "\n".join(lines[start:start + rng.randint(8, 40)])
        r = rng.random()
        if r < 0.3:  # light edit: a near-duplicate of whatever shares the span
            words = text.split(" ")
            for _ in range(max(1, len(words) // 50)):
                words[rng.randrange(len(words))] = rng.choice(vocab)
            text = " ".join(words)
        elif r < 0.4:
            text += "\n" + "\n".join(rng.choice(BOILERPLATE) for _ in range(rng.randint(3, 10)))
        elif r < 0.45:
            text = text.upper()
        elif r < 0.48:
            text += "\nLorem ipsum dolor sit amet, consectetur adipiscing elit."
        handles[i % n_files].write(json.dumps({"id": f"doc{i}", "text": text}) + "\n")
    for h in handles:
        h.close()
    return files


def run_lmforge(inputs: Path, out: Path, workers: int, split_bytes: int = 64 << 20
                ) -> tuple[float, set[str], set[str], dict[str, str]]:
    steps = [make_step(n) for n in ("gopher_repetition", "gopher_quality", "c4", "fineweb", "minhash")]
    start = time.perf_counter()
    Pipeline(steps, workers=workers, progress=False, split_bytes=split_bytes).run([inputs], out)
    seconds = time.perf_counter() - start
    kept = {json.loads(line)["id"] for f in (out / "kept").glob("*.jsonl") for line in open(f)}
    rejects = out / "rejects" / "minhash.jsonl"
    records = [json.loads(line) for line in open(rejects)] if rejects.exists() else []
    survivor = {r["id"]: r["metadata"]["duplicate_of"] for r in records}
    survivor.update({s: s for s in set(survivor.values())})
    return seconds, kept | set(survivor), kept, survivor  # (passed the filters, kept after dedup, clusters)


def _patch_datatrove_xxhash() -> None:
    """datatrove passes str to xxhash, which xxhash>=4 refuses; encode first (workers fork, so they inherit it)."""
    import xxhash
    from datatrove.utils.hashes import xxhash as dt_xxhash

    dt_xxhash.xxhash64 = lambda data: xxhash.xxh64_intdigest(data.encode() if isinstance(data, str) else data)
    dt_xxhash.xxhash32 = lambda data: xxhash.xxh32_intdigest(data.encode() if isinstance(data, str) else data)


def run_datatrove(inputs: Path, out: Path, workers: int, n_files: int
                  ) -> tuple[float, set[str], set[str], dict[str, str]]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    _patch_datatrove_xxhash()
    config = MinhashConfig()  # 5-grams, 14 buckets x 8 hashes: the same as lmforge's defaults
    logs = out / "logs"
    stage1 = LocalPipelineExecutor(pipeline=[
        JsonlReader(str(inputs), glob_pattern="*.jsonl"), GopherRepetitionFilter(), GopherQualityFilter(),
        C4QualityFilter(), FineWebQualityFilter(),
        JsonlWriter(str(out / "filtered"), output_filename="${rank}.jsonl", compression=None),
        MinhashDedupSignature(output_folder=str(out / "sigs"), config=config)],
        tasks=n_files, workers=workers, logging_dir=str(logs / "1"), start_method="fork")
    stage2 = LocalPipelineExecutor(
        pipeline=[MinhashDedupBuckets(str(out / "sigs"), str(out / "buckets"), config=config)],
        tasks=config.num_buckets, workers=workers, logging_dir=str(logs / "2"), start_method="fork")
    stage3 = LocalPipelineExecutor(pipeline=[MinhashDedupCluster(str(out / "buckets"), str(out / "remove"),
                                                                 config=config, save_cluster_id=True)],
                                   tasks=1, logging_dir=str(logs / "3"), start_method="fork")
    removed = JsonlWriter(str(out / "removed"), output_filename="${rank}.jsonl", compression=None)
    stage4 = LocalPipelineExecutor(pipeline=[
        JsonlReader(str(out / "filtered"), glob_pattern="*.jsonl"),
        MinhashDedupFilter(str(out / "remove"), exclusion_writer=removed, load_cluster_ids=True),
        JsonlWriter(str(out / "kept"), output_filename="${rank}.jsonl", compression=None)],
        tasks=n_files, workers=workers, logging_dir=str(logs / "4"), start_method="fork")
    start = time.perf_counter()
    for stage in (stage1, stage2, stage3, stage4):
        stage.run()
    seconds = time.perf_counter() - start
    filtered = {json.loads(line)["id"] for f in (out / "filtered").glob("*.jsonl") for line in open(f)}
    kept = {json.loads(line)["id"] for f in (out / "kept").glob("*.jsonl") for line in open(f)}
    cluster: dict[str, int] = {}
    for f in [*(out / "kept").glob("*.jsonl"), *(out / "removed").glob("*.jsonl")]:
        for line in open(f):
            r = json.loads(line)
            if r["metadata"].get("minhash_cluster_id", -1) >= 0:
                cluster[r["id"]] = r["metadata"]["minhash_cluster_id"]
    keeper = {c: i for i, c in cluster.items() if i in kept}
    return seconds, filtered, kept, {i: keeper.get(c, f"cluster {c}") for i, c in cluster.items()}


def breakdown(ids: list[str], lm: tuple[set[str], set[str], dict[str, str]],
              dt: tuple[set[str], set[str], dict[str, str]]) -> dict[str, int]:
    """Why the keep/remove decisions differ: a filter, the members of a duplicate cluster, or only which
    member of the same cluster survives. Each side is (passed the filters, kept, {member: survivor})."""
    def members(survivor: dict[str, str]) -> dict[str, frozenset[str]]:
        by_root: dict[str, set[str]] = {}
        for i, root in survivor.items():
            by_root.setdefault(root, set()).add(i)
        return {i: frozenset(by_root[root]) for i, root in survivor.items()}

    lm_members, dt_members = members(lm[2]), members(dt[2])
    out = {"filters": 0, "cluster members": 0, "survivor of the same cluster": 0}
    for i in ids:
        if (i in lm[1]) == (i in dt[1]):
            continue
        if (i in lm[0]) != (i in dt[0]):
            out["filters"] += 1
        elif lm_members.get(i, frozenset([i])) == dt_members.get(i, frozenset([i])):
            out["survivor of the same cluster"] += 1
        else:
            out["cluster members"] += 1
    return out


def compare(tmp: Path, n_docs: int, n_files: int, workers: int, split_parts: int) -> list[tuple[str, ...]]:
    """Build the corpus in `n_files` files, run both tools, return the table rows."""
    (tmp / "in").mkdir()
    files = build_corpus(tmp / "in", n_docs, n_files)
    size = sum(f.stat().st_size for f in files)
    ids = [f"doc{i}" for i in range(n_docs)]
    split = size // split_parts + 1 if n_files == 1 else 64 << 20
    lm_s, lm_filtered, lm_kept, lm_clusters = run_lmforge(tmp / "in", tmp / "lmforge", workers, split)
    dt_s, dt_filtered, dt_kept, dt_clusters = run_datatrove(tmp / "in", tmp / "datatrove", workers, n_files)
    why = breakdown(ids, (lm_filtered, lm_kept, lm_clusters), (dt_filtered, dt_kept, dt_clusters))
    agree_filters = sum((i in lm_filtered) == (i in dt_filtered) for i in ids) / len(ids)
    agree_all = sum((i in lm_kept) == (i in dt_kept) for i in ids) / len(ids)
    layout = (f"1 file of {size / 2**20:.0f} MiB (lmforge: {split_parts} byte ranges)" if n_files == 1
              else f"{n_files} files")
    return [
        (f"documents/s (filters + MinHash), {layout}", f"{n_docs / lm_s:,.0f}", f"{n_docs / dt_s:,.0f}",
         f"{dt_s / lm_s:.2f}x"),
        (f"wall time, s, {layout}", f"{lm_s:.1f}", f"{dt_s:.1f}", f"{dt_s / lm_s:.2f}x"),
        (f"docs passing the 4 filters, {layout}", f"{len(lm_filtered):,}", f"{len(dt_filtered):,}", "-"),
        (f"docs kept after MinHash, {layout}", f"{len(lm_kept):,}", f"{len(dt_kept):,}", "-"),
        (f"decision agreement, filters, {layout}", f"{agree_filters:.2%}", "-", "-"),
        (f"decision agreement, filters + MinHash, {layout}", f"{agree_all:.2%}", "-", "-"),
        *((f"decisions differing: {k}, {layout}", f"{v:,}", "-", "-") for k, v in why.items()),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--files", type=int, default=8, help="files of the 'many' layout")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--layout", choices=("one", "many", "both"), default="both")
    parser.add_argument("--split_parts", type=int, default=8, help="byte ranges lmforge cuts the one file into")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "RESULTS.md",
                        help="append the rows here ('' : print only)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = machine_line(parallel=f"{args.workers} workers", extra=f"load average {load:.1f} at start")
    command = (f"benchmarks/data_pipeline.py --docs {args.docs} --workers {args.workers} --layout {args.layout} "
               f"--files {args.files} --split_parts {args.split_parts}")
    rows: list[tuple[str, ...]] = []
    for n_files in {"one": [1], "many": [args.files], "both": [1, args.files]}[args.layout]:
        with scratch_dir("lmforge-bench-data-", keep=args.keep) as tmp:
            rows += compare(tmp, args.docs, n_files, args.workers, args.split_parts)
    print(table(rows, machine, command, peer="datatrove", numeric=True))
    if str(args.results):
        append_results(args.results, rows, machine, command)


if __name__ == "__main__":
    main()
