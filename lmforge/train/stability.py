"""Training stability: loss-spike rollback, z-loss, and GLM's embedding-gradient shrink.

- Loss spikes (PaLM, Chowdhery et al. 2022, §5.1; OPT, Zhang et al. 2022): a loss more than k standard
  deviations above the window of recent accepted losses is a spike; the run goes back to the last
  checkpoint and skips the batches consumed since it (PaLM restarted ~100 steps before a spike and
  skipped 200-500 batches), plus `skip_after` more. PaLM found spikes come from the combination of
  a data batch and a parameter state, so neither alone is replayed.
- z-loss (PaLM §5): 1e-4 * log^2 Z of the softmax normalizer keeps log Z near 0, which avoids
  round-off drift of the output logits.
- Embedding-gradient shrink (GLM-130B, Zeng et al. 2022, §3.3): emb = a*emb + (1-a)*emb.detach()
  scales the embedding's gradient by a (0.1 in GLM-130B), which removed most of their early spikes.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lmforge.checkpoint.store import load_checkpoint
from lmforge.core.config import require
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.core.tensors import IGNORE_INDEX

if TYPE_CHECKING:
    from lmforge.train.config import Batches

SPIKES_NAME = "spikes.jsonl"
LoadCheckpoint = Callable[[Path, nn.Module, torch.optim.Optimizer], "dict[str, Any] | None"]

# ----------------------------------------------------------------------------------------------
# z-loss and embedding-gradient shrink


def z_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """mean over counted positions of (log Z)^2, log Z = logsumexp(logits) (PaLM §5; scale it by 1e-4).

    The fused path (`linear_cross_entropy(..., z_loss=c)`) computes the same term chunk by chunk.
    """
    log_z = torch.logsumexp(logits.float().reshape(-1, logits.shape[-1]), dim=-1)
    valid = (targets.reshape(-1) != ignore_index).float()
    return (log_z.square() * valid).sum() / valid.sum().clamp(min=1)


def input_embedding(model: nn.Module) -> nn.Module:
    """The module whose output is the token embedding (`model.embed` in lmforge's Transformer)."""
    embed = getattr(model, "embed", None)
    if not isinstance(embed, nn.Module):
        raise ConfigError(f"train.embed_grad_alpha: {type(model).__name__} has no `embed` module to hook")
    return embed


def shrink_embedding_gradient(embedding: nn.Module, alpha: float) -> RemovableHandle:
    """Forward hook giving out.detach() + alpha * (out - out.detach()): the forward value is exactly the
    embedding, the gradient flowing into it exactly alpha times the incoming one (GLM-130B's form,
    a*e + (1-a)*e.detach(), rounds the forward)."""
    require(0 < alpha <= 1, "train.embed_grad_alpha", alpha, "in (0, 1]")

    def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
        frozen = out.detach()
        return frozen + alpha * (out - frozen)

    return embedding.register_forward_hook(hook)


# ----------------------------------------------------------------------------------------------
# loss-spike detection and rollback


class SpikeDetector:
    """A loss is a spike if it is non-finite, or, once `warmup` losses were accepted, above
    mean + k * max(std, min_std_ratio * mean) of the last `window` accepted losses.

    Spikes are not added to the window, so one bad batch does not widen the band. The floor on the
    std (1% of the mean by default) keeps a near-constant loss from turning noise into spikes.
    """

    def __init__(self, k: float, window: int, warmup: int, min_std_ratio: float = 0.01) -> None:
        require(2 <= warmup <= window, "train.spike.warmup", warmup, f"in [2, train.spike.window={window}]")
        self.k, self.warmup, self.min_std_ratio = k, warmup, min_std_ratio
        self.losses: deque[float] = deque(maxlen=window)

    def threshold(self) -> float | None:
        """The loss above which the next one is a spike; None during the warm window."""
        if len(self.losses) < self.warmup:
            return None
        mean = statistics.fmean(self.losses)
        std = statistics.pstdev(self.losses, mu=mean)
        return mean + self.k * max(std, self.min_std_ratio * abs(mean))

    def is_spike(self, loss: float) -> bool:
        """Judge `loss`; a loss that is not a spike joins the window."""
        if not math.isfinite(loss):
            return True
        limit = self.threshold()
        if limit is not None and loss > limit:
            return True
        self.losses.append(loss)
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses.clear()
        self.losses.extend(float(x) for x in state.get("losses", []))


class SpikeGuard:
    """Watches each step's loss; on a spike restores the last checkpoint and skips the offending data.

    The trainer calls `before_step(batches)` before drawing a step's micro-batches, `is_spike(loss)`
    before the optimizer step, and on a spike `recover(...)`, which returns the checkpoint's saved
    state (the trainer restores its counters from it). Each rollback is appended to RUN/spikes.jsonl.
    """

    def __init__(self, run_dir: str | Path, k: float, window: int, warmup: int, skip_after: int,
                 max_rollbacks: int, load: LoadCheckpoint = load_checkpoint, log: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.load, self.log = load, log  # the run's checkpoint reader; only the main rank writes the log
        self.detector = SpikeDetector(k, window, warmup)
        self.skip_after = skip_after
        self.max_rollbacks = max_rollbacks
        self._step_start: dict[str, Any] | None = None
        self._rollbacks: dict[int, int] = {}  # checkpoint step -> rollbacks to it

    def before_step(self, batches: Batches) -> None:
        self._step_start = copy.deepcopy(batches.state_dict())

    def is_spike(self, loss: float) -> bool:
        return self.detector.is_spike(loss)

    def recover(self, step: int, loss: float, model: nn.Module, optimizer: torch.optim.Optimizer,
                batches: Batches) -> dict[str, Any]:
        """Roll model, optimizer and RNG back to RUN/checkpoints/latest and move the data past the spike.

        `step` is the 1-based step whose loss spiked. The data position after the spike's batches is kept
        (so the batches between the checkpoint and the spike are skipped), then `skip_after` more
        micro-batches are drawn and dropped. Returns the checkpoint's trainer state, with "spike": the
        record also written to spikes.jsonl.
        """
        threshold = self.detector.threshold()
        after_spike = copy.deepcopy(batches.state_dict())
        saved = self.load(self.run_dir, model, optimizer)
        if saved is None:
            raise LmforgeError(f"step {step}: loss spike ({loss}) but {self.run_dir} has no checkpoint to roll "
                               "back to")
        back_to = int(saved["step"])
        self._rollbacks[back_to] = self._rollbacks.get(back_to, 0) + 1
        if self._rollbacks[back_to] > self.max_rollbacks:
            raise LmforgeError(f"step {step}: loss {loss} spiked again after {self.max_rollbacks} rollbacks to "
                               f"step {back_to}; lower train.lr, raise train.spike.skip_batches or "
                               "train.spike.k, then resume")
        batches.load_state_dict(after_spike)
        for _ in range(self.skip_after):
            batches.next_batch()
        record = {"step": step, "loss": loss, "threshold": threshold, "rollback_to": back_to,
                  "skipped_from": saved["loader"], "spike_batch_at": self._step_start,
                  "skipped_to": batches.state_dict(), "skipped_batches_after": self.skip_after}
        if not self.log:
            return {**saved, "spike": record}
        with open(self.run_dir / SPIKES_NAME, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(f"loss spike at step {step}: loss {loss:.4f} > {threshold}; rolled back to step {back_to}, "
              f"data skipped from {saved['loader']} to {record['skipped_to']}", file=sys.stderr)
        return {**saved, "spike": record}
