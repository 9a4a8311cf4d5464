"""The cleaning pipeline: an ordered list of steps run over input files, with rejects, stats and resume.

Output layout (stable):
    OUT/kept/<shard>.jsonl[.zst]   kept documents, one {"id", "text", "metadata"} per line
    OUT/rejects/<step>.jsonl       every rejected document plus "step", "reason" and "source" (file:line)
    OUT/stats.json, OUT/report.md  documents/characters in and out per step, top reasons, examples
    OUT/.work/                     per-shard completion markers and barrier keys (resume state: JSON and
                                   numpy .npz files read without pickle, so a planted work file runs nothing);
                                   documents between stages keep their input's "source" (file:line) for rejects
    OUT/.lock                      held by the running `data clean` (one owner per OUT)

A shard is one input file, or one part of a file larger than `split_bytes` (a byte range of an
uncompressed JSONL file, a run of Parquet row groups: `readers.split_input`); parts are numbered in
file order, so the kept and rejects files, read in shard order, are the unsplit run's byte for byte.
Steps between barriers stream in one pass per shard; a barrier (global dedup) splits the run into
stages: stage k's shards all finish, the barrier resolves over every shard's keys, then stage k+1
applies its decision. A shard's marker is written last and atomically, so a killed run resumes at the
first shard without one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from lmforge.core.config import from_dict, option, suggest
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.core.files import atomic_write, atomic_write_json, atomic_write_text, dir_lock, writable_dir
from lmforge.data.executors import ExecutorName, map_shards
from lmforge.data.readers import (
    BadRecord,
    Document,
    InputPart,
    InvalidUTF8,
    iter_input_files,
    iter_records,
    split_input,
)
from lmforge.data.steps import Barrier, Step
from lmforge.data.writers import JsonlWriter, document_record

STEPS: dict[str, str] = {
    "language": "lmforge.data.filters.language:LanguageFilter",
    "gopher_repetition": "lmforge.data.filters.gopher:GopherRepetition",
    "gopher_quality": "lmforge.data.filters.gopher:GopherQuality",
    "c4": "lmforge.data.filters.c4:C4Quality",
    "fineweb": "lmforge.data.filters.fineweb:FineWebQuality",
    "keyword": "lmforge.data.filters.keyword:KeywordFilter",
    "url": "lmforge.data.filters.url:URLFilter",
    "gutenberg": "lmforge.data.filters.gutenberg:GutenbergFilter",
    "code": "lmforge.data.filters.code:CodeFilter",
    "perplexity": "lmforge.data.filters.perplexity:PerplexityFilter",
    "classifier": "lmforge.data.filters.classifier:ClassifierFilter",
    "toxicity": "lmforge.data.filters.toxicity:ToxicityFilter",
    "exact_dedup": "lmforge.data.dedup.exact:ExactDedup",
    "minhash": "lmforge.data.dedup.minhash:MinHashDedup",
    "line_dedup": "lmforge.data.dedup.lines:LineDedup",
    "c4_span_dedup": "lmforge.data.dedup.lines:SpanDedup",
    "decontaminate": "lmforge.data.dedup.decontaminate:Decontaminate",
    "pii": "lmforge.data.pii:PIIRedactor",
}
READ_STEP = "read"  # pseudo-step that owns unreadable records and oversized documents
N_EXAMPLES = 3


def step_class(name: str) -> type[Step]:
    if name not in STEPS:
        hint = suggest(name, list(STEPS))
        raise ConfigError(f"unknown step '{name}'" + (f" (did you mean '{hint}'?)" if hint else "")
                          + f"; steps: {', '.join(STEPS)}")
    module, cls = STEPS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_step(spec: dict[str, Any] | str, index: int = 0) -> Step:
    """A step from a recipe table {"name": ..., param: value}; bad names/params are one-line ConfigErrors."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = spec.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"steps[{index}]: every step needs a 'name' (one of {', '.join(STEPS)})")
    try:
        return from_dict(step_class(name), spec, prefix=f"steps[{index}].")
    except ConfigError as e:
        raise ConfigError(f"steps[{index}] ({name}): {e}") from None


