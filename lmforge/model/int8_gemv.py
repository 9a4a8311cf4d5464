"""A fast weight-only int8 matrix-vector product on CPU, for batch-1 decoding: `int8_linear(x, w, scale, bias)`.

Batch-1 decoding reads every weight once per token, so int8 weights (a quarter of fp32's bytes) can make it up
to 4x faster, but only with a kernel that converts the int8 bytes to floats inside the dot product. On an AVX2
CPU torch has none: `aten._weight_int8pack_mm` runs a scalar loop there (10x slower than an fp32 `F.linear`),
and inductor's own code for `(x * w.float()).sum(-1)` reaches 0.7 GB/s.

This module holds a small C kernel (below). Each row of activations is first rounded to int16 with its own scale
(max |x| / 32767: a relative error of at most 2^-16 of the row's largest value, ~250x finer than the weights' int8
rounding); then, for each output row, 32 int8 weights at a time are sign-extended to int16 and multiply-added in
int32 pairs (AVX2 `vpmaddwd`: a third of the instructions of converting every weight to float), flushed to float
every 2048 weights, times the two scales. Where the compiler does not target AVX2 a plain integer loop runs
instead. Rows are split across `torch.get_num_threads()` OpenMP threads. It is compiled with the system C compiler
on first use (as inductor does) into `$XDG_CACHE_HOME/lmforge/kernels/` (~/.cache by default), named by a hash of
its source, compiler, flags and CPU kind, and loaded with ctypes; no compiler, or a failed build, falls back to
plain torch (`F.linear(x, w.to(x.dtype)) * scale`) with one warning.

`torch.ops.lmforge.int8_linear` wraps it as a custom op with a fake implementation, so a compiled decode step
(`lmforge.generate.static`) calls it inside the graph. Inputs with more than `GEMV_MAX_ROWS` rows (a long prefill)
use torch's fp32 matmul on the dequantized weight instead, which is faster there.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.core.files import atomic_write

log = logging.getLogger(__name__)

# rows of x up to which the kernel beats dequantize + matmul: a short prompt's prefill too (on a 32768 x 896 layer,
# 32 rows took 45 ms in the kernel vs 170 ms to dequantize and multiply; past that torch's fp32 matmul wins)
GEMV_MAX_ROWS = 32
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* sum_i x[i] * w[i] of int16 activations and int8 weights: pairs multiplied and added in int32 (vpmaddwd),
   flushed to float every 2048 weights, so no int32 lane overflows (2048 / 16 * 2 * 32767 * 127 < 2^31) */
static float dot_i16_i8(const int16_t* x, const int8_t* w, int64_t n) {
  int64_t i = 0;
  float acc = 0.0f;
#if defined(__AVX2__)
  __m256 f = _mm256_setzero_ps();
  while (i + 32 <= n) {
    __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
    int64_t end = i + 2048 < n ? i + 2048 : n;
    for (; i + 32 <= end; i += 32) {
      __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w + i)));
      __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w + i + 16)));
      s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i*)(x + i))));
      s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i*)(x + i + 16))));
    }
    f = _mm256_add_ps(f, _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1)));
  }
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(f), _mm256_extractf128_ps(f, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  acc = _mm_cvtss_f32(h);
#endif
  int64_t tail = 0;
  for (; i < n; i++) tail += (int32_t)x[i] * w[i];
  return acc + (float)tail;
}

/* y[r, o] = scale[o] * sum_i x[r, i] * w[o, i] (+ bias[o]); x [rows, in] float, w [out, in] int8, y [rows, out].
   Each row of x is first rounded to int16 with its own scale (max |x| / 32767). Returns 0, or 1 out of memory. */
int lmforge_int8_linear(const float* x, const int8_t* w, const float* scale, const float* bias, float* y,
                        int64_t rows, int64_t out, int64_t in, int threads) {
  int16_t* xq = (int16_t*)malloc(sizeof(int16_t) * rows * in + 32);
  float* xs = (float*)malloc(sizeof(float) * rows);
  if (!xq || !xs) { free(xq); free(xs); return 1; }
  for (int64_t r = 0; r < rows; r++) {
    const float* xr = x + r * in;
    float m = 0.0f;
    for (int64_t i = 0; i < in; i++) m = fmaxf(m, fabsf(xr[i]));
    xs[r] = m > 0.0f ? m / 32767.0f : 1.0f;
    float inv = 1.0f / xs[r];
    for (int64_t i = 0; i < in; i++) xq[r * in + i] = (int16_t)lrintf(xr[i] * inv);
  }
  #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1)
  for (int64_t o = 0; o < out; o++) {
    for (int64_t r = 0; r < rows; r++) {
      float v = dot_i16_i8(xq + r * in, w + o * in, in) * xs[r] * scale[o];
      y[r * out + o] = bias ? v + bias[o] : v;
    }
  }
  free(xq);
  free(xs);
  return 0;
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
    # -march=native: a cache shared by machines with other CPUs (a network home) must not mix their builds
    cpu = f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}"
    key = hashlib.sha256("\0".join([SOURCE, cc, cpu, *FLAGS]).encode()).hexdigest()[:16]
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
    lib.lmforge_int8_linear.restype = ctypes.c_int
    lib.lmforge_int8_linear.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    return lib


def reference_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The plain-torch product with the weight dequantized: x w^T times each output row's scale (one temporary
    copy of the weight, in x's dtype), plus bias."""
    y = F.linear(x, w.to(x.dtype)) * scale.to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


def int8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
                ) -> torch.Tensor:
    """x [..., in] (any float dtype) times int8 w [out, in] with one float32 scale per output row, plus bias.

    Eagerly a direct call (going through the dispatcher costs ~10 us of Python a call); inside torch.compile the
    op `torch.ops.lmforge.int8_linear`, which the graph calls as an opaque kernel."""
    if torch.compiler.is_compiling():
        return _int8_linear_op(x, w, scale, bias)
    return _int8_linear(x, w, scale, bias)


def _int8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    fits = x.device.type == "cpu" and 0 < rows <= GEMV_MAX_ROWS and w.dtype == torch.int8 and w.is_contiguous() \
        and scale.dtype == torch.float32 and scale.is_contiguous()
    lib = kernel() if fits else None
    if lib is None:
        return reference_linear(x, w, scale, bias)
    xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.float().contiguous()
    y = torch.empty(x.shape[:-1] + (w.shape[0],), dtype=torch.float32)
    if lib.lmforge_int8_linear(xf.data_ptr(), w.data_ptr(), scale.data_ptr(),
                               None if bias is None else bias.data_ptr(), y.data_ptr(), rows, w.shape[0], w.shape[1],
                               torch.get_num_threads()):
        raise MemoryError("int8 kernel: out of memory for the activations' int16 copy")
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
