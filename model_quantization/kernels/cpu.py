"""Fused CPU fake-quant kernels: plain C + OpenMP, compiled lazily with the system C compiler, loaded by ctypes.

Why C through ctypes rather than a torch C++ extension: the kernels only need raw float pointers, and a C
file without torch headers or pybind11 compiles in well under a second, so the first test run on a fresh
machine does not pay a minute of C++ compilation. The shared object links ``libgomp.so.1``, which resolves
to the copy torch already loaded, so both share one OpenMP runtime and respect ``torch.set_num_threads``
(the thread count is passed on every call).

The kernels implement exactly the same operation sequence as the eager path in
:mod:`model_quantization.functional` (true division, clamp, round-half-to-even, multiply), so outputs and
input gradients are bit-identical; only the order of the step-gradient summation differs (the kernels
accumulate in double precision).

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
