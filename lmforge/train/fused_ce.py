"""LM head + cross-entropy fused and chunked, so the [tokens, vocab] logits never exist in full.

With a 32K vocabulary the logits of a 4096-token batch take 0.5 GB in fp32, and their gradient as
much again; on a CPU that traffic, not the matmul, bounds the step. Here the head runs a chunk of
rows at a time: logits_chunk = h_chunk W^T, its log-softmax and loss, and at once the gradient of the
mean loss w.r.t. those logits, d loss / d z = (softmax(z) - onehot(y)) / n_valid, which gives the
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

from lmforge.train.objectives import IGNORE_INDEX


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX,
                         chunk_size: int = 1024, bias: Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy of `hidden @ weight.T (+ bias)` against `targets`, chunk by chunk.

    hidden [..., d], weight [V, d] (the LM head, possibly tied to the embedding), targets [...].
    Equals `causal_lm_loss(F.linear(hidden, weight, bias), targets, ignore_index)` in value and in
    gradients; with every target ignored it is 0 with zero gradients (where F.cross_entropy gives NaN).
    Under autocast the head's matmuls run in the autocast dtype, log-softmax and dW accumulate in fp32.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree on "
                         "the leading dimensions")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} is not [vocab, {hidden.shape[-1]}]")
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
                                     needs_grad)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ignore_index: int,
                chunk_size: int, compute_dtype: torch.dtype, needs_grad: bool) -> Tensor:
        d = hidden.shape[-1]
        h = hidden.reshape(-1, d)  # copies only when hidden is not contiguous
        y = targets.reshape(-1).long()
        valid = y != ignore_index
        # 1/n as a tensor: no host sync, and 0 * (1/1) = 0 when every target is ignored
        inv_n = 1.0 / valid.sum().clamp(min=1).float()
        want_h = needs_grad and hidden.requires_grad
        want_w = needs_grad and weight.requires_grad
        want_b = needs_grad and bias is not None and bias.requires_grad
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_b else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)

        with torch.autocast(hidden.device.type, enabled=False):  # the dtypes below are chosen explicitly
            for start in range(0, h.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                h_c, y_c, valid_c = h[rows].to(compute_dtype), y[rows], valid[rows]
                safe_y = y_c.masked_fill(~valid_c, 0)  # any in-range index; masked out below
                logits = F.linear(h_c, w, b).float()
                lse = torch.logsumexp(logits, dim=-1)
                target_logit = logits.gather(1, safe_y[:, None]).squeeze(1)
                loss_sum += ((lse - target_logit) * valid_c).sum()
                if not (want_h or want_w or want_b):
                    continue
                # d mean-loss / d logits = (softmax - onehot) * valid / n, built in place in `logits`
                g = logits.sub_(lse[:, None]).exp_()
                g.scatter_add_(1, safe_y[:, None], torch.full_like(lse[:, None], -1.0))
                g.mul_((valid_c * inv_n)[:, None])
                if want_b:
                    grad_b += g.sum(0)
                g = g.to(compute_dtype)
                if want_h:
                    grad_h[rows] = g @ w
                if want_w:
                    if compute_dtype == torch.float32:
                        grad_w.addmm_(g.t(), h_c)
                    else:  # low-precision matmul (fp32 inside), summed over chunks in fp32
                        grad_w += g.t() @ h_c

        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.shapes = hidden.shape, hidden.dtype, weight.dtype, None if bias is None else bias.dtype
        return loss_sum * inv_n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        hidden_shape, hidden_dtype, weight_dtype, bias_dtype = ctx.shapes
        dh = None if grad_h is None else (grad_h * grad_output).to(hidden_dtype).reshape(hidden_shape)
        dw = None if grad_w is None else (grad_w * grad_output).to(weight_dtype)
        db = None if grad_b is None else (grad_b * grad_output).to(bias_dtype)
        return dh, dw, db, None, None, None, None, None
