import json
import re
import shutil
from types import SimpleNamespace

import pytest

from lmforge.cli import main
from lmforge.core.errors import LmforgeError
from lmforge.eval.charts import mixture_shares
from lmforge.eval.compare import write_compare
from lmforge.eval.heldout import sample_answers
from lmforge.eval.report import chat_samples, write_report
from lmforge.eval.rundir import collect_run
from lmforge.eval.summary import summary_markdown, summary_text
from lmforge.eval.svg import Series, line_chart, log_ticks, nice_ticks
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
    assert [round(10 ** t) for t in log_ticks(1.7, 3.0)] == [100, 200, 500, 1000]  # 1-2-5 within a decade or two
    assert [round(10 ** t) for t in log_ticks(0.5, 4.2)] == [10, 100, 1000, 10000]  # powers of ten over more
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


def svg_of(page, title):
    return next(s for s in re.findall(r"<svg.*?</svg>", page, re.S) if f'aria-label="{title}"' in s)


def test_mixture_shares_per_interval_as_a_stacked_area(quickstart_run):
    pretrain = quickstart_run / "pretrain"
    counts = [(0, 0), (80, 20), (160, 40), (200, 100), (240, 160)]  # cumulative tokens per source
    rows = [{"step": 10 * i, "loss": 5.0 - i / 10, "tokens.code": c, "tokens.docs": d}
            for i, (c, d) in enumerate(counts) if i]
    steps, shares = mixture_shares(rows)
    assert steps == [10, 20, 30, 40]  # the share of each interval, not of everything so far
    assert shares == {"code": [0.8, 0.8, 0.4, 0.4], "docs": [0.2, 0.2, 0.6, 0.6]}
    (pretrain / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = write_report(quickstart_run).read_text()
    chart = svg_of(page, "pretrain: mixture share per source")
    assert chart.count("<polygon") == 2 and "tokens.code" not in page  # two bands; no cumulative-count line
    tops = [[float(p.split(",")[1]) for p in pts.split()] for pts in re.findall(r'<polyline points="([^"]+)"', chart)]
    # the code band's top edge: y = 28 + (1 - share) * 168 on a 240 px chart with the plot from y=28 to y=196
    assert tops[0] == pytest.approx([28 + 0.2 * 168] * 2 + [28 + 0.6 * 168] * 2, abs=0.06) and set(tops[1]) == {28.0}
    rows = [{**r, "tokens.docs": 0} for r in rows]  # a mixture that never changes says nothing
    rows = [{**r, "tokens.code": 80 * (i + 1)} for i, r in enumerate(rows)]
    (pretrain / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "mixture share" not in write_report(quickstart_run).read_text()


def test_heldout_metrics_measured_a_few_times_are_points_with_error_bars(quickstart_run):
    dpo = quickstart_run / "dpo"
    dpo.mkdir()
    rows = [{"step": s, "loss": 0.7 - s / 100} for s in range(1, 7)]
    rows += [{"step": 3, "heldout_preference_accuracy": 0.5, "heldout_preference_accuracy_stderr": 0.1},
             {"step": 6, "heldout_preference_accuracy": 0.75, "heldout_preference_accuracy_stderr": 0.05}]
    (dpo / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = write_report(quickstart_run).read_text()
    chart = svg_of(page, "dpo: heldout_preference_accuracy")
    assert "<polyline" not in chart and chart.count("<circle") == 3  # a few measurements are not a curve
    (x0, y0), (x1, y1), _ = (map(float, c) for c in re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)"', chart))
    assert x0 < x1 and y0 == y1  # first, at step 0, the 0.5 the stage's result measured before training
    bars = re.findall(r'<path d="M([\d.]+),([\d.]+)V([\d.]+)', chart)
    assert len(bars) == 2  # the value before training has no standard error in this summary: no bar
    (_, lo0, hi0), (_, lo1, hi1) = ((float(a), float(b), float(c)) for a, b, c in bars)
    assert (lo0 - hi0) / (lo1 - hi1) == pytest.approx(2.0, rel=0.02)  # +-0.1 drawn twice as long as +-0.05
    assert "heldout_preference_accuracy_stderr" not in re.sub(r"<details>.*?</details>", "", page, flags=re.S)


TEST_TIME_CURVE = [{"method": "vote", "tokens": 100, "accuracy": 0.3, "stderr": 0.05, "n": 80},
                   {"method": "vote", "tokens": 800, "accuracy": 0.5, "stderr": 0.06, "n": 80},
                   {"method": "vote", "tokens": 400, "accuracy": 0.45, "stderr": 0.055, "n": 80},
                   {"method": "best_of_n", "tokens": 120, "accuracy": 0.35, "stderr": 0.05, "n": 80},
                   {"method": "best_of_n", "tokens": 900, "accuracy": 0.4, "stderr": 0.055, "n": 80}]


def add_reasoning(run_dir, curve=TEST_TIME_CURVE):
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["stages"]["reasoning"] = {"seconds": 30.0, "test_time_curve": curve}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_test_time_compute_curve_of_the_reasoning_stage(quickstart_run):
    add_reasoning(quickstart_run)
    page = write_report(quickstart_run).read_text()
    chart = svg_of(page, "reasoning: test-time compute")
    groups = re.findall(r'<g class="series" data-label="([^"]+)">(.*?)</g>', chart)
    assert [g[0] for g in groups] == ["vote", "best_of_n"]  # one line per method
    vote = groups[0][1]
    xs = [float(p.split(",")[0]) for p in re.search(r'points="([^"]+)"', vote).group(1).split()]
    assert xs == sorted(xs) and vote.count('class="errbar"') == 3  # by tokens, each point with its bar
    assert (xs[1] - xs[0]) / (xs[2] - xs[1]) == pytest.approx(2.0, rel=0.01)  # log scale: 100->400 = 2x 400->800
    card = page[:page.index("</section>")]
    assert "vote 0.300 ± 0.050 at 100 tokens -&gt; 0.500 ± 0.060 at 800 tokens" in card
    assert card.index("<td>dpo</td>") < card.index("<td>reasoning</td>") < card.index("<td>eval</td>")
    add_reasoning(quickstart_run, [{"method": "greedy", "tokens": 50, "accuracy": 0.2, "stderr": 0.04, "n": 80}])
    assert "test-time compute" not in write_report(quickstart_run).read_text()  # one point is no curve


def test_test_time_curve_of_a_search_run_outside_a_quickstart(tmp_path):
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "search.json").write_text(json.dumps({"problems": 80, "test_time_curve": TEST_TIME_CURVE}))
    page = write_report(tmp_path / "search").read_text()
    assert "<td>run</td><td></td><td>vote 0.300 ± 0.050 at 100 tokens" in page  # its card row
    assert svg_of(page, "run: test-time compute").count('class="errbar"') == 5


def add_chat_samples(run_dir, labels=("base", "sft", "dpo")):
    summary = json.loads((run_dir / "summary.json").read_text())
    prompts = [("copy: a b", "a b"), ("reverse: a b", "b a")]
    for label in labels:
        summary["stages"]["eval"]["models"].setdefault(label, {})["samples"] = [
            {"prompt": p, "answer": a, "output": f"{label} says {a}"} for p, a in prompts]
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_answers_side_by_side_across_stages(quickstart_run):
    assert "side-by-side" not in write_report(quickstart_run).read_text()  # no samples recorded: no table
    add_chat_samples(quickstart_run, ("dpo", "base", "sft"))
    page = write_report(quickstart_run).read_text()
    part = page[page.index('<table id="side-by-side">'):]
    part = part[:part.index("</table>")]
    assert "<th>prompt</th><th>expected</th><th>base</th><th>sft</th><th>dpo</th>" in part  # lifecycle order
    assert '<td class="sample">reverse: a b</td><td class="sample">b a</td><td class="sample">base says b a</td>' \
           '<td class="sample">sft says b a</td><td class="sample">dpo says b a</td>' in part
    assert page.index("side-by-side") < page.index("all stage results")


def test_the_eval_stage_records_one_answer_per_kind_for_the_side_by_side_table():
    kinds = ["copy", "copy", "copy", "reverse", "copy", "sort", "sort"]
    examples = [SimpleNamespace(fields={"prompt": f"{k}: {i}", "kind": k}) for i, k in enumerate(kinds)]
    records = [{"index": i, "output": f"out {i}", "answers": [f"ans {i}"]} for i in range(len(kinds))]
    picked = sample_answers(examples, records, n=4)
    assert [s["prompt"] for s in picked] == ["copy: 0", "copy: 1", "reverse: 3", "sort: 5"]  # every kind, then more
    assert picked[2] == {"prompt": "reverse: 3", "kind": "reverse", "output": "out 3", "answer": "ans 3"}
    assert [s["kind"] for s in sample_answers(examples, records, n=2)] == ["copy", "reverse"]


def test_answers_side_by_side_from_eval_files(quickstart_run):
    tasks = quickstart_run / "eval" / "tasks"
    tasks.mkdir()
    (tasks / "synthetic.yaml").write_text("name: synthetic\ntype: generate\nprompt: '{prompt}'\nanswer: answer\n"
                                          "data: synthetic.jsonl\n")
    (tasks / "synthetic.jsonl").write_text("".join(json.dumps({"prompt": f"copy: {w}", "answer": w}) + "\n"
                                                   for w in ("x", "y")))
    for label in ("sft", "base"):
        record = eval_record(0.5)
        record["tasks"]["synthetic"].update(path=str(tasks / "synthetic.yaml"), examples=[
            {"index": i, "output": f"{label}-{w}", "prediction": w, "exact_match": 1.0} for i, w in enumerate("xy")])
        (quickstart_run / "eval" / f"{label}.json").write_text(json.dumps(record))
    labels, rows = chat_samples(collect_run(quickstart_run))
    assert labels == ["base", "sft"]
    assert rows == [{"prompt": "copy: x", "answer": "x", "base": "base-x", "sft": "sft-x"},
                    {"prompt": "copy: y", "answer": "y", "base": "base-y", "sft": "sft-y"}]


def test_compare_card_has_a_column_per_run_and_the_deltas(tmp_path, quickstart_run, capsys):
    other = tmp_path / "other"
    shutil.copytree(quickstart_run, other)
    summary = json.loads((other / "summary.json").read_text())
    summary["stages"]["pretrain"]["val_after"]["loss"] = 2.5
    summary["stages"]["eval"]["models"]["sft"]["synthetic"]["exact_match"] = 0.5
    summary["stages"].pop("dpo")
    (other / "summary.json").write_text(json.dumps(summary))
    assert main(["compare", str(quickstart_run), str(other), "--output", str(tmp_path / "c.html")]) == 0
    page = (tmp_path / "c.html").read_text()
    body = page[page.index("<body>") + len("<body>"):]
    assert body.startswith('<section class="card" id="card">')  # the card first, as in the report
    card = body[:body.index("</section>")]
    assert "<th>stage</th><th>figure</th><th>A qs</th><th>B other</th><th>B - A</th>" in card
    assert '<td>pretrain</td><td>val loss</td><td>2.800</td><td>2.500</td><td><span class="up">-0.300</span>' in card
    assert ('<td>eval</td><td>synthetic exact_match (sft)</td><td>0.625 ± 0.050</td><td>0.500 ± 0.050</td>'
            '<td><span class="down">-0.125 ± 0.071</span>') in card  # the difference's stderr: hypot(.05, .05)
    assert "<td>dpo</td><td>preference accuracy</td><td>0.750</td><td></td><td></td>" in card  # only A ran DPO
    assert "<td>pretrain</td><td>seconds</td><td>200.0</td><td>200.0</td><td><span>0</span>" in card
    stages = re.findall(r"<tr><td>(\w+)</td>", card)
    assert list(dict.fromkeys(stages)) == ["clean", "pretrain", "sft", "dpo", "eval", "total"]
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"pretrain +val loss +2\.800 +2\.500 +-0\.300", next(x for x in out if "val loss" in x))
    assert out[-1].startswith(f"wrote {tmp_path / 'c.html'}")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

CHARTS_IN_BROWSER = """() => [...document.querySelectorAll('svg.chart')].map(svg => {
  // per series (lines, points, a band's top edge), the distinct plotted y positions as the browser parsed them;
  // a chart says something when one of its series takes two values or more
  const counts = [...svg.querySelectorAll('g.series')].map(g => {
    const ys = new Set();
    g.querySelectorAll('polyline').forEach(l => {
      for (let i = 0; i < l.points.numberOfItems; i++) ys.add(l.points.getItem(i).y.toFixed(1));
    });
    g.querySelectorAll('circle').forEach(c => ys.add(c.cy.baseVal.value.toFixed(1)));
    return ys.size;
  });
  return Math.max(0, ...counts);
})"""


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the page tests of this module (starting it takes seconds)."""
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (scripts/setup.sh installs it when CI=true)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


def opened(browser, html_file):
    page = browser.new_page()
    page.goto(html_file.as_uri())
    return page


def card_comes_first(page):
    assert page.evaluate("document.body.firstElementChild.id") == "card"
    assert page.locator("#card").bounding_box()["y"] < 100  # at the top of the screen


def test_report_in_a_browser_shows_the_card_first(browser, quickstart_run):
    rows = [{"step": 10 * i, "loss": 5.0 - i / 10, "lr": 1e-3 * i, "tokens.code": 80 * i, "tokens.docs": 20 * i * i}
            for i in range(1, 5)]  # a mixture whose shares move
    rows += [{"step": 40, "val_loss": 4.0}]  # one validation: a point on the loss chart, not a chart of its own
    (quickstart_run / "pretrain" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    add_reasoning(quickstart_run)
    add_chat_samples(quickstart_run)
    page = opened(browser, write_report(quickstart_run))
    card_comes_first(page)
    assert "pretrain" in page.text_content("#card") and "reasoning" in page.text_content("#card")
    distinct = page.evaluate(CHARTS_IN_BROWSER)
    assert len(distinct) >= 4 and min(distinct) >= 2  # loss, lr, mixture shares, test-time curve...
    labels = page.eval_on_selector_all("svg.chart", "svgs => svgs.map(s => s.getAttribute('aria-label'))")
    assert "pretrain: mixture share per source" in labels and "reasoning: test-time compute" in labels
    side = page.locator("#side-by-side")  # the chat stages' answers side by side
    assert side.is_visible()
    assert page.eval_on_selector_all("#side-by-side th", "ths => ths.map(t => t.textContent)") == [
        "prompt", "expected", "base", "sft", "dpo"]
    assert side.locator("tr").count() == 3


def test_compare_page_in_a_browser(browser, tmp_path, quickstart_run):
    other = tmp_path / "other"
    shutil.copytree(quickstart_run, other)
    out, _ = write_compare(quickstart_run, other, tmp_path / "c.html")
    page = opened(browser, out)
    card_comes_first(page)
    head = page.eval_on_selector_all("#card th", "ths => ths.map(t => t.textContent)")
    assert head == ["stage", "figure", "A qs", "B other", "B - A"]
    distinct = page.evaluate(CHARTS_IN_BROWSER)
    assert distinct and min(distinct) >= 2


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
    assert re.search(r"last train loss</td><td>5\.5</td><td>4\.5</td><td><span class=\"up\">-1\.000</span>", page)
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
