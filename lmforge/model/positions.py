"""Position encodings: rotary (RoPE) with its context-extension scalings (linear, dynamic NTK, YaRN,
LLaMA 3.1), learned absolute, sinusoidal."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.model.config import ModelConfig


def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), i < d/2 (Su et al., 2021)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def linear_frequencies(inv_freq: torch.Tensor, factor: float) -> torch.Tensor:
    """Position interpolation (Chen et al., 2023, eq. 4): f'(x, m) = f(x, m / s); dividing every frequency
    by s is the same rotation, so the cached table keeps integer positions."""
    return inv_freq / factor


def ntk_frequencies(head_dim: int, theta: float, factor: float, original_len: int, seq_len: int) -> torch.Tensor:
    """Dynamic NTK-aware scaling (bloc97/emozilla, as in HF `dynamic`): past the original context the base
    grows to theta * (s * L / L_orig - (s - 1))^(d / (d - 2)); within it RoPE is unchanged."""
    seq_len = max(seq_len, original_len)
    base = theta * (factor * seq_len / original_len - (factor - 1)) ** (head_dim / (head_dim - 2))
    return rope_frequencies(head_dim, base)


def yarn_mscale(factor: float) -> float:
    """YaRN's attention temperature sqrt(1/t) = 0.1 ln(s) + 1 (Peng et al., 2023, eq. 22), applied to
    cos/sin so that it scales q.k by its square."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def yarn_frequencies(head_dim: int, theta: float, factor: float, original_len: int,
                     beta_fast: float, beta_slow: float) -> torch.Tensor:
    """YaRN "NTK-by-parts" (Peng et al., 2023, eq. 18-20): dimensions that turn more than beta_fast times
    over the original context keep their frequency, those under beta_slow turns are interpolated by s,
    a linear ramp blends the ones between. Correction dims are floored/ceiled as HF (truncate=True) does."""
    def correction_dim(rotations: float) -> float:  # dimension d whose wavelength fits `rotations` times
        return head_dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    inv_freq = rope_frequencies(head_dim, theta)
    keep = 1 - ramp  # 1: extrapolate (original frequency), 0: interpolate (divided by s)
    return inv_freq / factor * (1 - keep) + inv_freq * keep


def llama3_frequencies(inv_freq: torch.Tensor, factor: float, original_len: int, low_freq_factor: float,
                       high_freq_factor: float) -> torch.Tensor:
    """LLaMA 3.1 scaling (Dubey et al., 2024; Meta's `apply_scaling`): wavelengths shorter than
    L_orig / high_freq_factor are kept, longer than L_orig / low_freq_factor are divided by s, and the
    band between is interpolated smoothly in 1 / wavelength."""
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original_len / low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (original_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original_len / high_freq_factor) & (wavelen <= original_len / low_freq_factor)
    return torch.where(medium, smoothed, scaled)


def scaled_rope_frequencies(cfg: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim/2] in float64, cos/sin multiplier) for `cfg.rope_scaling`; the same
    pair HF's `ROPE_INIT_FUNCTIONS[rope_type]` returns. `seq_len` matters to `dynamic` only."""
    d, theta, s = cfg.head_dim, cfg.rope_theta, cfg.rope_factor
    original = cfg.rope_original_max_seq_len or cfg.max_seq_len
    inv_freq = rope_frequencies(d, theta)
    if cfg.rope_scaling == "none":
        return inv_freq, 1.0
    if cfg.rope_scaling == "linear":
        return linear_frequencies(inv_freq, s), 1.0
    if cfg.rope_scaling == "dynamic":
        return ntk_frequencies(d, theta, s, original, seq_len or original), 1.0
    if cfg.rope_scaling == "yarn":
        return yarn_frequencies(d, theta, s, original, cfg.rope_beta_fast, cfg.rope_beta_slow), yarn_mscale(s)
    if cfg.rope_scaling == "llama3":
        return llama3_frequencies(inv_freq, s, original, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor), 1.0
    raise ValueError(f"unknown rope_scaling {cfg.rope_scaling!r}")  # ModelConfig validates it first


def cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, mscale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [..., head_dim] in the half-split layout, scaled by `mscale` (YaRN) as HF does."""
    freqs = positions.to(torch.float64)[..., None] * inv_freq.to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * mscale).float(), (emb.sin() * mscale).float()


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables in the half-split layout LLaMA/HF use (rotate_half), so HF q/k
    weights need no permutation. Scaled RoPE (`cfg.rope_scaling`) only changes the frequencies and
    the cos/sin multiplier.

    `dynamic` NTK follows HF's `dynamic_rope_update` (it reads the longest position: one host sync, for
    `dynamic` only): a call reaching past the longest length seen so far (at first the original context)
    recomputes the frequencies for its length and the table up to it; shorter calls index that table; a
    call back inside the original context returns to the original frequencies."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.dynamic = cfg.rope_scaling == "dynamic"
        self.original_len = cfg.rope_original_max_seq_len or cfg.max_seq_len
        inv_freq, mscale = scaled_rope_frequencies(cfg)
        cos, sin = cos_sin(inv_freq, torch.arange(cfg.max_seq_len), mscale)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.grown: tuple[torch.Tensor, torch.Tensor] | None = None  # dynamic: table of the longest length so far

    def _dynamic_table(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = int(positions.max()) + 1 if positions.numel() else 0
        cached = self.original_len if self.grown is None else self.grown[0].shape[0]
        if seq_len > cached or (self.grown is not None and self.grown[0].device != positions.device):
            length = max(seq_len, cached)
            inv_freq, mscale = scaled_rope_frequencies(self.cfg, length)
            self.grown = cos_sin(inv_freq, torch.arange(length, device=positions.device), mscale)
        elif seq_len < self.original_len:
            self.grown = None
        return (self.cos, self.sin) if self.grown is None else self.grown

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for `positions` ([T] or [B, T]), shaped to broadcast over heads."""
        cos, sin = self._dynamic_table(positions) if self.dynamic else (self.cos, self.sin)
        cos, sin = cos[positions], sin[positions]
        if positions.dim() == 1:
            return cos[None, None], sin[None, None]
        return cos[:, None], sin[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, T, D] queries or keys in x's dtype (as HF does, so bf16 runs match it)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def sinusoidal_table(max_seq_len: int, dim: int) -> torch.Tensor:
    """Fixed sin/cos absolute positions (Vaswani et al., 2017): PE[p, 2i] = sin(p / 10000^(2i/d))."""
    pos = torch.arange(max_seq_len, dtype=torch.float64)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_seq_len, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return table.float()


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al., 2022, sec. 3): the geometric sequence 2^(-8/n), 2^(-16/n), ... for n a
    power of two; otherwise the slopes of the nearest lower power of two m, then every other slope of 2m."""
    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    m = 2 ** math.floor(math.log2(n_heads))
    slopes = geometric(m) + geometric(2 * m)[0::2][: n_heads - m]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Additive scores -m_h * |i - j| [1, H, T, S]. Causal rows only see j <= i, where this is the paper's
    -m_h (i - j); the absolute value extends it symmetrically to bidirectional (prefix/encoder) rows."""
    dist = (q_pos[:, None] - k_pos[None, :]).abs().float()
    return -(slopes.to(dist.device)[:, None, None] * dist)[None]


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucket of key - query distances (Raffel et al., 2020, sec. 2.1; Mesh TF's scheme): bidirectional
    stacks split the buckets by sign; causal ones fold every future key into distance 0. Within a sign, the
    first half of the buckets hold exact distances, the rest log-spaced ones up to max_distance, beyond
    which all distances share the last bucket."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = num_buckets // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    large = (exact + (log_ratio * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, large)


class RelativePositionBias(nn.Module):
    """T5 relative attention bias: a learned scalar per (bucket, head), added to the scores of every layer
    of a stack (the first layer owns the table in HF's T5, the others reuse its output)."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = cfg.rel_buckets, cfg.rel_max_distance
        self.embed = nn.Embedding(cfg.rel_buckets, cfg.n_heads)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Bias [1, H, T, S] for query positions [T] against key positions [S]."""
        relative = k_pos[None, :] - q_pos[:, None]
        bucket = relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        return self.embed(bucket).permute(2, 0, 1)[None]
