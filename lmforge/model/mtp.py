"""DeepSeek-V3 multi-token prediction (section 2.2): D sequential modules sharing the model's embedding and
output head; module k predicts the token k+1 positions ahead while keeping the causal chain.

Module k at position i (eq. 21-23): h'_i = W_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))], h^k = Block_k(h'),
logits = Head(RMSNorm_k(h^k_i)) predict t_{i+k+1}; h^0 is the main model's final hidden state. The loss
(eq. 24-25) is lambda / D * sum_k CE_k. Besides training, the modules are draft heads for speculative
decoding: `draft_logits(model, hidden, tokens)` returns every depth's logits for the positions given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.block import Block
from lmforge.model.config import ModelConfig
from lmforge.model.layers import make_norm


class MTPModule(nn.Module):
    """Names follow DeepSeek-V3's checkpoint (enorm, hnorm, eh_proj, a decoder block, shared_head.norm)."""

    def __init__(self, cfg: ModelConfig, depth: int) -> None:
        super().__init__()

        self.enorm, self.hnorm = make_norm(cfg), make_norm(cfg)
        self.proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)  # columns [emb; hidden]
        self.block = Block(cfg, cfg.n_layers + depth)  # layer index past the main stack: never in a KV cache
        self.norm = make_norm(cfg)

    def forward(self, hidden: torch.Tensor, emb: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """hidden [B, L, d] (depth k-1), emb [B, L, d] of the tokens k ahead -> h^k [B, L, d], before `norm`."""
        x = self.proj(torch.cat([self.enorm(emb), self.hnorm(hidden)], dim=-1))
        return self.block(x, rope, None, 0, None)


class MultiTokenPrediction(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MTPModule(cfg, k) for k in range(cfg.mtp_depth))

    def forward(self, model: nn.Module, hidden: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Normed hidden states of every depth: [B, L - k + 1, d] for k = 1..D.

        `hidden` [B, L, d]: the main model's final hidden states at positions 0..L-1; `tokens` [B, L]: the
        token after each of them (the training targets). Depth k embeds tokens[:, k-1:] (t_{i+k}), so its
        output at position i predicts tokens[:, i+k] where that exists.
        """
        out = []
        h = hidden
        for k, layer in enumerate(self.layers, start=1):
            L = tokens.shape[1] - k + 1
            if L <= 0:
                break
            positions = torch.arange(L, device=tokens.device)
            rope = model.rope(positions) if model.rope is not None else None
            h = layer(h[:, :L], model.embed(tokens[:, k - 1:]), rope)
            out.append(layer.norm(h))
        return out


def draft_logits(model: nn.Module, hidden: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Logits of each MTP depth for speculative decoding: given the main model's final hidden states
    `hidden` [B, L, d] and the tokens that follow each position `tokens` [B, L] (the last one sampled from
    the main head), depth k's logits at the last position are a draft of the token k+1 ahead of it."""
    return [model.lm_head(h) for h in model.mtp(model, hidden, tokens)]


def mtp_loss(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
             ) -> torch.Tensor:
    """lambda / D * sum_k CE(depth k's logits at i, targets[i + k]) (DeepSeek-V3 eq. 24-25)."""
    cfg = model.cfg
    losses = []
    for k, h in enumerate(model.mtp(model, hidden, targets), start=1):
        logits = model.lm_head(h[:, : targets.shape[1] - k])
        if logits.shape[1] == 0:
            break
        losses.append(F.cross_entropy(logits.flatten(0, 1).float(), targets[:, k:].flatten(),
                                      ignore_index=ignore_index))
    if not losses:
        return hidden.new_zeros(())
    return cfg.mtp_loss_weight * torch.stack(losses).mean()


def aux_losses(model: nn.Module, hidden: torch.Tensor | None = None, targets: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
    """Weighted auxiliary losses to add to the LM loss after a training forward: the MoE layers' balance and
    z losses (summed over layers, `moe_aux`) and, given the final hidden states and targets, the MTP loss."""
    out: dict[str, torch.Tensor] = {}
    if getattr(model, "mtp", None) is not None and hidden is not None and targets is not None:
        out["mtp"] = mtp_loss(model, hidden, targets)  # first: its blocks may hold MoE layers too
    moe = []
    for m in model.modules():
        if getattr(m, "aux_loss", None) is not None:
            moe.append(m.aux_loss)
            m.aux_loss = None  # taken: a later call must not reuse this forward's graph
    if moe:
        out["moe_aux"] = torch.stack(moe).sum()
    return out
