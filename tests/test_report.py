import json
import re
import shutil

import pytest

from lmforge.cli import main
from lmforge.core.errors import LmforgeError
from lmforge.eval.compare import write_compare
from lmforge.eval.report import collect_run, write_report
from lmforge.eval.summary import summary_markdown, summary_text
from lmforge.eval.svg import Series, line_chart, nice_ticks
from lmforge.tasks.suite import split_of


def write_metrics(directory, steps=50, start=8.0, lr=1e-3):
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(10, steps + 1, 10):
        rows.append({"step": s, "loss": start - s / 20, "lr": lr * s / steps, "grad_norm": 1.0, "tokens_seen": s * 64})
        if s % 20 == 0:
            rows.append({"step": s, "val_loss": start - s / 25, "val_bpb": 2.0 - s / 100})
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "config.json").write_text(json.dumps({"train": {"steps": steps, "lr": lr}}))
    model = directory / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model": {"d_model": 64}}))  # a model's, not the run's
    (model / "model.safetensors").write_bytes(b"")
    (directory / "tb").mkdir()
    (directory / "tb" / "stats.json").write_text(json.dumps({"never": "read"}))


def eval_record(acc):
    return {"checkpoint": "x", "tasks": {
        "synthetic": {"name": "synthetic", "type": "generate", "n": 40, "exact_match": acc, "exact_match_stderr": 0.05,
                      "f1": acc + 0.1, "f1_stderr": 0.05},
        "cloze": {"name": "cloze", "type": "multiple_choice", "n": 50, "acc": 0.3, "acc_stderr": 0.06,
                  "acc_norm": 0.32, "acc_norm_stderr": 0.06}}}


@pytest.fixture
def quickstart_run(tmp_path):
    root = tmp_path / "qs"
    write_metrics(root / "pretrain")
    write_metrics(root / "sft", steps=30, start=3.0)
    (root / "eval").mkdir()
    (root / "eval" / "base.json").write_text(json.dumps(eval_record(0.05)))
    (root / "eval" / "sft.json").write_text(json.dumps(eval_record(0.625)))
    (root / "eval" / "decontam.json").write_text(json.dumps({"n": 13, "training_words": 1000, "tasks": {
        "cloze": {"examples": 50, "too_short": 0, "contaminated": 2, "contaminated_fraction": 0.04, "flagged": []}}}))
    (root / "clean").mkdir()
    (root / "clean" / "stats.json").write_text(json.dumps({"kept": 410, "dropped": {"repetition": 17}}))
    summary = {"run_dir": str(root), "seconds": 321.5, "stages": {  # stored by name, not in the order they ran
        "dpo": {"seconds": 9.0, "heldout_logp_margin_before": -0.5, "heldout_logp_margin": 0.25,
                "heldout_preference_accuracy_before": 0.5, "heldout_preference_accuracy": 0.75, "val_loss": None},
        "eval": {"seconds": 5.0, "models": {label: {"synthetic": eval_record(em)["tasks"]["synthetic"]}
                                            for label, em in (("base", 0.0), ("sft", 0.625))}},
        "pretrain": {"seconds": 200.0, "val_before": {"loss": 8.3, "bits_per_byte": 3.5},
                     "val_after": {"loss": 2.8, "bits_per_byte": 1.25}, "steps": 400,
                     "samples_before": ["def f(<gibberish> & co"], "samples_after": ["def f(x):\n    return x"]},
        "sft": {"seconds": 60.0, "accuracy": 0.625},
        "clean": {"seconds": 1.0, "docs_in": 420, "docs_kept": 410, "steps": ["gopher"]}},
        "machine": {"cpu": "x86_64", "cpu_flags": ["avx2"], "threads": 4, "gpu": "none"}}
    (root / "summary.json").write_text(json.dumps(summary))
    (root / "quickstart_config.json").write_text(json.dumps({"vocab_size": 4096}))
    return root


