"""Fused CPU fake-quant kernels: plain C + OpenMP, compiled lazily with the system C compiler, loaded by ctypes.

Why C through ctypes rather than a torch C++ extension: the kernels only need raw float pointers, and a C
file without torch headers or pybind11 compiles in well under a second, so the first test run on a fresh
machine does not pay a minute of C++ compilation. The shared object links ``libgomp.so.1``, which resolves
to the copy torch already loaded, so both share one OpenMP runtime and respect ``torch.set_num_threads``
(the thread count is passed on every call).

The kernels implement exactly the same operation sequence as the eager path in
:mod:`model_quantization.functional` (true division, clamp, round-half-to-even, multiply), so outputs and
input gradients are bit-identical; only the order of summations differs: the step gradients (the kernels
accumulate in double precision) and LQ-Net's per-level sums (float within a block, double across blocks,
where the eager path sums in double).

Compilation is never required for correctness. Without a compiler, with ``MODEL_QUANTIZATION_KERNELS=0``,
or when compilation or loading fails, :func:`load` returns ``None`` (with one warning naming the reason)
and callers use the eager implementation.

The build is cached under ``$MODEL_QUANTIZATION_CACHE`` (default ``~/.cache/model_quantization``), keyed
by the source, the compiler's version and the CPU's feature flags (the code is built with
``-march=native``), and written atomically so that concurrent DDP ranks can race safely.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

__all__ = ["SOURCE", "load", "status"]

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* Work is split into blocks of BLOCK elements, statically partitioned over the threads like ATen's
 * parallel_for: each thread streams one contiguous range, which the hardware prefetchers like (dynamic
 * scheduling measured ~1.7x slower here). Sums are accumulated in float inside a block (vectorised;
 * "omp simd" licenses the reassociation) and in double across blocks. */
#define BLOCK 2048
#define BLOCK_LOOP(n)                                                              \
    const int64_t num_blocks = ((n) + BLOCK - 1) / BLOCK;                          \
    _Pragma("omp parallel for num_threads(threads) schedule(static) reduction(+:acc_s, acc_b)") \
    for (int64_t blk = 0; blk < num_blocks; ++blk)

/* Clamp with compare-selects rather than fminf/fmaxf: they vectorise without -ffinite-math-only and, like
 * torch.clamp, let NaN through. */
#define CLAMP(v, lo, hi) ((v) < (lo) ? (lo) : ((v) > (hi) ? (hi) : (v)))

/* LSQ / LSQ+ fake quantization of a contiguous tensor viewed as [outer, channels, inner]
 * (per-tensor: channels == 1), with offset b (0 without LSQ+):
 *   v = (x - b) / s;  q = round(clamp(v, -qn, qp))   or, on the binary grid, q = v >= 0 ? 1 : -1;
 *   out = q * s + b.
 * x - 0 and q * s + 0 are exact, so b = 0 reproduces plain LSQ bit for bit. Loops are macros
 * instantiated per grid so that every loop body is branch-free and vectorises. */
#define LSQ_LEVEL_INT(v) nearbyintf(CLAMP((v), -qn, qp))
#define LSQ_LEVEL_SIGN(v) ((v) >= 0.0f ? 1.0f : -1.0f)

#define LSQ_FORWARD_SPAN(LEVEL, XS, OUTS, LO, HI)                                  \
    _Pragma("omp simd")                                                            \
    for (int64_t i = (LO); i < (HI); ++i) {                                        \
        float v = (XS[i] - b) / s;                                                 \
        OUTS[i] = LEVEL(v) * s + b;                                                \
    }

/* Backward of one span: dx = grad * [-qn <= v <= qp]; sum_s += grad * (inside ? q - v : q) (LSQ eq. 3,
 * unscaled); sum_b += grad * (1 - inside) (LSQ+ offset). */
#define LSQ_BACKWARD_SPAN(LEVEL, XS, GS, DXS, LO, HI)                              \
    _Pragma("omp simd reduction(+:sum_s, sum_b)")                                  \
    for (int64_t i = (LO); i < (HI); ++i) {                                        \
        float v = (XS[i] - b) / s;                                                 \
        float q = LEVEL(v);                                                        \
        int inside = (v >= -qn) & (v <= qp);                                       \
        float g = GS[i];                                                           \
        DXS[i] = inside ? g : 0.0f;                                                \
        sum_s += g * (inside ? q - v : q);                                         \
        sum_b += inside ? 0.0f : g;                                                \
    }

void mq_lsq_forward(const float* restrict x, float* restrict out, int64_t outer, int64_t channels,
                    int64_t inner, const float* step, const float* beta, float qn, float qp, int sign_grid,
                    int threads) {
    double acc_s = 0.0, acc_b = 0.0; /* unused; BLOCK_LOOP's reduction clause names them */
    if (channels == 1) {
        const float s = step[0], b = beta[0];
        const int64_t n = outer * inner;
        BLOCK_LOOP(n) {
            const int64_t lo = blk * BLOCK, hi = lo + BLOCK < n ? lo + BLOCK : n;
            if (sign_grid) { LSQ_FORWARD_SPAN(LSQ_LEVEL_SIGN, x, out, lo, hi) }
            else { LSQ_FORWARD_SPAN(LSQ_LEVEL_INT, x, out, lo, hi) }
        }
        return;
    }
    const int64_t rows = outer * channels;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float s = step[r % channels], b = beta[r % channels];
        const float* restrict xr = x + r * inner;
        float* restrict outr = out + r * inner;
        if (sign_grid) { LSQ_FORWARD_SPAN(LSQ_LEVEL_SIGN, xr, outr, 0, inner) }
        else { LSQ_FORWARD_SPAN(LSQ_LEVEL_INT, xr, outr, 0, inner) }
    }
    (void)acc_s; (void)acc_b;
}

/* dstep and dbeta are double[channels] (unscaled sums). */
void mq_lsq_backward(const float* restrict x, const float* restrict grad, float* restrict dx, int64_t outer,
                     int64_t channels, int64_t inner, const float* step, const float* beta, float qn,
                     float qp, int sign_grid, double* dstep, double* dbeta, int threads) {
    if (channels == 1) {
        const float s = step[0], b = beta[0];
        const int64_t n = outer * inner;
        double acc_s = 0.0, acc_b = 0.0;
        BLOCK_LOOP(n) {
            const int64_t lo = blk * BLOCK, hi = lo + BLOCK < n ? lo + BLOCK : n;
            float sum_s = 0.0f, sum_b = 0.0f;
            if (sign_grid) { LSQ_BACKWARD_SPAN(LSQ_LEVEL_SIGN, x, grad, dx, lo, hi) }
            else { LSQ_BACKWARD_SPAN(LSQ_LEVEL_INT, x, grad, dx, lo, hi) }
            acc_s += sum_s;
            acc_b += sum_b;
        }
        dstep[0] = acc_s;
        dbeta[0] = acc_b;
        return;
    }
    /* Per channel (weights): per-row partial sums, then a serial, deterministic sum per channel.
     * Rows of weights are short (a filter), so float sums per row are accurate. */
    const int64_t rows = outer * channels;
    double* row_s = (double*)malloc(sizeof(double) * 2 * (size_t)rows);
    double* row_b = row_s + rows;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float s = step[r % channels], b = beta[r % channels];
        const float* restrict xr = x + r * inner;
        const float* restrict gr = grad + r * inner;
        float* restrict dxr = dx + r * inner;
        float sum_s = 0.0f, sum_b = 0.0f;
        if (sign_grid) { LSQ_BACKWARD_SPAN(LSQ_LEVEL_SIGN, xr, gr, dxr, 0, inner) }
        else { LSQ_BACKWARD_SPAN(LSQ_LEVEL_INT, xr, gr, dxr, 0, inner) }
        row_s[r] = sum_s;
        row_b[r] = sum_b;
    }
    memset(dstep, 0, sizeof(double) * (size_t)channels);
    memset(dbeta, 0, sizeof(double) * (size_t)channels);
    for (int64_t r = 0; r < rows; ++r) {
        dstep[r % channels] += row_s[r];
        dbeta[r % channels] += row_b[r];
    }
    free(row_s);
}

/* PACT / fixed-clip uniform activations: y = clamp(x, 0, alpha); out = round(y / s) * s, s = alpha / levels. */
void mq_clip_forward(const float* restrict x, float* restrict out, int64_t n, float alpha, float s, int threads) {
    double acc_s = 0.0, acc_b = 0.0;
    BLOCK_LOOP(n) {
        const int64_t lo = blk * BLOCK, hi = lo + BLOCK < n ? lo + BLOCK : n;
        #pragma omp simd
        for (int64_t i = lo; i < hi; ++i) {
            float y = CLAMP(x[i], 0.0f, alpha);
            out[i] = nearbyintf(y / s) * s;
        }
    }
    (void)acc_s; (void)acc_b;
}

/* dx = grad * [0 <= x < alpha];  returns sum(grad * [x >= alpha])  (PACT, Choi et al. 2018, eq. 3). */
double mq_clip_backward(const float* restrict x, const float* restrict grad, float* restrict dx, int64_t n,
                        float alpha, int threads) {
    double acc_s = 0.0, acc_b = 0.0;
    BLOCK_LOOP(n) {
        const int64_t lo = blk * BLOCK, hi = lo + BLOCK < n ? lo + BLOCK : n;
        float sum = 0.0f;
        #pragma omp simd reduction(+:sum)
        for (int64_t i = lo; i < hi; ++i) {
            float xi = x[i], g = grad[i];
            int above = xi >= alpha;
            dx[i] = (xi >= 0.0f && !above) ? g : 0.0f;
            sum += above ? g : 0.0f;
        }
        acc_s += sum;
    }
    (void)acc_b;
    return acc_s;
}

/* Element-wise loops without reductions: the same static blocks as BLOCK_LOOP. */
#define ELEMENTWISE_LOOP(n)                                                        \
    const int64_t num_blocks = ((n) + BLOCK - 1) / BLOCK;                          \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")              \
    for (int64_t blk = 0; blk < num_blocks; ++blk)
#define BLOCK_RANGE(n)                                                             \
    const int64_t lo = blk * BLOCK, hi = lo + BLOCK < (n) ? lo + BLOCK : (n);

/* Binary activations: out = x >= 0 ? 1 : -1 (sign(0) = +1; NaN gives -1, like the eager torch.where). */
void mq_sign_forward(const float* restrict x, float* restrict out, int64_t n, int threads) {
    ELEMENTWISE_LOOP(n) {
        BLOCK_RANGE(n)
        #pragma omp simd
        for (int64_t i = lo; i < hi; ++i) out[i] = x[i] >= 0.0f ? 1.0f : -1.0f;
    }
}

/* Bi-Real Net's ApproxSign backward: dx = grad * clamp_min(2 - 2|x|, 0) (NaN propagates, as in torch). */
void mq_bireal_backward(const float* restrict x, const float* restrict grad, float* restrict dx, int64_t n,
                        int threads) {
    ELEMENTWISE_LOOP(n) {
        BLOCK_RANGE(n)
        #pragma omp simd
        for (int64_t i = lo; i < hi; ++i) {
            float t = 2.0f - 2.0f * fabsf(x[i]);
            dx[i] = grad[i] * (t < 0.0f ? 0.0f : t);
        }
    }
}

/* Clipped straight-through backward of sign: dx = |x| <= clip ? grad : 0. */
void mq_ste_backward(const float* restrict x, const float* restrict grad, float* restrict dx, int64_t n,
                     float clip, int threads) {
    ELEMENTWISE_LOOP(n) {
        BLOCK_RANGE(n)
        #pragma omp simd
        for (int64_t i = lo; i < hi; ++i) dx[i] = fabsf(x[i]) <= clip ? grad[i] : 0.0f;
    }
}

/* Nearest of sorted levels (LQ-Net). x: rows of m contiguous elements, row r uses levels[g] and
 * thresholds[g] with g = r % groups (levels: groups x L ascending; thresholds: groups x (L - 1), the
 * mid-points, computed by the caller). index = #(thresholds < v), NaN counting as above every threshold
 * (torch.searchsorted, side left); out = levels[index], a copy of the level.
 * With counts != NULL, also counts and sums (groups x L) of the elements at each level: float within a
 * block, then double per block, added up in block order (the same result for any thread count). */
/* Thresholds and levels are copied to locals first: that is what lets GCC keep them in registers and
 * vectorise the element loop (with the pointers it gives up); the chain of selects, rather than a gather
 * from levels[index], is also what keeps each output an exact copy of a level. */
#define LEVEL_SPAN(NT)                                                             \
    {                                                                              \
        float tt[NT], ll[(NT) + 1];                                                \
        for (int j = 0; j < (NT); ++j) tt[j] = t[j];                               \
        for (int j = 0; j <= (NT); ++j) ll[j] = lv[j];                             \
        _Pragma("omp simd")                                                        \
        for (int64_t i = 0; i < len; ++i) {                                        \
            const float v = xs[i];                                                 \
            int k = 0;                                                             \
            float o = ll[0];                                                       \
            for (int j = 0; j < (NT); ++j) {                                       \
                const int above = !(v <= tt[j]);                                   \
                k += above;                                                        \
                o = above ? ll[j + 1] : o;                                         \
            }                                                                      \
            idx[i] = k;                                                            \
            outs[i] = o;                                                           \
        }                                                                          \
    }

/* 8 or 16 levels (3 and 4 bits) with x86 vector intrinsics, when the build has them: the index is counted
 * by compares alone and the output is a register permute of the levels by the index (an exact copy of a
 * level, like the select chain), which halves the work of the select chain: 16 levels, AVX-512, 0.25 ns
 * per element instead of 0.45 (values only, 1 thread). The compare is "not <=", unordered true, so NaN
 * goes above every threshold exactly as in LEVEL_SPAN; the tail of a span goes through the scalar loop. */
#if defined(__AVX512F__)
#define HAVE_LEVEL_SIMD 1  /* 16 lanes */
#define SIMD_SPAN(NT)                                                                        \
    {                                                                                      \
        __m512 tt[NT];                                                                     \
        float padded[16] = {0};                                                            \
        for (int j = 0; j < (NT); ++j) tt[j] = _mm512_set1_ps(t[j]);                       \
        for (int j = 0; j <= (NT); ++j) padded[j] = lv[j];                                 \
        const __m512 ll = _mm512_loadu_ps(padded);                                         \
        const __m512i one = _mm512_set1_epi32(1);                                          \
        for (; i + 16 <= len; i += 16) {                                                   \
            const __m512 v = _mm512_loadu_ps(xs + i);                                      \
            __m512i k = _mm512_setzero_si512();                                            \
            for (int j = 0; j < (NT); ++j)                                                 \
                k = _mm512_mask_add_epi32(k, _mm512_cmp_ps_mask(v, tt[j], _CMP_NLE_UQ), k, one); \
            _mm512_storeu_si512((void*)(idx + i), k);                                      \
            _mm512_storeu_ps(outs + i, _mm512_permutexvar_ps(k, ll));                      \
        }                                                                                  \
    }
#elif defined(__AVX2__)
#define HAVE_LEVEL_SIMD 1  /* 8 lanes */
#define SIMD_SPAN(NT)                                                                        \
    {                                                                                      \
        __m256 tt[NT];                                                                     \
        float padded[16] = {0};                                                            \
        for (int j = 0; j < (NT); ++j) tt[j] = _mm256_set1_ps(t[j]);                       \
        for (int j = 0; j <= (NT); ++j) padded[j] = lv[j];                                 \
        const __m256 lo = _mm256_loadu_ps(padded), hi = _mm256_loadu_ps(padded + 8);       \
        const __m256i seven = _mm256_set1_epi32(7);                                        \
        for (; i + 8 <= len; i += 8) {                                                     \
            const __m256 v = _mm256_loadu_ps(xs + i);                                      \
            __m256i k = _mm256_setzero_si256();                                            \
            for (int j = 0; j < (NT); ++j) /* an all-ones lane is -1: subtracting counts it */ \
                k = _mm256_sub_epi32(k, _mm256_castps_si256(_mm256_cmp_ps(v, tt[j], _CMP_NLE_UQ))); \
            __m256 o = _mm256_permutevar8x32_ps(lo, k);                                    \
            if ((NT) > 7)                                                                  \
                o = _mm256_blendv_ps(o, _mm256_permutevar8x32_ps(hi, k),                   \
                                     _mm256_castsi256_ps(_mm256_cmpgt_epi32(k, seven)));   \
            _mm256_storeu_si256((__m256i*)(idx + i), k);                                   \
            _mm256_storeu_ps(outs + i, o);                                                 \
        }                                                                                  \
    }
#endif

#ifdef HAVE_LEVEL_SIMD
static void level_span_simd(const float* restrict xs, float* restrict outs, int32_t* restrict idx, int64_t len,
                            const float* restrict lv, const float* restrict t, int64_t num_levels) {
    int64_t i = 0;
    if (num_levels == 16) SIMD_SPAN(15) else SIMD_SPAN(7)
    for (; i < len; ++i) {
        const float v = xs[i];
        int k = 0;
        for (int64_t j = 0; j < num_levels - 1; ++j) k += !(v <= t[j]);
        idx[i] = k;
        outs[i] = lv[k];
    }
}
#endif

static void level_span(const float* restrict xs, float* restrict outs, int32_t* restrict idx, int64_t len,
                       const float* restrict lv, const float* restrict t, int64_t num_levels) {
#ifdef HAVE_LEVEL_SIMD
    if (num_levels == 8 || num_levels == 16) {
        level_span_simd(xs, outs, idx, len, lv, t, num_levels);
        return;
    }
#endif
    switch (num_levels) {
        case 2: LEVEL_SPAN(1) return;
        case 3: LEVEL_SPAN(2) return;
        case 4: LEVEL_SPAN(3) return;
        case 8: LEVEL_SPAN(7) return;
        case 16: LEVEL_SPAN(15) return;
        default: break;
    }
    for (int64_t i = 0; i < len; ++i) { /* binary search: the first threshold >= v */
        const float v = xs[i];
        int64_t a = 0, b = num_levels - 1;
        while (a < b) {
            const int64_t mid = (a + b) / 2;
            if (!(v <= t[mid])) a = mid + 1; else b = mid;
        }
        idx[i] = (int32_t)a;
        outs[i] = lv[a];
    }
}

/* Per-level count and sum of one span, into float partials: 8 interleaved copies (consecutive elements at
 * the same level do not wait for each other's stores), each level's count and sum side by side (one cache
 * line per update). Measured on an AVX-512 CPU, 16 levels: 0.36 ns per element instead of 0.58 with 4
 * copies in separate count and sum tables. */
#define LEVEL_COPIES 8
static void level_stats(const float* restrict xs, const int32_t* restrict idx, int64_t len, int64_t num_levels,
                        double* restrict counts, double* restrict sums) {
    float cs[LEVEL_COPIES][256][2];
    for (int u = 0; u < LEVEL_COPIES; ++u)
        for (int64_t l = 0; l < num_levels; ++l) cs[u][l][0] = 0.0f, cs[u][l][1] = 0.0f;
    int64_t i = 0;
    for (; i + LEVEL_COPIES <= len; i += LEVEL_COPIES)
        for (int u = 0; u < LEVEL_COPIES; ++u) {
            float* restrict at = cs[u][idx[i + u]];
            at[0] += 1.0f;
            at[1] += xs[i + u];
        }
    for (; i < len; ++i) {
        cs[0][idx[i]][0] += 1.0f;
        cs[0][idx[i]][1] += xs[i];
    }
    for (int64_t l = 0; l < num_levels; ++l) {
        double c = 0.0, t = 0.0;
        for (int u = 0; u < LEVEL_COPIES; ++u) c += (double)cs[u][l][0], t += (double)cs[u][l][1];
        counts[l] = c;
        sums[l] = t;
    }
}

/* Returns 0, or -1 when a scratch allocation failed (nothing written to counts/sums then). */
int mq_nearest_level(const float* restrict x, float* restrict out, int64_t rows, int64_t groups, int64_t m,
                     const float* levels, const float* thresholds, int64_t num_levels, double* counts,
                     double* sums, int threads) {
    const int64_t nt = num_levels - 1;
    const int64_t spans_per_row = (m + BLOCK - 1) / BLOCK;
    const int64_t spans = rows * spans_per_row;
    double* partial = NULL;
    if (counts != NULL) {
        partial = (double*)malloc(sizeof(double) * 2 * (size_t)num_levels * (size_t)spans);
        if (partial == NULL) return -1;
    }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t sp = 0; sp < spans; ++sp) {
        int32_t idx[BLOCK];
        const int64_t r = sp / spans_per_row, g = r % groups;
        const int64_t lo = (sp % spans_per_row) * BLOCK, hi = lo + BLOCK < m ? lo + BLOCK : m;
        const float* xs = x + r * m + lo;
        level_span(xs, out + r * m + lo, idx, hi - lo, levels + g * num_levels, thresholds + g * nt,
                   num_levels);
        if (partial != NULL)
            level_stats(xs, idx, hi - lo, num_levels, partial + 2 * num_levels * sp,
                        partial + 2 * num_levels * sp + num_levels);
    }
    if (partial != NULL) {
        memset(counts, 0, sizeof(double) * (size_t)(groups * num_levels));
        memset(sums, 0, sizeof(double) * (size_t)(groups * num_levels));
        for (int64_t sp = 0; sp < spans; ++sp) {
            const int64_t g = (sp / spans_per_row) % groups;
            for (int64_t l = 0; l < num_levels; ++l) {
                counts[g * num_levels + l] += partial[2 * num_levels * sp + l];
                sums[g * num_levels + l] += partial[2 * num_levels * sp + num_levels + l];
            }
        }
        free(partial);
    }
    return 0;
}
"""