def default_steps(lang: str = "en", dedup: str = "minhash", pii: bool = True) -> list[Step]:
    """FineWeb's order: language -> Gopher repetition -> Gopher quality -> C4 -> FineWeb -> dedup -> PII."""
    names: list[dict[str, Any]] = []
    if lang:
        names.append({"name": "language", "languages": [lang]})
    names += [{"name": n} for n in ("gopher_repetition", "gopher_quality", "c4", "fineweb")]
    if dedup == "minhash":
        names.append({"name": "minhash"})
    elif dedup == "exact":
        names.append({"name": "exact_dedup"})
    elif dedup != "none":
        raise ConfigError(f"dedup: '{dedup}' is not one of minhash, exact, none")
    if pii:
        names.append({"name": "pii"})
    return [make_step(n, i) for i, n in enumerate(names)]


# ----------------------------------------------------------------------------------------------
# per-step statistics


def new_stats() -> dict[str, Any]:
    return {"docs_in": 0, "docs_out": 0, "chars_in": 0, "chars_out": 0, "reasons": Counter(), "examples": {},
            "counters": Counter()}


def merge_stats(into: dict[str, Any], other: dict[str, Any]) -> None:
    for k in ("docs_in", "docs_out", "chars_in", "chars_out"):
        into[k] += other[k]
    into["reasons"].update(other["reasons"])
    into["counters"].update(other["counters"])
    for reason, examples in other["examples"].items():
        have = into["examples"].setdefault(reason, [])
        have.extend(examples[: N_EXAMPLES - len(have)])


# ----------------------------------------------------------------------------------------------
# one shard of one stage (runs in a worker process)


@dataclass
class ShardTask:
    stage: int
    shard: str
    input: Path
    first: bool  # reads raw input (vs the previous stage's output)
    labels: list[str]  # step labels, parallel to steps
    steps: list[Step]
    apply: tuple[str, Barrier, Any] | None  # previous barrier (label, step, plan for this shard)
    barrier: Barrier | None  # this stage's barrier: collect its keys
    output: Path  # kept documents of this stage
    rejects: Path  # folder for this shard's rejects, one file per step
    marker: Path
    text_field: str = "text"
    id_field: str = "id"
    invalid_utf8: InvalidUTF8 = "reject"
    max_doc_chars: int = 10_000_000
    carry_source: bool = False  # output is a work file: keep each document's input file:line for later stages
    part: InputPart | None = None  # stage 0: the part of the input file this shard reads (None: all of it)


def run_shard(task: ShardTask) -> dict[str, Any]:
    """Stream one shard through its steps; write kept docs, rejects, barrier keys, then the marker."""
    if shard_done(task):
        return read_marker(task.marker)
    stats = {label: new_stats() for label in [READ_STEP, *(task.apply[:1] if task.apply else []), *task.labels]}
    kept = JsonlWriter(task.output)
    rejects: dict[str, JsonlWriter] = {}
    keys: list[Any] = []
    ids: list[str] = []
    warnings: list[str] = []
    failures: list[str] = []  # input files that could not be read to the end

    def reject(label: str, doc: Document, reason: str) -> None:
        s = stats[label]
        s["reasons"][reason] += 1
        examples = s["examples"].setdefault(reason, [])
        if len(examples) < N_EXAMPLES:
            examples.append({"id": doc.id, "source": doc.source, "text": doc.text[:300]})
        if label not in rejects:
            rejects[label] = JsonlWriter(task.rejects / f"{label}.jsonl")
        rejects[label].write(document_record(doc, step=label, reason=reason, source=doc.source))

    def run_step(label: str, doc: Document, call: Any) -> bool:
        s = stats[label]
        s["docs_in"] += 1
        s["chars_in"] += len(doc.text)
        reason = call(doc)
        if reason is not None:
            reject(label, doc, reason)
            return False
        s["docs_out"] += 1
        s["chars_out"] += len(doc.text)
        return True

    try:
        n_read = 0
        for index, doc in enumerate(_shard_documents(task, reject, stats[READ_STEP], failures)):
            n_read += 1
            if task.apply is not None:
                label, barrier, plan = task.apply
                if not run_step(label, doc, lambda d, i=index, b=barrier, p=plan: b.apply(d, i, p)):
                    continue
            if all(run_step(label, doc, step) for label, step in zip(task.labels, task.steps)):
                if task.barrier is not None:
                    keys.append(task.barrier.key(doc))
                    ids.append(doc.id)
                kept.write(document_record(doc, source=doc.source) if task.carry_source else document_record(doc))
        whole_file = task.part is None or task.part.whole
        if task.first and n_read == 0 and not stats[READ_STEP]["reasons"] and whole_file:
            warnings.append(f"{task.input}: no documents (empty file)")
        for label, step in zip(task.labels, task.steps):
            stats[label]["counters"].update(step.pop_counters())
    except BaseException:
        kept.abort()
        for w in rejects.values():
            w.abort()
        raise
    kept.commit()
    for w in rejects.values():
        w.commit()
    if task.barrier is not None:
        save_keys(keys_path(task.marker), keys, ids)
    result = {"shard": task.shard, "stats": {k: _jsonable(v) for k, v in stats.items()}, "warnings": warnings,
              "failures": failures, "rejects": sorted(rejects)}
    atomic_write_json(task.marker, result)
    return read_marker(task.marker)


