"""A fast weight-only int8 matrix-vector product on CPU, for batch-1 decoding: `int8_linear(x, w, scale, bias)`.

Batch-1 decoding reads every weight once per token, so int8 weights (a quarter of fp32's bytes) can make it up
to 4x faster, but only with a kernel that converts the int8 bytes to floats inside the dot product. On an AVX2
CPU torch has none: `aten._weight_int8pack_mm` runs a scalar loop there (10x slower than an fp32 `F.linear`),
and inductor's own code for `(x * w.float()).sum(-1)` loads 8 bytes at a time through a memcpy (0.7 GB/s).

This module holds a small C kernel (below): for each output row, 32 int8 weights at a time are sign-extended,
converted to float and multiply-added with the activations (AVX2 + FMA when the compiler targets them, a plain
loop otherwise, which the compiler vectorizes for its own target), times the row's scale. Rows are split across
`torch.get_num_threads()` OpenMP threads. It is compiled with the system C compiler on first use (as inductor
does) into `$XDG_CACHE_HOME/lmforge/kernels/` (~/.cache by default), named by a hash of its source, compiler and
flags, and loaded with ctypes; no compiler, or a failed build, falls back to plain torch
(`F.linear(x, w.to(x.dtype)) * scale`, the same numbers up to float rounding order) with one warning.

`torch.ops.lmforge.int8_linear` wraps it as a custom op with a fake implementation, so a compiled decode step
(`lmforge.generate.static`) calls it inside the graph. Inputs with more than `GEMV_MAX_ROWS` rows (a prefill)
dequantize the weight once and use torch's matmul instead: there the kernel would read the weights once per row.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sysconfig
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.core.files import atomic_write

log = logging.getLogger(__name__)

GEMV_MAX_ROWS = 4  # rows of x up to which the kernel beats dequantize + matmul
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]

SOURCE = r"""
#include <stdint.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

static float dot_i8(const float* x, const int8_t* w, int64_t n) {
  int64_t i = 0;
  float acc = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
/* 8 int8 weights (the low 8 bytes of v) as 8 floats */
#define CVT8(v) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (; i + 32 <= n; i += 32) {
    __m128i lo = _mm_loadu_si128((const __m128i*)(w + i)), hi = _mm_loadu_si128((const __m128i*)(w + i + 16));
    a0 = _mm256_fmadd_ps(CVT8(lo), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(CVT8(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(CVT8(hi), _mm256_loadu_ps(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(CVT8(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(x + i + 24), a3);
  }
  __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  acc = _mm_cvtss_f32(h);
#endif
  for (; i < n; i++) acc += x[i] * (float)w[i];
  return acc;
}

/* y[r, o] = scale[o] * sum_i x[r, i] * w[o, i] (+ bias[o]); x [rows, in], w [out, in] int8, y [rows, out] */
void lmforge_int8_linear(const float* x, const int8_t* w, const float* scale, const float* bias, float* y,
                         int64_t rows, int64_t out, int64_t in, int threads) {
  #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1)
  for (int64_t o = 0; o < out; o++) {
    for (int64_t r = 0; r < rows; r++) {
      float v = dot_i8(x + r * in, w + o * in, in) * scale[o];
      y[r * out + o] = bias ? v + bias[o] : v;
    }
  }
}
"""


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge" / "kernels"


def _compiler() -> str | None:
    names = [os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"]
    for name in names:
        path = name and shutil.which(name.split()[0])
        if path:
            return path
    return None


@cache
def kernel() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use, then loaded from the cache), or None where it cannot be built."""
    cc = _compiler()
    if cc is None:
        log.warning("int8 weights: no C compiler found (set CC); using torch's slower dequantize + matmul")
        return None
    key = hashlib.sha256("\0".join([SOURCE, cc, *FLAGS]).encode()).hexdigest()[:16]
    path = cache_dir() / f"int8_linear-{key}.so"
    if not path.exists():
        src = cache_dir() / f"int8_linear-{key}.c"

        def build(tmp: str) -> None:
            atomic_write(src, lambda t: Path(t).write_text(SOURCE))
            subprocess.run([cc, *FLAGS, str(src), "-o", tmp], check=True, capture_output=True, text=True)

        try:
            atomic_write(path, build)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            log.warning("int8 weights: building the kernel with %s failed (%s); using torch's slower dequantize "
                        "+ matmul", cc, detail.strip().splitlines()[-1] if detail.strip() else e)
            return None
    lib = ctypes.CDLL(str(path))
    lib.lmforge_int8_linear.restype = None
    lib.lmforge_int8_linear.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    return lib


def reference_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The plain-torch product: the weight dequantized to x's dtype, then `F.linear`."""
    return F.linear(x, w.to(x.dtype) * scale.to(x.dtype)[:, None], bias)


def int8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
                ) -> torch.Tensor:
    """x [..., in] (any float dtype) times int8 w [out, in] with one float32 scale per output row, plus bias.

    Eagerly a direct call (the custom op's dispatch costs ~50 us, as much as a small layer's product); inside
    torch.compile the custom op `torch.ops.lmforge.int8_linear`, which the graph calls as an opaque kernel."""
    if torch.compiler.is_compiling():
        return _int8_linear_op(x, w, scale, bias)
    return _int8_linear(x, w, scale, bias)


def _int8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    lib = kernel() if x.device.type == "cpu" and 0 < rows <= GEMV_MAX_ROWS else None
    if lib is None:
        return reference_linear(x, w, scale, bias)
    xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.float().contiguous()
    y = torch.empty(x.shape[:-1] + (w.shape[0],), dtype=torch.float32)
    lib.lmforge_int8_linear(xf.data_ptr(), w.data_ptr(), scale.data_ptr(), None if bias is None else bias.data_ptr(),
                            y.data_ptr(), rows, w.shape[0], w.shape[1], torch.get_num_threads())
    return y if x.dtype == torch.float32 else y.to(x.dtype)


# a plain dispatcher op, not `torch.library.custom_op`: that one's Python layers cost ~50 us a call
_LIB = torch.library.Library("lmforge", "FRAGMENT")
_LIB.define("int8_linear(Tensor x, Tensor w, Tensor scale, Tensor? bias) -> Tensor")
_LIB.impl("int8_linear", _int8_linear, "CPU")
_LIB.impl("int8_linear", lambda x, w, scale, bias: x.new_empty(*x.shape[:-1], w.shape[0]), "Meta")
_int8_linear_op = torch.ops.lmforge.int8_linear.default


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of a float [out, in] weight: (int8 [out, in], float32 scale [out]), w ~ q * scale."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()
