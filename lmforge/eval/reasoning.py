"""Search at test time inside `lmforge eval --reasoning true`: the search methods of `posttrain.search` on
held-out reasoning problems, accuracy and tokens spent per method, and the test-time compute curve.

The eval results file gains `search` (per method: accuracy, its standard error, mean generated tokens per
problem; the curve per method) and `test_time_curve`: a list of {"method", "tokens", "accuracy", "stderr", "n"}
points, one per method and budget scale (`--search.scales`), which `lmforge report` draws.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lmforge.posttrain.search import SearchSettings, search_curve
from lmforge.tokenizer import Tokenizer


def curve_table(points: list[dict[str, Any]]) -> str:
    """The test-time compute curve as a text table, one row per point."""
    rows = [f"{'method':<10} {'tokens':>8} {'accuracy':>9} {'stderr':>7} {'n':>4}"]
    rows += [f"{p['method']:<10} {p['tokens']:>8.1f} {p['accuracy']:>9.3f} {p['stderr']:>7.3f} {p['n']:>4}"
             for p in points]
    return "\n".join(rows)


def search_eval(settings: SearchSettings, model: nn.Module, tokenizer: Tokenizer) -> dict[str, Any]:
    """{"search": per-method results and curves, "test_time_curve": the curve's points} for the eval record."""
    out, _ = search_curve(settings, model, tokenizer)
    print(curve_table(out["test_time_curve"]))
    curve = out.pop("test_time_curve")
    return {"search": out, "test_time_curve": curve}
