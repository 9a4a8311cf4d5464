"""benchmarks/common.py: the matmul peak probe stays within its time budget whatever the dtype costs on this CPU
(bf16 without AVX-512-BF16/AMX is ~100x slower than fp32), and bf16 rows are skipped with a reason when slow."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def common():
    path = sys.path[:]  # common.py rearranges the import path for the benchmark scripts: not for the tests
    spec = importlib.util.spec_from_file_location("benchmark_common", ROOT / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.path[:] = path
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_peak_returns_within_its_budget(common, dtype):
    start = time.perf_counter()
    peak = common.matmul_peak(dtype, budget_s=0.2)
    assert time.perf_counter() - start < 3.0  # a 256^2 probe, then larger ones only while they fit
    assert peak > 0


def test_bf16_rows_are_skipped_with_a_reason_only_where_bf16_is_slow(common):
    slow = common.bf16_skip_reason({"fp32": 150e9, "bf16": 1.3e9})
    assert "bf16 skipped" in slow and "1.3 GFLOP/s" in slow and "150.0 GFLOP/s" in slow
    assert common.bf16_skip_reason({"fp32": 140e9, "bf16": 380e9}) == ""


def test_append_results_adds_rows_under_one_header(common, tmp_path):
    results = tmp_path / "RESULTS.md"
    for value in ("1", "2"):
        common.append_results(results, [("figure", value, "3", "0.33")], "machine", "cmd")
    text = results.read_text()
    assert text.count("| figure | lmforge | peer |") == 1
    assert "| figure | 1 | 3 | 0.33 | machine | `cmd` |" in text and "| figure | 2 |" in text


def test_append_results_files_rows_under_their_scripts_section(common, tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## Generation — `benchmarks/generation.py`\n\nText.\n\n"
                       "| figure | lmforge | peer | ratio | machine | command |\n|---|---|---|---|---|---|\n"
                       "| old | 1 | 1 | 1 | m | `c` |\n\nA closing remark.\n\n## Serving — `benchmarks/serving.py`\n\n"
                       "No table yet.\n")
    common.append_results(results, [("gen", "2", "1", "2.00")], "m", "python benchmarks/generation.py --x")
    common.append_results(results, [("srv", "3", "1", "3.00")], "m", "python benchmarks/serving.py")
    common.append_results(results, [("new", "4", "1", "4.00")], "m", "python benchmarks/other.py")
    common.append_results(results, [("bare", "5", "1", "5.00")], "m", "python -c pass")  # no script: not "other"
    lines = results.read_text().splitlines()
    assert lines[lines.index("| old | 1 | 1 | 1 | m | `c` |") + 1].startswith("| gen | 2 |")  # in its table
    assert lines.index("A closing remark.") < lines.index("## Serving — `benchmarks/serving.py`")
    serving = lines.index("## Serving — `benchmarks/serving.py`")
    assert lines[serving + 4].startswith("| figure | lmforge") and lines[serving + 6].startswith("| srv | 3 |")
    other = lines.index("## `benchmarks/other.py`")
    assert lines[other + 4].startswith("| new | 4 |")
    assert lines[-5] == "## `other`" and lines[-1].startswith("| bare | 5 |")


def test_the_command_names_the_script_from_the_repository_root(common, monkeypatch):
    bench = Path(common.__file__).resolve().parent
    monkeypatch.chdir(bench)
    monkeypatch.setattr(sys, "argv", ["generation.py", "--threads", "1"])
    assert common.script_command() == "python benchmarks/generation.py --threads 1"
    monkeypatch.setattr(sys, "argv", [str(bench / "generation.py")])
    assert common.script_command() == "python benchmarks/generation.py"


def test_report_prints_the_limit_and_appends_the_rows(common, tmp_path, monkeypatch, capsys):
    results = tmp_path / "RESULTS.md"
    monkeypatch.setenv("LMFORGE_BENCH_RESULTS", str(results))
    common.report([("tokens/s", "10", "5", "2.00")], "cpu", "python benchmarks/x.py", "matmul peak fp32 9 GFLOP/s")
    assert "limit: matmul peak fp32 9 GFLOP/s" in capsys.readouterr().out
    assert "| tokens/s | 10 | 5 | 2.00 | cpu, limit: matmul peak fp32 9 GFLOP/s | `python benchmarks/x.py` |" \
        in results.read_text()
    common.report([("smoke", "1", "1", "1.00")], "cpu", "cmd", "none", append=False)
    assert "smoke" not in results.read_text()