def test_nice_ticks_and_chart_geometry():
    assert nice_ticks(0, 1, 5) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(3, 17, 5) == [5, 10, 15]
    svg = line_chart([Series("a", [0, 10], [1.0, 2.0])], "t", width=400, height=200)
    points = re.search(r'<polyline points="([^"]+)"', svg).group(1).split()
    (x0, y0), (x1, y1) = (map(float, p.split(",")) for p in points)
    assert (x0, x1) == (64.0, 400 - 16.0) and y1 < y0  # left to right across the plot; higher value is higher up


def test_collect_finds_stage_outputs(quickstart_run):
    run = collect_run(quickstart_run)
    assert set(run.metrics) == {"pretrain", "sft"}
    assert set(run.configs) == {"pretrain/config.json", "sft/config.json", "quickstart_config.json"}
    assert set(run.evals) == {"eval/base", "eval/sft"} and set(run.decontam) == {"eval/decontam"}
    assert set(run.stats) == {"clean"} and run.summary["seconds"] == 321.5


def test_report_is_self_contained_html(quickstart_run):
    out = write_report(quickstart_run)
    assert out == quickstart_run / "report.html"
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 3  # loss of both stages, lr once
    assert not re.search(r"<(script|link|img)\b|src=|url\(", page)  # nothing fetched: readable offline
    assert "def f(&lt;gibberish&gt; &amp; co" in page and "return x" in page  # samples, escaped
    assert "0.050 ± 0.050" in page and "0.625 ± 0.050" in page  # base and sft side by side
    assert "<th>eval/base</th><th>eval/sft</th>" in page
    assert "dropped.repetition" in page and "410" in page  # data stats
    assert "val_loss" in page and "6.4" in page  # validation: first value 8 - 40/25
    assert "contaminated" in page and "4.0%" in page
    assert "quickstart_config.json" in page and "d_model" not in page  # run configs, not the model's


def test_lifecycle_card_comes_first_with_stages_in_the_order_they_ran(quickstart_run):
    page = write_report(quickstart_run).read_text()
    body = page[page.index("<body>") + len("<body>"):]
    assert body.startswith('<section class="card"')  # the card is the first thing on the page
    card = body[:body.index("</section>")]
    stages = re.findall(r"<tr><td>(\w+)</td>", card)
    assert stages == ["clean", "pretrain", "sft", "dpo", "eval"]  # lifecycle order, not sorted by name
    assert "kept 410 of 420 docs" in card and "val loss 8.300 -&gt; 2.800<br>bits/byte 3.500 -&gt; 1.250" in card
    assert "preference margin -0.500 -&gt; 0.250<br>preference accuracy 0.500 -&gt; 0.750" in card
    assert "synthetic exact_match: base 0.000 ± 0.050 -&gt; sft 0.625 ± 0.050" in card
    assert "threads 4" in card and "CPU flags avx2" in card and "precision" not in card  # no pretrain precision


def chart_values(svg):
    """The distinct plotted y positions of one chart (lines and markers)."""
    ys = {p.split(",")[1] for pts in re.findall(r'<polyline points="([^"]+)"', svg) for p in pts.split()}
    return ys | set(re.findall(r'<circle cx="[^"]+" cy="([^"]+)"', svg))