def shard_done(task: ShardTask) -> bool:
    """A shard finished by an earlier run: its marker, and its barrier keys when the stage has a barrier (a work
    directory of an older lmforge holds `.keys.pkl` files, which are never read: such a shard runs again)."""
    return task.marker.is_file() and (task.barrier is None or keys_path(task.marker).is_file())


def keys_path(marker: Path) -> Path:
    return marker.with_name(marker.name.removesuffix(".done.json") + ".keys.npz")


def save_keys(path: Path, keys: list[Any], ids: list[str]) -> None:
    """A shard's barrier keys and document ids as a numpy .npz of plain arrays (no pickle).

    A key is a non-negative int below 2**128 (exact dedup's hash), a uint64 numpy array (MinHash bands, line
    hashes) or a list of such ints (span hashes); one shard's keys are all of one kind. They are stored flat as
    uint64 words with per-document offsets; ids as UTF-8 JSON bytes.
    """
    kinds = {"int" if isinstance(k, int) else "array" if isinstance(k, np.ndarray) else "list" for k in keys}
    if len(kinds) > 1:
        raise LmforgeError(f"{path}: a barrier returned keys of mixed kinds {sorted(kinds)}")
    kind = kinds.pop() if kinds else "array"
    try:
        if kind == "int":
            if any(not 0 <= k < 2**128 for k in keys):
                raise OverflowError
            parts = [np.array([k & (2**64 - 1), k >> 64], dtype=np.uint64) for k in keys]
        else:
            parts = [np.asarray(k, dtype=np.uint64).reshape(-1) for k in keys]
    except (OverflowError, TypeError, ValueError):
        raise LmforgeError(f"{path}: barrier keys must be ints in [0, 2**128) or sequences of uint64") from None
    offsets = np.cumsum([0] + [len(p) for p in parts], dtype=np.int64)
    values = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
    id_bytes = np.frombuffer(json.dumps(ids).encode("utf-8"), dtype=np.uint8)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, kind=np.array(kind), values=values, offsets=offsets, ids=id_bytes)

    atomic_write(path, write)


