import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
from textdata import FRENCH, gibberish, prose, read_jsonl, write_jsonl

from lmforge.cli import main
from lmforge.core.config import option
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.data.pipeline import Pipeline, clean_documents, default_steps, make_step
from lmforge.data.readers import Document, read_documents
from lmforge.data.steps import Step


def planted_corpus(tmp_path: Path) -> tuple[list[Path], dict[str, str]]:
    """Two shards: good prose, gibberish, French, boilerplate, an exact copy, PII; expected step per id."""
    rng = random.Random(0)
    good = [prose(rng) for _ in range(6)]
    a = write_jsonl(tmp_path / "in" / "a.jsonl", [
        {"id": "good0", "text": good[0]}, {"id": "good1", "text": good[1]},
        {"id": "gib", "text": gibberish(rng)},
        {"id": "fr", "text": FRENCH * 8},
        {"id": "boiler", "text": "\n".join(["Click here to subscribe to our weekly newsletter, friends."] * 12)},
        {"id": "pii", "text": good[2] + "\nWrite to jane.doe@example.org or call +1 415-555-0132 today."},
    ])
    b = write_jsonl(tmp_path / "in" / "b.jsonl", [
        {"id": "good3", "text": good[3]}, {"id": "copy0", "text": good[0]},
        {"id": "lorem", "text": good[4] + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit sed."},
        {"id": "good5", "text": good[5], "metadata": {"url": "u5"}},
    ])
    expected = {"gib": "language", "fr": "language", "boiler": "gopher_repetition", "copy0": "minhash",
                "lorem": "c4"}
    return [a, b], expected


def test_default_chain_end_to_end_layout_rejects_and_stats(tmp_path):
    inputs, expected = planted_corpus(tmp_path)
    out = tmp_path / "out"
    stats = clean_documents([tmp_path / "in"], out, workers=2, progress=False)
    kept = [r for f in sorted((out / "kept").glob("*.jsonl")) for r in read_jsonl(f)]
    assert [r["id"] for r in kept] == ["good0", "good1", "pii", "good3", "good5"]
    assert all(set(r) == {"id", "text", "metadata"} for r in kept)
    pii = next(r for r in kept if r["id"] == "pii")
    assert "<EMAIL>" in pii["text"] and "<PHONE>" in pii["text"] and "jane.doe" not in pii["text"]
    assert pii["metadata"]["pii"] == {"email": 1, "phone": 1}
    assert next(r for r in kept if r["id"] == "good5")["metadata"]["url"] == "u5"

    rejected = {}
    for f in (out / "rejects").glob("*.jsonl"):
        for r in read_jsonl(f):
            assert r["step"] == f.stem and r["reason"] and r["source"]
            rejected[r["id"]] = r["step"]
    assert {k: v for k, v in rejected.items() if k in expected} == expected
    copy = next(r for r in read_jsonl(out / "rejects" / "minhash.jsonl") if r["id"] == "copy0")
    assert copy["metadata"]["duplicate_of"] == "good0" and copy["reason"] == "near_duplicate"

    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk["docs_in"] == stats["docs_in"] == 10 and stats["docs_kept"] == 5
    steps = {s["name"]: s for s in stats["steps"]}
    assert sum(s["docs_in"] - s["docs_out"] for s in stats["steps"]) == 10 - 5  # every removal is accounted for
    assert steps["pii"]["counters"] == {"email": 1, "phone": 1}
    assert steps["c4"]["chars_out"] < steps["c4"]["chars_in"]
    report = (out / "report.md").read_text()
    assert "| minhash | 6 | 5 |" in report and "near_duplicate" in report and "lorem_ipsum" in report


def test_compressed_output_feeds_the_reader(tmp_path):
    inputs, _ = planted_corpus(tmp_path)
    clean_documents(inputs, tmp_path / "out", steps=["gopher_quality"], compress=True, workers=1, progress=False)
    files = sorted((tmp_path / "out" / "kept").glob("*.jsonl.zst"))
    assert len(files) == 2
    assert {d.id for d in read_documents(files)} >= {"good0", "copy0", "good5"}


def test_bad_inputs_become_rejects_or_one_line_errors(tmp_path):
    rng = random.Random(1)
    src = tmp_path / "in"
    src.mkdir()
    (src / "empty.jsonl").write_text("")
    (src / "blob.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (src / "latin1.txt").write_bytes(("caf\xe9 " + prose(rng)).encode("latin-1"))
    (src / "mixed.jsonl").write_bytes(b'{"text": "fine one"}\n{"text": broken\n'
                                      + b'{"text": "caf\xe9"}\n' + b'{"text": "' + b"x" * 2000 + b'"}\n')
    out = tmp_path / "out"
    stats = clean_documents([src], out, steps=["fineweb"], workers=1, progress=False, max_doc_chars=1000)
    reasons = {r["source"]: r["reason"] for r in read_jsonl(out / "rejects" / "read.jsonl")}
    assert reasons[str(src / "blob.bin")].startswith("binary file")
    assert reasons[f"{src / 'latin1.txt'}:1"].startswith("not valid UTF-8")
    assert reasons[f"{src / 'mixed.jsonl'}:2"].startswith("malformed JSON")
    assert reasons[f"{src / 'mixed.jsonl'}:3"].startswith("not valid UTF-8")
    assert reasons[f"{src / 'mixed.jsonl'}:4"].startswith("document_too_long")
    assert any("empty file" in w for w in stats["warnings"])
    raw = next(r for r in read_jsonl(out / "rejects" / "read.jsonl") if r["source"].endswith("mixed.jsonl:2"))
    assert raw["text"] == '{"text": broken'  # the bad line itself is kept, nothing is lost

    repaired = clean_documents([src / "latin1.txt"], tmp_path / "out2", steps=["fineweb"], workers=1,
                               progress=False, invalid_utf8="repair")
    kept = read_jsonl(next((tmp_path / "out2" / "kept").glob("*.jsonl")))
    assert repaired["docs_kept"] == 1 and kept[0]["metadata"]["utf8_repaired"] == 1 and "\ufffd" in kept[0]["text"]

    (tmp_path / "nothing").mkdir()
    with pytest.raises(LmforgeError, match="directory holds no input files"):
        clean_documents([tmp_path / "nothing"], tmp_path / "out3", steps=["fineweb"], progress=False)


def test_a_document_over_the_size_limit_is_rejected_not_crashing(tmp_path):
    big = write_jsonl(tmp_path / "big.jsonl", [{"id": "big", "text": "word " * 2_200_000}, {"id": "ok", "text": "x"}])
    stats = clean_documents([big], tmp_path / "out", steps=["fineweb"], workers=1, progress=False)
    rejects = read_jsonl(tmp_path / "out" / "rejects" / "read.jsonl")
    assert [r["id"] for r in rejects] == ["big"] and rejects[0]["reason"].startswith("document_too_long")
    assert stats["docs_in"] == 2


def test_recipe_steps_and_unknown_names(tmp_path, capsys):
    inputs, _ = planted_corpus(tmp_path)
    recipe = tmp_path / "clean.toml"
    recipe.write_text(f'input = ["{tmp_path / "in"}"]\noutput = "{tmp_path / "out"}"\nworkers = 1\n'
                      '[[steps]]\nname = "gopher_quality"\nmin_doc_words = 20\n'
                      '[[steps]]\nname = "exact_dedup"\n'
                      '[[steps]]\nname = "keyword"\nwords = ["lorem ipsum"]\n')
    assert main(["data", "clean", str(recipe)]) == 0
    capsys.readouterr()
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert [s["name"] for s in stats["steps"]] == ["read", "gopher_quality", "exact_dedup", "keyword"]
    assert {s["name"]: s["reasons"] for s in stats["steps"]}["keyword"] == {"blocklist:lorem ipsum": 1}

    recipe.write_text('input = ["x"]\n[[steps]]\nname = "gopher_qualty"\n')
    assert main(["data", "clean", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown step 'gopher_qualty'" in err and "did you mean 'gopher_quality'" in err
    with pytest.raises(ConfigError, match=r"steps\[0\] \(c4\): unknown config key 'steps\[0\].min_sentences'"):
        make_step({"name": "c4", "min_sentences": 3})


def test_cli_shortcut(tmp_path):
    planted_corpus(tmp_path)
    out = tmp_path / "out"
    assert main(["data", "clean", "--input", str(tmp_path / "in" / "a.jsonl"), str(tmp_path / "in" / "b.jsonl"),
                 "--output", str(out), "--lang", "en", "--dedup", "exact", "--workers", "1"]) == 0
    names = [s["name"] for s in json.loads((out / "stats.json").read_text())["steps"]]
    assert names == ["read", "language", "gopher_repetition", "gopher_quality", "c4", "fineweb", "exact_dedup",
                     "pii"]
    assert [s.name for s in default_steps(lang="", dedup="none", pii=False)] == [
        "gopher_repetition", "gopher_quality", "c4", "fineweb"]


@dataclass
class CrashOnce(Step):
    """Logs every document it sees; raises on `crash_id` while the flag file exists (a killed worker)."""

    name = "crash_once"
    log: str = option("")
    flag: str = option("")
    crash_id: str = option("")

    def __call__(self, doc: Document) -> str | None:
        with open(self.log, "a") as f:
            f.write(doc.id + "\n")
        if doc.id == self.crash_id and Path(self.flag).exists():
            raise RuntimeError("killed")
        return None


def test_killed_run_resumes_without_redoing_finished_shards(tmp_path):
    inputs, _ = planted_corpus(tmp_path)
    log, flag = tmp_path / "seen.log", tmp_path / "crash.flag"
    flag.touch()
    steps = [CrashOnce(log=str(log), flag=str(flag), crash_id="copy0"), make_step("exact_dedup")]
    with pytest.raises(RuntimeError, match="killed"):
        Pipeline(steps, workers=1, progress=False).run(inputs, tmp_path / "out")
    assert len(list((tmp_path / "out" / ".work" / "stage0").glob("*.done.json"))) == 1  # shard a finished
    flag.unlink()
    log.write_text("")
    stats = Pipeline(steps, workers=1, progress=False).run(inputs, tmp_path / "out")
    assert log.read_text().split() == ["good3", "copy0", "lorem", "good5"]  # only shard b ran again
    assert stats["docs_in"] == 10
    assert [r["id"] for r in read_jsonl(tmp_path / "out" / "rejects" / "exact_dedup.jsonl")] == ["copy0"]

    with pytest.raises(LmforgeError, match="holds a run with other inputs or steps"):
        Pipeline([make_step("fineweb")], progress=False).run(inputs, tmp_path / "out")


@pytest.fixture
def local_ray():
    """A local Ray cluster of 2 CPUs for one test, shut down after it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def output_files(out: Path) -> dict[str, bytes]:
    """Every file a run writes (the work folder and the report aside), stats.json without timings and paths."""
    files = {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*"))
             if f.is_file() and ".work" not in f.parts and f.name not in ("stats.json", "report.md")}
    stats = json.loads((out / "stats.json").read_text().replace(str(out), "OUT"))
    files["stats.json"] = json.dumps({k: v for k, v in stats.items() if k not in ("seconds", "docs_per_second")})
    return files


@pytest.mark.slow  # starting Ray and its workers takes 10-40 s on a shared 2-core machine
def test_ray_executor_output_is_byte_identical_to_local(tmp_path, local_ray):
    planted_corpus(tmp_path)
    local = clean_documents([tmp_path / "in"], tmp_path / "local", workers=2, progress=False)
    on_ray = clean_documents([tmp_path / "in"], tmp_path / "ray", workers=2, executor="ray", progress=False)
    assert on_ray["docs_kept"] == local["docs_kept"] == 5
    assert output_files(tmp_path / "ray") == output_files(tmp_path / "local")
    assert {"kept/00000-a.jsonl", "kept/00001-b.jsonl", "rejects/minhash.jsonl"} <= set(output_files(tmp_path / "ray"))


@pytest.mark.slow
def test_a_100_mb_document_is_rejected_with_its_size(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"id": "huge", "text": "All work and no play. " * 4_800_000}) + "\n")
        f.write(json.dumps({"id": "small", "text": "A small one."}) + "\n")
    stats = clean_documents([path], tmp_path / "out", steps=["fineweb"], workers=1, progress=False)
    assert stats["steps"][0]["reasons"] == {"document_too_long (105,600,000 > 10,000,000 chars)": 1}
    assert stats["docs_in"] == 2


def test_an_edited_input_is_a_new_run_not_a_resume(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"id": "one", "text": "first version"}])
    clean_documents([path], tmp_path / "out", steps=["exact_dedup"], workers=1, progress=False)
    write_jsonl(path, [{"id": "one", "text": "second, longer version"}])
    with pytest.raises(LmforgeError, match="other inputs or steps"):
        clean_documents([path], tmp_path / "out", steps=["exact_dedup"], workers=1, progress=False)
    clean_documents([path], tmp_path / "out", steps=["exact_dedup"], workers=1, progress=False, overwrite=True)
    assert read_jsonl(tmp_path / "out" / "kept" / "00000-a.jsonl")[0]["text"] == "second, longer version"