def test_charts_in_lifecycle_order_and_only_those_that_say_something(quickstart_run):
    dpo = quickstart_run / "dpo"  # sorts before pretrain by name; runs after it
    dpo.mkdir()
    rows = [{"step": s, "loss": 0.7 - s / 100, "lr": 1e-4, "reward_accuracy": 0.5, "tokens.code": 64 * s,
             "loss_tokens": 30 + s % 3, "heldout_margin": 0.1 * s} for s in (1, 2, 3)]
    (dpo / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = write_report(quickstart_run).read_text()
    svgs = re.findall(r"<svg.*?</svg>", page)
    titles = [re.search(r'aria-label="([^"]+)"', s).group(1) for s in svgs]
    assert titles == ["pretrain: loss", "pretrain: learning rate", "sft: loss", "dpo: loss", "dpo: heldout_margin"]
    assert all(len(chart_values(s)) >= 2 for s in svgs)  # no flat line, no single point, no constant lr
    assert page.index('<div class="charts">') < page.index("</div>") and page.count('<div class="charts">') == 1
    outside = re.sub(r"<details>.*?</details>", "", page, flags=re.S)
    assert "None" not in outside and "None" not in page  # sft val_loss None: no row anywhere
    assert re.search(r"<details><summary>all stage results.*pretrain</td><td>seconds", page, re.S)


def test_evaluation_broken_down_by_kind(quickstart_run):
    tasks = quickstart_run / "eval" / "tasks"  # what `make_synthetic_task` writes beside the results
    tasks.mkdir()
    (tasks / "synthetic.yaml").write_text("name: synthetic\ntype: generate\nprompt: '{prompt}'\nanswer: answer\n"
                                          "data: synthetic.jsonl\n")
    kinds = ["copy", "reverse", "copy", "reverse"]
    (tasks / "synthetic.jsonl").write_text("".join(json.dumps({"kind": k, "prompt": f"{k}: a b", "answer": "a b"})
                                                   + "\n" for k in kinds))
    for label, hits in (("base", [0, 0, 0, 0]), ("sft", [1, 0, 1, 0])):  # sft learned copy, not reverse
        record = eval_record(sum(hits) / 4)
        record["tasks"]["synthetic"].update(path="/moved/away/synthetic.yaml", examples=[
            {"index": i, "prediction": "", "exact_match": float(h)} for i, h in enumerate(hits)])
        (quickstart_run / "eval" / f"{label}.json").write_text(json.dumps(record))
    page = write_report(quickstart_run).read_text()
    part = page[page.index("By kind of example"):]
    part = part[:part.index("</table>")]
    assert "<td>synthetic</td><td>copy</td><td>exact_match</td><td class=\"num\">2</td>" \
           "<td>0.000 ± 0.000</td><td>1.000 ± 0.000</td>" in part
    assert "<td>reverse</td><td>exact_match</td><td class=\"num\">2</td><td>0.000 ± 0.000</td><td>0.000" in part
    assert "cloze" not in part  # its data has no kinds


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

CHARTS_IN_BROWSER = """() => [...document.querySelectorAll('svg.chart')].map(svg => {
  const ys = new Set();  // the plotted y positions of the chart's lines and markers, as the browser parsed them
  svg.querySelectorAll('polyline').forEach(l => {
    for (let i = 0; i < l.points.numberOfItems; i++) ys.add(l.points.getItem(i).y.toFixed(1));
  });
  svg.querySelectorAll('circle').forEach(c => ys.add(c.cy.baseVal.value.toFixed(1)));
  return ys.size;
})"""


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (scripts/setup.sh installs it when CI=true)")
def test_report_in_a_browser_shows_the_card_first(quickstart_run):
    sync_api = pytest.importorskip("playwright.sync_api")
    out = write_report(quickstart_run)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(out.as_uri())
            assert page.evaluate("document.body.firstElementChild.id") == "card"
            card = page.locator("#card").bounding_box()
            assert card["y"] < 100 and "pretrain" in page.text_content("#card")  # at the top of the screen
            distinct = page.evaluate(CHARTS_IN_BROWSER)
            assert distinct and min(distinct) >= 2
        finally:
            browser.close()


def test_report_on_a_single_pretrain_run(tmp_path):
    write_metrics(tmp_path / "run")
    assert main(["report", str(tmp_path / "run"), "--output", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "run: loss" in page and "run: learning rate" in page


def test_report_of_an_empty_directory_is_a_user_error(tmp_path):
    with pytest.raises(LmforgeError, match="nothing to report"):
        collect_run(tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 1


def test_compare_overlays_two_runs(tmp_path, quickstart_run):
    other = tmp_path / "other"
    write_metrics(other / "pretrain", start=7.0)
    (other / "eval").mkdir()
    (other / "eval" / "sft.json").write_text(json.dumps(eval_record(0.5)))
    out, _ = write_compare(quickstart_run, other, tmp_path / "c.html")
    page = out.read_text()
    assert "<h2>Curves: pretrain</h2>" in page and "<h2>Curves: sft</h2>" not in page  # stages both runs trained
    chart = page[page.index("pretrain: loss"):]
    chart = chart[:chart.index("</svg>")]
    assert chart.count("<polyline") == 2 and 'stroke-dasharray="6 4"' in chart  # A solid, B dashed
    # last train loss: A 8 - 50/20 = 5.5, B 7 - 2.5 = 4.5: B lower is better
    assert re.search(r"last train loss</td><td>5\.5</td><td>4\.5</td><td><span class=\"up\">-1</span>", page)
    assert re.search(r"exact_match</td><td>0\.6250</td><td>0\.5000</td><td><span class=\"down\">-0\.125", page)
    assert main(["compare", str(quickstart_run), str(other), "--output", str(tmp_path / "c2.html")]) == 0


def test_quickstart_summary_text_and_markdown(tmp_path):
    pt = {"seconds": 200.0, "steps": 400, "tokens_per_s": 4456.2, "model_dir": "run/pretrain/model",
          "val_before": {"loss": 8.349, "bits_per_byte": 3.6031}, "val_after": {"loss": 3.869, "bits_per_byte": 1.67},
          "samples_before": ["def f(&&"], "samples_after": ["def f(x):"]}
    evals = {label: {"synthetic": {"exact_match": em}, "cloze": {"acc_norm": 0.3}} for label, em in
             (("base", 0.0), ("sft", 0.8667))}
    summary = {"run_dir": "run", "seconds": 551.0, "models": {"base": {"checkpoint": "run/pretrain/model"},
                                                             "sft": {"checkpoint": "run/sft/model"}},
               "task_kinds": ["sort", "copy", "count_letter"],
               "stages": {"corpus": {"seconds": 0.5, "docs": 1200, "bytes": 6_000_000},
                          "tokenizer": {"seconds": 1.2, "vocab_size": 4096},
                          "shards": {"seconds": 1.9, "train_tokens": 1_638_400, "val_tokens": 30_000},
                          "pretrain": pt, "eval": {"seconds": 9.7, "models": evals}}}
    text = summary_text(summary, tmp_path / "report.html").splitlines()
    assert "  val loss:  8.349 -> 3.869 nats/token;  bits/byte 3.603 -> 1.670" in text
    assert "  synthetic exact_match:   base 0.000 -> sft 0.867" in text
    assert "  shards:    1,638,400 train / 30,000 val tokens" in text
    chat = next(line for line in text if line.startswith("  lmforge chat"))
    prompts = re.fullmatch(r"  lmforge chat --checkpoint run/sft/model      \(try: (.*)\)", chat).group(1)
    kinds = [p.split(":")[0] for p in prompts.split(", or ")]
    assert kinds == ["sort", "copy"]  # the kinds SFT trained on, no `add: 3 + 4`
    assert all(split_of(k, p) == 0 for k, p in zip(kinds, prompts.split(", or ")))  # from the training half
    summary.pop("task_kinds")  # a run from before kinds were recorded: no prompt to suggest rather than a wrong one
    assert "(try:" not in summary_text(summary, tmp_path / "report.html")
    md = summary_markdown(summary)
    assert "| pretrain | 200.0 |\n| eval | 9.7 |" in md
    assert "Validation loss 8.349 -> 3.869 nats/token; bits per byte 3.603 -> 1.670." in md
    assert "- before: `'def f(&&'`\n- after: `'def f(x):'`" in md