# -ffp-contract=off: no fused multiply-add, so `q * s + beta` rounds exactly like the eager path.
# -fno-math-errno / -fno-trapping-math let GCC vectorise nearbyintf (it never sets errno anyway).
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]

_lock = threading.Lock()
_state: dict[str, object] = {"loaded": False, "lib": None, "reason": "not built yet"}


def _cpu_signature() -> str:
    """Model name + feature flags of this CPU: a -march=native build is only valid on a CPU like it."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _cache_dir() -> Path:
    default = Path.home() / ".cache" / "model_quantization"
    return Path(os.environ.get("MODEL_QUANTIZATION_CACHE", default))


def _compile(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE, " ".join(_CFLAGS), version, _cpu_signature()]).encode()
    ).hexdigest()
    target = _cache_dir() / f"fake_quant_cpu_{key[:20]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "fake_quant_cpu.c"
        src.write_text(SOURCE)
        built = Path(tmp) / target.name
        cmd = [compiler, *_CFLAGS, "-shared", "-fPIC", str(src), "-o", str(built), "-lm"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{result.stderr.strip()}")
        os.replace(built, target)  # atomic: a concurrent rank sees either nothing or the complete file
    return target


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.mq_lsq_forward.argtypes = [p, p, i64, i64, i64, p, p, f32, f32, i32, i32]
    lib.mq_lsq_forward.restype = None
    lib.mq_lsq_backward.argtypes = [p, p, p, i64, i64, i64, p, p, f32, f32, i32, p, p, i32]
    lib.mq_lsq_backward.restype = None
    lib.mq_clip_forward.argtypes = [p, p, i64, f32, f32, i32]
    lib.mq_clip_forward.restype = None
    lib.mq_clip_backward.argtypes = [p, p, p, i64, f32, i32]
    lib.mq_clip_backward.restype = ctypes.c_double
    lib.mq_sign_forward.argtypes = [p, p, i64, i32]
    lib.mq_sign_forward.restype = None
    lib.mq_bireal_backward.argtypes = [p, p, p, i64, i32]
    lib.mq_bireal_backward.restype = None
    lib.mq_ste_backward.argtypes = [p, p, p, i64, f32, i32]
    lib.mq_ste_backward.restype = None
    lib.mq_nearest_level.argtypes = [p, p, i64, i64, i64, p, p, i64, p, p, i32]
    lib.mq_nearest_level.restype = i32
    return lib


def _build() -> ctypes.CDLL:
    if os.environ.get("MODEL_QUANTIZATION_KERNELS", "1").strip().lower() in {"0", "false", "off", "no"}:
        raise RuntimeError("disabled by MODEL_QUANTIZATION_KERNELS")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        raise RuntimeError("no C compiler found (set CC)")
    return _bind(ctypes.CDLL(str(_compile(compiler))))


def load() -> ctypes.CDLL | None:
    """Return the compiled kernel library, building it on first use; ``None`` when unavailable.

    The first failure is reported once as a ``RuntimeWarning`` and remembered for the process.
    """
    if _state["loaded"]:
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if not _state["loaded"]:
            try:
                _state["lib"], _state["reason"] = _build(), "ok"
            except Exception as exc:  # any failure means "use the eager path", never a crash
                _state["lib"], _state["reason"] = None, f"{type(exc).__name__}: {exc}"
                warnings.warn(
                    f"model_quantization: fused CPU fake-quant kernels unavailable, using the eager "
                    f"implementation ({_state['reason']})",
                    RuntimeWarning,
                    stacklevel=2,
                )
            _state["loaded"] = True
    return _state["lib"]  # type: ignore[return-value]


def status() -> str:
    """``"ok"`` when the kernels are loaded, otherwise why not (``"not built yet"`` before first use)."""
    return str(_state["reason"])