def load_keys(path: Path) -> tuple[list[Any], list[str]]:
    """Inverse of `save_keys`; numpy refuses pickled arrays (allow_pickle=False), so nothing in it can run."""
    try:
        with np.load(path, allow_pickle=False) as f:
            kind, values, offsets = str(f["kind"]), f["values"], f["offsets"]
            ids = json.loads(f["ids"].tobytes().decode("utf-8"))
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path}: unreadable barrier keys ({e}); delete it to redo that shard") from None
    if values.dtype != np.uint64 or offsets.dtype != np.int64 or len(offsets) != len(ids) + 1 or not isinstance(
            ids, list) or kind not in ("int", "array", "list"):
        raise LmforgeError(f"{path}: malformed barrier keys; delete it to redo that shard")
    parts = [values[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    if kind == "int":
        return [int(p[0]) | int(p[1]) << 64 for p in parts], ids
    return (parts if kind == "array" else [p.tolist() for p in parts]), ids


def _shard_documents(task: ShardTask, reject: Any, read_stats: dict[str, Any], failures: list[str]):
    """Documents of the shard; at stage 0 unreadable records and oversized documents go to 'read' rejects,
    and a file that cannot be read to the end (a truncated archive, a bad Parquet footer) to `failures`."""
    if not task.first:
        yield from read_work_file(task.input)
        return
    try:
        for item in iter_records(task.input, task.text_field, task.id_field, task.invalid_utf8, task.part):
            if isinstance(item, BadRecord):
                read_stats["docs_in"] += 1
                reject(READ_STEP, Document(id=item.source, text=item.raw, source=item.source), item.problem)
                continue
            read_stats["docs_in"] += 1
            read_stats["chars_in"] += len(item.text)
            if len(item.text) > task.max_doc_chars:
                reject(READ_STEP, item, f"document_too_long ({len(item.text):,} > {task.max_doc_chars:,} chars)")
                continue
            read_stats["docs_out"] += 1
            read_stats["chars_out"] += len(item.text)
            yield item
    except LmforgeError as e:  # a corrupt archive or unreadable file: record it, keep what was read
        read_stats["reasons"][f"unreadable file: {e}"] += 1
        failures.append(str(e))


def read_work_file(path: Path) -> Iterator[Document]:
    """Documents a previous stage wrote (`carry_source`): their source stays the input's file:line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            r = json.loads(line)
            yield Document(id=r["id"], text=r["text"], source=r.get("source", f"{path}:{lineno}"),
                           metadata=r["metadata"])


def _jsonable(stats: dict[str, Any]) -> dict[str, Any]:
    return {**stats, "reasons": dict(stats["reasons"]), "counters": dict(stats["counters"])}


def read_marker(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    for s in data["stats"].values():
        s["reasons"] = Counter(s["reasons"])
        s["counters"] = Counter(s["counters"])
    return data


# ----------------------------------------------------------------------------------------------
# the pipeline


class Pipeline:
    """`Pipeline([steps]).run(inputs, output)`: run the steps over every input file (see module docstring).

    workers: processes (0: all cores; 1: in this process). executor: "local" or "ray".
    compress: write kept shards as .jsonl.zst. invalid_utf8: "reject" a bad record or "repair" it
    (U+FFFD, counted in metadata). max_doc_chars: longer documents are rejected at read time.
    overwrite: clear an OUT holding a run of a different step list instead of refusing.
    split_bytes: an input file larger than this is read as several shards (0: one shard per file).
    """

    def __init__(self, steps: Sequence[Step], workers: int = 0, executor: ExecutorName = "local",
                 compress: bool = False, text_field: str = "text", id_field: str = "id",
                 invalid_utf8: InvalidUTF8 = "reject", max_doc_chars: int = 10_000_000,
                 overwrite: bool = False, progress: bool = True, split_bytes: int = 64 << 20) -> None:
        if not steps:
            raise ConfigError("a pipeline needs at least one step")
        self.steps = list(steps)
        self.labels = _unique_labels(self.steps)
        self.workers, self.executor, self.compress = workers, executor, compress
        self.text_field, self.id_field, self.invalid_utf8 = text_field, id_field, invalid_utf8
        self.max_doc_chars, self.overwrite, self.progress = max_doc_chars, overwrite, progress
        self.split_bytes = split_bytes

    def stages(self) -> list[tuple[list[int], int | None]]:
        """Step indices per stage: (streaming steps, the barrier ending the stage or None)."""
        out: list[tuple[list[int], int | None]] = []
        current: list[int] = []
        for i, step in enumerate(self.steps):
            if isinstance(step, Barrier):
                out.append((current, i))
                current = []
            else:
                current.append(i)
        out.append((current, None))
        return out

    def fingerprint(self) -> str:
        desc = repr([(label, step) for label, step in zip(self.labels, self.steps)])
        desc += repr((self.text_field, self.id_field, self.invalid_utf8, self.max_doc_chars, self.compress,
                      self.split_bytes))
        return hashlib.sha256(desc.encode()).hexdigest()[:16]

    def run(self, inputs: Sequence[str | Path] | str | Path, output: str | Path) -> dict[str, Any]:
        files = input_files(inputs)
        output = writable_dir(output, "output")
        with dir_lock(output):  # a second `data clean` on this OUT would delete this one's work files
            return self._run(files, output)

    def _run(self, files: list[Path], output: Path) -> dict[str, Any]:
        start = time.perf_counter()
        work = output / ".work"
        self._claim(output, work, files)
        parts = [part for f in files for part in split_input(f, self.split_bytes)]
        index = {f: i for i, f in enumerate(files)}
        shards = [f"{index[p.path]:05d}-{_slug(p.path)}" + ("" if p.whole else f"-part{p.index:05d}") for p in parts]
        suffix = ".jsonl.zst" if self.compress else ".jsonl"
        stages = self.stages()
        results: list[list[dict[str, Any]]] = []
        plans: list[Any] | None = None
        for k, (streaming, barrier_idx) in enumerate(stages):
            last = k == len(stages) - 1
            prev = stages[k - 1][1] if k > 0 else None
            tasks = []
            for s, shard in enumerate(shards):
                tasks.append(ShardTask(
                    stage=k, shard=shard, first=k == 0,
                    input=parts[s].path if k == 0 else work / f"stage{k - 1}" / f"{shard}.jsonl",
                    labels=[self.labels[i] for i in streaming], steps=[self.steps[i] for i in streaming],
                    apply=(self.labels[prev], self.steps[prev], plans[s]) if prev is not None and plans else None,
                    barrier=self.steps[barrier_idx] if barrier_idx is not None else None,
                    output=(output / "kept" / f"{shard}{suffix}") if last else work / f"stage{k}" / f"{shard}.jsonl",
                    rejects=work / f"stage{k}" / "rejects" / shard, marker=work / f"stage{k}" / f"{shard}.done.json",
                    text_field=self.text_field, id_field=self.id_field, invalid_utf8=self.invalid_utf8,
                    max_doc_chars=self.max_doc_chars, carry_source=not last, part=parts[s] if k == 0 else None))
            names = [self.labels[i] for i in streaming] + ([self.labels[barrier_idx]] if barrier_idx is not None
                                                           else [])
            results.append(self._run_stage(tasks, f"stage {k + 1}/{len(stages)} [{', '.join(names) or '-'}]"))
            if barrier_idx is not None:
                keys, ids = [], []
                for t in tasks:
                    shard_keys, shard_ids = load_keys(keys_path(t.marker))
                    keys.append(shard_keys)
                    ids.append(shard_ids)
                plans = self.steps[barrier_idx].resolve(keys, ids)
        stats = self._finish(output, work, results, (len(files), len(parts)), time.perf_counter() - start)
        return stats

    def _run_stage(self, tasks: list[ShardTask], desc: str) -> list[dict[str, Any]]:
        todo = [t for t in tasks if not shard_done(t)]
        bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc=desc, unit="shard",
                   disable=not self.progress, dynamic_ncols=True)
        docs = [0]

        def done(result: dict[str, Any]) -> None:
            docs[0] += max(s["docs_in"] for s in result["stats"].values())
            bar.update(1)
            bar.set_postfix_str(f"{docs[0]:,} docs")

        with bar:
            map_shards(run_shard, todo, self.workers, self.executor, on_result=done)
        return [read_marker(t.marker) for t in tasks]

    def _claim(self, output: Path, work: Path, files: list[Path]) -> None:
        """Refuse to mix two different runs in one OUT; a rerun of the same run resumes."""
        run_file = work / "run.json"
        fingerprint = self.fingerprint()
        inputs = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]  # an edited input is a new run
        if run_file.is_file():
            previous = json.loads(run_file.read_text(encoding="utf-8"))
            same = previous.get("fingerprint") == fingerprint and previous.get("inputs") == inputs
            if not same and not self.overwrite:
                raise LmforgeError(f"{output} holds a run with other inputs or steps; use another --output "
                                   "or --overwrite true")
            if not same:
                for sub in (work, output / "kept", output / "rejects"):
                    shutil.rmtree(sub, ignore_errors=True)
        elif (output / "kept").is_dir() and any((output / "kept").iterdir()) and not self.overwrite:
            raise LmforgeError(f"{output}/kept already holds files not made by this run; use another --output "
                               "or --overwrite true")
        elif self.overwrite:
            shutil.rmtree(output / "kept", ignore_errors=True)
            shutil.rmtree(output / "rejects", ignore_errors=True)
        atomic_write_json(run_file, {"fingerprint": fingerprint, "inputs": inputs,
                                     "steps": [[label, repr(step)] for label, step in zip(self.labels, self.steps)]})

    def _finish(self, output: Path, work: Path, results: list[list[dict[str, Any]]], n_inputs: tuple[int, int],
                seconds: float) -> dict[str, Any]:
        """Merge per-shard stats and rejects into OUT/stats.json, OUT/report.md and OUT/rejects/<step>.jsonl."""
        order = [READ_STEP, *self.labels]
        merged = {label: new_stats() for label in order}
        warnings: list[str] = []
        failures: list[str] = []
        for k, stage in enumerate(results):
            for result in stage:
                for label, s in result["stats"].items():
                    if label != READ_STEP or k == 0:
                        merge_stats(merged[label], s)
                warnings += result["warnings"]
                failures += result.get("failures", [])
        _merge_rejects(output, work, len(results), order)
        kept_docs = merged[self.labels[-1]]["docs_out"]
        stats = {
            "inputs": n_inputs[0], "shards": n_inputs[1], "seconds": round(seconds, 3),
            "docs_in": merged[READ_STEP]["docs_in"], "chars_in": merged[READ_STEP]["chars_in"],
            "docs_kept": kept_docs, "chars_kept": merged[self.labels[-1]]["chars_out"],
            "docs_per_second": round(merged[READ_STEP]["docs_in"] / max(seconds, 1e-9), 1),
            "steps": [{"name": label, **_jsonable(merged[label]),
                       "reasons": dict(merged[label]["reasons"].most_common())} for label in order],
            "warnings": warnings,
            "failed_inputs": failures,
            "records_rejected_at_read": merged[READ_STEP]["docs_in"] - merged[READ_STEP]["docs_out"],
            "output": {"kept": str(output / "kept"), "rejects": str(output / "rejects")},
        }
        atomic_write_json(output / "stats.json", stats)
        atomic_write_text(output / "report.md", render_report(stats))
        for k in range(len(results) - 1):  # intermediate documents are no longer needed; markers stay
            for f in (work / f"stage{k}").glob("*.jsonl"):
                f.unlink()
        return stats


def _merge_rejects(output: Path, work: Path, n_stages: int, order: list[str]) -> None:
    """Concatenate per-shard reject files into one file per step, in shard order."""
    rejects = output / "rejects"
    rejects.mkdir(parents=True, exist_ok=True)
    for label in order:
        files = [p for k in range(n_stages) for p in sorted((work / f"stage{k}" / "rejects").glob(f"*/{label}.jsonl"))]
        if not files:
            continue
        dest = rejects / f"{label}.jsonl"
        tmp = dest.with_suffix(".jsonl.tmp")
        with open(tmp, "wb") as out:
            for p in files:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out)
        tmp.replace(dest)


def render_report(stats: dict[str, Any]) -> str:
    """A readable summary: per-step table, most common reasons, a few examples each."""
    lines = ["# Cleaning report", "",
             f"{stats['inputs']} input files, {stats['docs_in']:,} documents in, {stats['docs_kept']:,} kept "
             f"({stats['chars_kept']:,} of {stats['chars_in']:,} characters) in {stats['seconds']:.1f} s "
             f"({stats['docs_per_second']:,.0f} docs/s).", "",
             "| step | docs in | docs out | removed | chars in | chars out |", "|---|---:|---:|---:|---:|---:|"]
    for s in stats["steps"]:
        removed = s["docs_in"] - s["docs_out"]
        pct = f"{100 * removed / s['docs_in']:.1f}%" if s["docs_in"] else "-"
        lines.append(f"| {s['name']} | {s['docs_in']:,} | {s['docs_out']:,} | {removed:,} ({pct}) | "
                     f"{s['chars_in']:,} | {s['chars_out']:,} |")
    for s in stats["steps"]:
        if not s["reasons"] and not s["counters"]:
            continue
        lines += ["", f"## {s['name']}", ""]
        if s["counters"]:
            lines.append("Counts: " + ", ".join(f"{k} {v:,}" for k, v in sorted(s["counters"].items())))
            lines.append("")
        for reason, n in list(s["reasons"].items())[:8]:
            lines.append(f"- **{reason}**: {n:,}")
            for ex in s["examples"].get(reason, [])[:2]:
                snippet = " ".join(ex["text"][:160].split()).replace("|", "\\|")
                lines.append(f"  - `{ex['id']}`: {snippet}")
    if stats.get("failed_inputs"):
        lines += ["", "## Input files not read to the end", ""] + [f"- {w}" for w in stats["failed_inputs"]]
    if stats["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in stats["warnings"]]
    return "\n".join(lines) + "\n"


def input_files(inputs: Sequence[str | Path] | str | Path) -> list[Path]:
    """Every input file, in order; a directory with no files or no inputs at all is a one-line error."""
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not inputs:
        raise LmforgeError("no input given (--input PATH ...)")
    files: list[Path] = []
    for p in inputs:
        found = list(iter_input_files([p]))
        if not found:
            raise LmforgeError(f"{p}: directory holds no input files")
        files += found
    return files


def _unique_labels(steps: Sequence[Step]) -> list[str]:
    seen: Counter[str] = Counter()
    labels = []
    for step in steps:
        seen[step.name] += 1
        labels.append(step.name if seen[step.name] == 1 else f"{step.name}_{seen[step.name]}")
    return labels


def _slug(path: Path) -> str:
    name = path.name.split(".")[0] or "file"
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40]


# ----------------------------------------------------------------------------------------------
# Python API and CLI


def clean_documents(inputs: Sequence[str | Path] | str | Path, output: str | Path,
                    steps: Sequence[Step | dict[str, Any] | str] | None = None, **options: Any) -> dict[str, Any]:
    """Clean `inputs` into `output` (layout in the module docstring) and return the stats dict.

    steps: Step objects, recipe tables ({"name": ..., params}) or names; None: `default_steps()`.
    options: Pipeline keyword arguments (workers, compress, invalid_utf8, ...).
    """
    built = default_steps() if steps is None else [
        s if isinstance(s, Step) else make_step(s, i) for i, s in enumerate(steps)]
    return Pipeline(built, **options).run(inputs, output)


@dataclass
class CleanConfig:
    input: list[str] = option(default_factory=list, help="JSONL(.gz/.zst), Parquet, WARC, text files or folders")
    output: str = option("clean", help="output folder: kept/, rejects/, stats.json, report.md")
    lang: str = option("en", help="language to keep ('' skips language identification); default chain only")
    dedup: Literal["minhash", "exact", "none"] = option("minhash", help="de-duplication; default chain only")
    pii: bool = option(True, help="redact e-mails, phones, IPs, cards, IBANs; default chain only")
    steps: list[str | dict[str, Any]] = option(
        default_factory=list, help="step names or [[steps]] tables (name + parameters); replace the default chain")
    text_field: str = option("text", help="JSONL/Parquet field holding the text")
    id_field: str = option("id", help="JSONL/Parquet field holding the document id")
    invalid_utf8: Literal["reject", "repair"] = option("reject", help="reject or repair (U+FFFD) invalid UTF-8")
    max_doc_chars: int = option(10_000_000, help="reject longer documents at read time")
    compress: bool = option(False, help="write kept shards as .jsonl.zst")
    workers: int = option(0, help="processes (0: all cores)")
    executor: Literal["local", "ray"] = option("local", help="local process pool or Ray")
    overwrite: bool = option(False, help="replace an OUT holding a different run")
    split_mb: int = option(64, help="read an input file larger than this many MiB as several shards (uncompressed "
                                    "JSONL by byte range, Parquet by row group); 0: one shard per file")


def clean_cmd(cfg: CleanConfig) -> int:
    steps = ([make_step(s, i) for i, s in enumerate(cfg.steps)] if cfg.steps
             else default_steps(cfg.lang, cfg.dedup, cfg.pii))
    options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
               if f.name in ("workers", "executor", "compress", "text_field", "id_field", "invalid_utf8",
                             "max_doc_chars", "overwrite")}
    options["split_bytes"] = cfg.split_mb << 20
    stats = Pipeline(steps, **options).run(cfg.input, cfg.output)
    print(f"kept {stats['docs_kept']:,} of {stats['docs_in']:,} documents "
          f"({stats['docs_per_second']:,.0f} docs/s); report: {Path(cfg.output) / 'report.md'}")
    return report_failures(stats)


def report_failures(stats: dict[str, Any]) -> int:
    """Say on stderr what was not read: records rejected at read time (a warning), and input files that could not
    be read to the end (an error: exit status 1, though everything readable was cleaned and written)."""
    rejected, failed = stats["records_rejected_at_read"], stats["failed_inputs"]
    if rejected:
        print(f"warning: {rejected:,} of {stats['docs_in']:,} records rejected at read time (unreadable or too "
              f"long): {Path(stats['output']['rejects']) / (READ_STEP + '.jsonl')}", file=sys.stderr)
    for message in failed:
        print(f"error: input not read to the end: {message}", file=sys.stderr)
    if failed:
        print(f"lmforge: error: {len(failed)} of {stats['inputs']} input files could not be read to the end "
              "(their readable records were cleaned)", file=sys.stderr)
    return 1 if failed else 0
