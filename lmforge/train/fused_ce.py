"""LM head + cross-entropy fused and chunked, so the [tokens, vocab] logits never exist in full.

With a 32K vocabulary the logits of a 4096-token batch take 0.5 GB in fp32, and their gradient as
much again; on a CPU moving them costs as much time as the head's matmuls. Here the head runs a chunk
of rows at a time: logits_chunk = h_chunk W^T, its log-softmax and loss, and at once the gradient of
the mean loss w.r.t. those logits, d loss / d z = (softmax(z) - onehot(y)) / n_valid, which gives the
chunk's d h = g W and adds g^T h into d W. Forward therefore does the whole backward of the head too
and keeps only d h [N, d] and d W [V, d]; autograd's backward merely scales them by grad_output.
Memory: one [chunk, V] block instead of two [N, V] tensors. This is the idea of Liger Kernel's
FusedLinearCrossEntropy (Hsu et al., 2024) and of "Cut Your Losses in Large-Vocabulary Language
Models" (Wijmans et al., 2024), in plain PyTorch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.core.tensors import IGNORE_INDEX

CHUNK_BYTES = 128 * 2**20  # one [chunk, V] block: 1024 rows of a 32K vocabulary in fp32, 220 rows of 152K
MAX_CHUNK_ROWS = 1024


def auto_chunk_size(vocab_size: int) -> int:
    """Rows per chunk so that one fp32 [chunk, V] logits block stays near CHUNK_BYTES (at most MAX_CHUNK_ROWS)."""
    return max(16, min(MAX_CHUNK_ROWS, CHUNK_BYTES // (vocab_size * 4)))


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX,
                         chunk_size: int | None = None, bias: Tensor | None = None, z_loss: float = 0.0,
                         skip_ignored: bool = False) -> Tensor:
    """Mean next-token cross-entropy of `hidden @ weight.T (+ bias)` against `targets`, chunk by chunk.

    hidden [..., d], weight [V, d] (the LM head, possibly tied to the embedding), targets [...].
    Equals `causal_lm_loss(F.linear(hidden, weight, bias), targets, ignore_index)` in value and in
    gradients; with every target ignored it is 0 with zero gradients (where F.cross_entropy gives NaN).
    Under autocast the head's matmuls run in the autocast dtype, log-softmax and dW accumulate in fp32.
    `z_loss` > 0 adds z_loss * mean(log^2 Z) (PaLM's z-loss, `lmforge.train.stability.z_loss`), with
    log Z_i = z_{i,y} - log p_{i,y} from the chunk's own log-softmax and d/dz = 2 z_loss log Z softmax(z).
    `chunk_size` None keeps one logits block near CHUNK_BYTES (`auto_chunk_size`).
    `skip_ignored` runs the head only on the rows whose target counts (SFT: the assistant tokens, often a
    third of a packed row), at the price of one host sync for their count; ignored rows get zero gradient.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree on "
                         "the leading dimensions")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} is not [vocab, {hidden.shape[-1]}]")
    if chunk_size is None:
        chunk_size = auto_chunk_size(weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (hidden, weight, bias))
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index, chunk_size, compute_dtype,
                                     needs_grad, z_loss, skip_ignored)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ignore_index: int,
                chunk_size: int, compute_dtype: torch.dtype, needs_grad: bool, z_loss: float,
                skip_ignored: bool) -> Tensor:
        h = hidden.reshape(-1, hidden.shape[-1])  # copies only when hidden is not contiguous
        y = targets.reshape(-1, 1).long()
        valid = y.squeeze(1) != ignore_index
        kept = None
        if skip_ignored:
            kept = valid.nonzero().squeeze(1)  # the host sync: how many rows count
            h, y, valid = h[kept], y[kept], valid[kept]
        safe_y = y.masked_fill(~valid[:, None], 0)  # any in-range class; those rows are masked out below
        # d mean-loss / d loss_i: 1/n on counted rows, 0 on ignored ones; no host sync, and no 0/0 when
        # every target is ignored
        row_scale = valid.float() / valid.sum().clamp(min=1)
        want_h = needs_grad and hidden.requires_grad
        want_w = needs_grad and weight.requires_grad
        want_b = needs_grad and bias is not None and bias.requires_grad
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        grad_h = torch.empty_like(h) if want_h else None  # of the kept rows when skip_ignored
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_b else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)

        with torch.autocast(hidden.device.type, enabled=False):  # the dtypes below are chosen explicitly
            for start in range(0, h.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                scale = row_scale[rows, None]
                h_c = h[rows].to(compute_dtype)
                logits = F.linear(h_c, w, b)  # [chunk, V] in compute_dtype; overwritten by d loss / d logits
                loss_sum += _softmax_grad_(logits, safe_y[rows], scale, grad_b, z_loss)
                if want_h:
                    grad_h[rows] = (logits @ w).float() * scale
                if want_w:
                    scaled_h = (h[rows].float() * scale).to(compute_dtype)
                    if compute_dtype == torch.float32:
                        grad_w.addmm_(logits.t(), scaled_h)
                    else:  # a low-precision product (fp32 inside), summed over chunks in fp32
                        grad_w += logits.t() @ scaled_h

        if want_h and kept is not None:
            full = grad_h.new_zeros(hidden.reshape(-1, hidden.shape[-1]).shape)
            grad_h = full.index_copy_(0, kept, grad_h)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.input_meta = hidden.shape, hidden.dtype, weight.dtype, None if bias is None else bias.dtype
        return loss_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        hidden_shape, hidden_dtype, weight_dtype, bias_dtype = ctx.input_meta
        dh = None if grad_h is None else (grad_h * grad_output).to(hidden_dtype).reshape(hidden_shape)
        dw = None if grad_w is None else (grad_w * grad_output).to(weight_dtype)
        db = None if grad_b is None else (grad_b * grad_output).to(bias_dtype)
        return dh, dw, db, None, None, None, None, None, None, None


SOFTMAX_BLOCK_ROWS = 128  # [128, 32K] fp32 is 16 MB: the log-softmax work stays in the last-level cache


def _softmax_grad_(logits: Tensor, targets: Tensor, scale: Tensor, grad_bias: Tensor | None,
                   z_loss: float = 0.0) -> Tensor:
    """Overwrite `logits` [n, V] with softmax - onehot(targets); return sum_i scale_i * CE_i.

    Works in fp32 on blocks of rows, so the one [n, V] tensor of the chunk is the only large one, kept in
    the compute dtype. Adds sum_i scale_i (softmax_i - onehot_i), the bias gradient, into `grad_bias`.
    The per-row `scale` (1/n or 0) is applied by the caller on the small [n, d] side of the matmuls.
    """
    loss = logits.new_zeros((), dtype=torch.float32)
    # fp32 on the CPU: the block turns into its gradient in place (no second block, no copy back: ~20 % less
    # time in this function, the same bits)
    in_place = logits.dtype == torch.float32 and logits.device.type == "cpu"
    for start in range(0, logits.shape[0], SOFTMAX_BLOCK_ROWS):
        rows = slice(start, start + SOFTMAX_BLOCK_ROWS)
        block = logits[rows]
        z_target = block.gather(1, targets[rows]).float() if z_loss else None
        logp = (torch.log_softmax(block, dim=-1, out=block) if in_place
                else torch.log_softmax(block, dim=-1, dtype=torch.float32))
        logp_target = logp.gather(1, targets[rows])
        loss -= (logp_target * scale[rows]).sum()
        probs, p_target = logp.exp_(), logp_target.exp()
        if z_loss:  # + c log^2 Z: its gradient is 2 c log Z softmax(z)
            log_z = z_target - logp_target
            loss += z_loss * (log_z.square() * scale[rows]).sum()
            factor = 1 + 2 * z_loss * log_z
            probs.mul_(factor)
            p_target = p_target * factor
        grad = probs.scatter_(1, targets[rows], p_target - 1)
        if grad_bias is not None:
            grad_bias += scale[rows, 0] @ grad
        if not in_place:
            block.copy_(grad)
    return loss
