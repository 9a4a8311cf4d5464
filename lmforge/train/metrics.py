"""Run metrics: RUN/metrics.jsonl (one JSON object per row), a TensorBoard mirror, and a loss plot.

metrics.jsonl is the source of truth: plain text any tool can read. Train rows carry step, loss, lr,
grad_norm, tokens_seen, tokens_per_s; eval rows carry step plus val_* keys.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write, atomic_write_text

METRICS_NAME = "metrics.jsonl"
TB_DIR = "tb"
PLOT_NAME = "loss.png"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl. A final line without a newline (a write cut short) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"metrics file not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    rows = []
    for lineno, line in enumerate(lines[:-1], start=1):  # lines[-1] is "" or an unfinished row
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise LmforgeError(f"{path}:{lineno}: a metrics row must be an object with an integer 'step'")
        rows.append(row)
    return rows


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Drop rows logged after `last_step` (a resumed run logs them again), atomically."""
    path = Path(path)
    if not path.is_file():
        return
    rows = [r for r in read_metrics(path) if r["step"] <= last_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


class MetricsLogger:
    """Append rows to RUN/metrics.jsonl and mirror their scalars to TensorBoard (RUN/tb/).

    `resume_step` set: rows after it are dropped from metrics.jsonl and TensorBoard events from that
    step on are purged, so curves of a resumed run have no duplicates. Unset: a fresh file.
    """

    def __init__(self, run_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_NAME
        if resume_step is None:  # a fresh run: no rows or events from an earlier one
            self.path.unlink(missing_ok=True)
            shutil.rmtree(self.run_dir / TB_DIR, ignore_errors=True)
        else:
            truncate_metrics(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(self.run_dir / TB_DIR), purge_step=purge)

    def log(self, row: dict[str, Any]) -> None:
        """Write one row (must hold an integer 'step'); numbers also go to TensorBoard as `<key>`."""
        step = int(row["step"])
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._file.write(json.dumps(row) + "\n")  # JSON has no NaN/inf: those become null
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def flush(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file.closed:
            return
        self.flush()
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def smooth(values: list[float], window: int) -> list[float]:
    """Centered moving average (shrinking at the ends): unlike an EMA it does not lag the curve."""
    half = window // 2
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def plot_curves(metrics_jsonl: str | Path, png: str | Path) -> Path:
    """Train loss (raw and smoothed) and validation loss against step, written atomically to `png`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_jsonl)
    train = [(r["step"], r["loss"]) for r in rows if _finite(r.get("loss"))]
    val = [(r["step"], r["val_loss"]) for r in rows if _finite(r.get("val_loss"))]
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)  # Agg canvas without touching pyplot's global backend
    ax = fig.add_subplot()
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
        window = 2 * (len(losses) // 40) + 1  # ~5% of the points
        ax.plot(steps, smooth(list(losses), window), color="tab:blue", linewidth=2,
                label="train loss (smoothed)")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", color="tab:orange", linewidth=2, label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(Path(metrics_jsonl).parent.name or "loss")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    png = Path(png)
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png"))
    return png


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
