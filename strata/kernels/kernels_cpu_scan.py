"""Selective scan on CPU as a compiled C kernel: the plain recurrence, vectorised across channels.

The chunked PyTorch form (kernels_selective_scan.py) turns the scan into ~10 full passes
over [B, D, N, chunk] tensors per chunk, and its backward recomputes them all. The
recurrence itself needs one pass: per position t and state n,

    a = exp(dt_t A_n);  h_n = a h_n + dtx_t B_tn;  y_t += C_tn h_n

with the state held in registers. This kernel runs exactly that, 16 channels at a time
(one AVX-512 register of fp32, two of AVX2): B and C are shared by every channel, so
each step is a handful of vector instructions, and the only memory traffic is the
inputs and outputs. The backward pass walks the positions in reverse, recomputing each
chunk of ``T`` positions from the state saved at its start (memory O(B D N L / T)),
with the adjoint state ``gh`` in registers; the gradients of B and C (sums over the
channels) go to one partial buffer per work item, which PyTorch reduces afterwards.

It is written in C, compiled on first use with the system C compiler (``cc -O3
-march=native -ffast-math -fopenmp``, linked without fast-math; about a second, cached
under ``$STRATA_CACHE`` or ``~/.cache/strata``) and called through ctypes: no PyTorch
headers, so no C++ build of minutes and no ABI coupling to the installed torch. The
source lives in this module so that a saved model's code bundle carries it. It is opt-in
(``kernel_backend="cpu"``; docs/kernels.md says why it is not the default). Where no
compiler works, ``available()`` is False and asking for it is an error. The tests hold
values and gradients to ``selective_scan_ref``.

Same contract as ``selective_scan_chunked``: fp32 arithmetic, fp64 when an input is fp64
(the source is instantiated for both).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from strata.kernels.kernels_selective_scan import scan_epilogue
from strata.kernels.kernels_selective_scan import scan_prologue

logger = logging.getLogger("strata.kernels")

LANES = 16  # channels per vector; D is padded to a multiple of it

_BODY = r"""
/* Selective scan (Mamba-1), channels-last: see kernels_cpu_scan.py.
 *
 * Layouts (row-major): dt, dtx, y, gy, gdt, gdtx [batch, L, D]; Bm, Cm [batch, L, N];
 * A, gA [N, D] (gA: [batch, N, D], summed over the batch by the caller); h0, hT, ghT,
 * gh0 [batch, N, D]; ck [batch, nck, N, D], the state entering every chunk of T
 * positions; gBp, gCp [batch, nsplit, L, N, LANES], partial sums over channels.
 * D is a multiple of LANES. Work items: (batch row, group of LANES channels).
 * Instantiated for fp32 and fp64 (`real`, EXP, FN below). */
void FN(scan_forward)(int64_t batch, int64_t L, int64_t D, int64_t N, int64_t T,
                      const real *dt, const real *dtx, const real *A, const real *Bm,
                      const real *Cm, const real *h0, real *y, real *hT, real *ck,
                      int nthreads)
{
    const int64_t nblk = D / LANES, nck = (L + T - 1) / T;
    #pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t blk = 0; blk < nblk; blk++) {
            const int64_t d0 = blk * LANES;
            real (*h)[LANES] = malloc(N * sizeof *h);
            for (int64_t n = 0; n < N; n++)
                memcpy(h[n], h0 + (b * N + n) * D + d0, sizeof h[n]);
            for (int64_t t = 0; t < L; t++) {
                if (ck && t % T == 0)
                    for (int64_t n = 0; n < N; n++)
                        memcpy(ck + ((b * nck + t / T) * N + n) * D + d0, h[n], sizeof h[n]);
                const int64_t row = b * L + t;
                const real *dtv = dt + row * D + d0, *xv = dtx + row * D + d0;
                const real *Bt = Bm + row * N, *Ct = Cm + row * N;
                real acc[LANES] = {0};
                for (int64_t n = 0; n < N; n++) {
                    const real *An = A + n * D + d0;
                    const real bn = Bt[n], cn = Ct[n];
                    #pragma omp simd
                    for (int l = 0; l < LANES; l++) {
                        h[n][l] = EXP(dtv[l] * An[l]) * h[n][l] + xv[l] * bn;
                        acc[l] += h[n][l] * cn;
                    }
                }
                memcpy(y + row * D + d0, acc, sizeof acc);
            }
            for (int64_t n = 0; n < N; n++)
                memcpy(hT + (b * N + n) * D + d0, h[n], sizeof h[n]);
            free(h);
        }
    }
}

void FN(scan_backward)(int64_t batch, int64_t L, int64_t D, int64_t N, int64_t T, int64_t nsplit,
                       const real *dt, const real *dtx, const real *A, const real *Bm,
                       const real *Cm, const real *ck, const real *gy, const real *ghT,
                       real *gdt, real *gdtx, real *gA, real *gBp, real *gCp, real *gh0,
                       int nthreads)
{
    const int64_t nblk = D / LANES, nck = (L + T - 1) / T;
    const int64_t per_split = (nblk + nsplit - 1) / nsplit;
    #pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t s = 0; s < nsplit; s++) {
            real *gBs = gBp + (b * nsplit + s) * L * N * LANES;
            real *gCs = gCp + (b * nsplit + s) * L * N * LANES;
            /* hs[j + 1] = the state after position t0 + j, as[j] = its decay exp(dt A);
               gh = the adjoint state dL/dh, gAacc = this channel group's dL/dA */
            real (*hs)[N][LANES] = malloc((T + 1) * sizeof *hs);
            real (*as)[N][LANES] = malloc(T * sizeof *as);
            real (*gh)[LANES] = malloc(N * sizeof *gh), (*gAacc)[LANES] = malloc(N * sizeof *gAacc);
            const int64_t blk_end = (s + 1) * per_split < nblk ? (s + 1) * per_split : nblk;
            for (int64_t blk = s * per_split; blk < blk_end; blk++) {
                const int64_t d0 = blk * LANES;
                for (int64_t n = 0; n < N; n++)
                    memcpy(gh[n], ghT + (b * N + n) * D + d0, sizeof gh[n]);
                memset(gAacc, 0, N * sizeof *gAacc);
                for (int64_t c = nck - 1; c >= 0; c--) {
                    const int64_t t0 = c * T, t1 = t0 + T < L ? t0 + T : L;
                    for (int64_t n = 0; n < N; n++)
                        memcpy(hs[0][n], ck + ((b * nck + c) * N + n) * D + d0, sizeof hs[0][n]);
                    for (int64_t t = t0; t < t1; t++) {  /* recompute the chunk's states */
                        const int64_t j = t - t0, row = b * L + t;
                        const real *dtv = dt + row * D + d0, *xv = dtx + row * D + d0;
                        const real *Bt = Bm + row * N;
                        for (int64_t n = 0; n < N; n++) {
                            const real *An = A + n * D + d0;
                            const real bn = Bt[n];
                            #pragma omp simd
                            for (int l = 0; l < LANES; l++) {
                                as[j][n][l] = EXP(dtv[l] * An[l]);
                                hs[j + 1][n][l] = as[j][n][l] * hs[j][n][l] + xv[l] * bn;
                            }
                        }
                    }
                    for (int64_t t = t1 - 1; t >= t0; t--) {  /* and walk them back */
                        const int64_t j = t - t0, row = b * L + t;
                        const real *dtv = dt + row * D + d0, *xv = dtx + row * D + d0;
                        const real *gyv = gy + row * D + d0;
                        const real *Bt = Bm + row * N, *Ct = Cm + row * N;
                        real gdt_acc[LANES] = {0}, gdtx_acc[LANES] = {0};
                        for (int64_t n = 0; n < N; n++) {
                            const real *An = A + n * D + d0;
                            const real bn = Bt[n], cn = Ct[n];
                            real *gBtn = gBs + (t * N + n) * LANES, *gCtn = gCs + (t * N + n) * LANES;
                            #pragma omp simd
                            for (int l = 0; l < LANES; l++) {
                                gh[n][l] += cn * gyv[l];                   /* dL/dh_t */
                                gCtn[l] += hs[j + 1][n][l] * gyv[l];
                                gBtn[l] += gh[n][l] * xv[l];
                                gdtx_acc[l] += gh[n][l] * bn;
                                const real ge = gh[n][l] * as[j][n][l] * hs[j][n][l];  /* of dt A */
                                gdt_acc[l] += ge * An[l];
                                gAacc[n][l] += ge * dtv[l];
                                gh[n][l] *= as[j][n][l];                   /* dL/dh_{t-1}, so far */
                            }
                        }
                        memcpy(gdt + row * D + d0, gdt_acc, sizeof gdt_acc);
                        memcpy(gdtx + row * D + d0, gdtx_acc, sizeof gdtx_acc);
                    }
                }
                for (int64_t n = 0; n < N; n++) {
                    memcpy(gh0 + (b * N + n) * D + d0, gh[n], sizeof gh[n]);
                    memcpy(gA + (b * N + n) * D + d0, gAacc[n], sizeof gAacc[n]);
                }
            }
            free(hs); free(as); free(gh); free(gAacc);
        }
    }
}
"""

_SOURCE = "\n".join([
    "#include <math.h>", "#include <stdint.h>", "#include <stdlib.h>", "#include <string.h>", "#define LANES 16",
    "#define real float", "#define EXP expf", "#define FN(name) name##_f32", _BODY,
    "#undef real", "#undef EXP", "#undef FN",
    "#define real double", "#define EXP exp", "#define FN(name) name##_f64", _BODY,
])

# -ffast-math only when compiling: linking with it (gcc < 13) adds crtfastmath.o, whose
# constructor sets flush-to-zero / denormals-are-zero for the whole process on load.
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC"]
_LINK_FLAGS = ["-shared", "-fopenmp"]
_lock = threading.Lock()
_library = None  # the loaded ctypes library, or False once building it failed


def _cache_dir() -> Path:
    root = os.environ.get("STRATA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "strata")
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    try:  # -march=native: a library built for one CPU may not run on another
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor()


def _compiler() -> str:
    return os.environ.get("CC", "cc")


def _build() -> Path:
    """Compile the source (once per source, flags, compiler and CPU); return the library path."""
    cc = _compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([_SOURCE, " ".join(_FLAGS + _LINK_FLAGS), version, _cpu_signature()]).encode())
    key = key.hexdigest()[:16]
    target = _cache_dir() / f"selective_scan_cpu_{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source = Path(tmp) / "selective_scan_cpu.c"
        source.write_text(_SOURCE, encoding="utf-8")
        built, obj = Path(tmp) / target.name, Path(tmp) / "selective_scan_cpu.o"
        subprocess.run([cc, *_FLAGS, "-c", str(source), "-o", str(obj)], capture_output=True, text=True, check=True)
        subprocess.run([cc, *_LINK_FLAGS, str(obj), "-o", str(built), "-lm"], capture_output=True, text=True, check=True)
        os.replace(built, target)  # atomic: concurrent builders (pytest-xdist) race harmlessly
    return target


def _load():
    global _library
    with _lock:
        if _library is None:
            try:
                lib = ctypes.CDLL(str(_build()))
            except (OSError, subprocess.CalledProcessError) as err:  # no compiler, a failed build or load
                detail = getattr(err, "stderr", "") or err
                logger.warning("selective_scan: the compiled CPU kernel is unavailable (%s); "
                               "use the chunked PyTorch form ('torch')", str(detail).strip()[:500])
                _library = False
            else:
                i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
                for suffix in ("f32", "f64"):
                    forward, backward = getattr(lib, f"scan_forward_{suffix}"), getattr(lib, f"scan_backward_{suffix}")
                    forward.argtypes = [i64] * 5 + [ptr] * 9 + [cint]
                    backward.argtypes = [i64] * 6 + [ptr] * 14 + [cint]
                    forward.restype = backward.restype = None
                _library = lib
        return _library


def available() -> bool:
    """Whether the compiled kernel builds and loads here (builds it on the first call)."""
    return bool(_load())


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def _function(name: str, dtype: torch.dtype):
    return getattr(_load(), f"{name}_{_SUFFIX[dtype]}")


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _lanes_last(t: torch.Tensor, pad: int) -> torch.Tensor:
    """[batch, D, X] -> contiguous [batch, X, D + pad] (zeros in the padding)."""
    t = t.transpose(1, 2)
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return t.contiguous()


class _CompiledScan(torch.autograd.Function):
    """(dtx, dt, A, B, C, h0) -> (y [B, D, L] without the D skip and gate, final state)."""

    @staticmethod
    def forward(ctx, dtx, dt, A, B, C, h0, chunk_size):
        batch, dim, length = dt.shape
        n = A.shape[1]
        pad = -dim % LANES
        width = dim + pad
        T = min(chunk_size, length)
        nck = -(-length // T)
        dt_, dtx_ = _lanes_last(dt, pad), _lanes_last(dtx, pad)
        A_ = _lanes_last(A[None], pad)[0]  # [N, D']
        B_, C_ = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()  # [batch, L, N]
        h0_ = _lanes_last(h0, pad)  # [batch, N, D']
        y = dt_.new_empty(batch, length, width)
        hT = dt_.new_empty(batch, n, width)
        need_grad = any(ctx.needs_input_grad[:6])
        ck = dt_.new_empty(batch, nck, n, width) if need_grad else None
        _function("scan_forward", dt.dtype)(
            batch, length, width, n, T, _ptr(dt_), _ptr(dtx_), _ptr(A_), _ptr(B_), _ptr(C_), _ptr(h0_),
            _ptr(y), _ptr(hT), _ptr(ck), torch.get_num_threads(),
        )
        if need_grad:
            ctx.save_for_backward(dt_, dtx_, A_, B_, C_, ck)
            ctx.dim, ctx.T = dim, T
        return y[:, :, :dim].transpose(1, 2), hT[:, :, :dim].transpose(1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gh):
        dt_, dtx_, A_, B_, C_, ck = ctx.saved_tensors
        batch, length, width = dt_.shape
        n, dim = A_.shape[0], ctx.dim
        pad = width - dim
        threads = torch.get_num_threads()
        # enough work items (batch rows x channel splits) for every thread, twice over
        nsplit = max(1, min(width // LANES, -(-2 * threads // batch)))
        gy_ = _lanes_last(gy, pad) if gy is not None else dt_.new_zeros(batch, length, width)
        gh_ = _lanes_last(gh, pad) if gh is not None else dt_.new_zeros(batch, n, width)
        gdt, gdtx = torch.empty_like(dt_), torch.empty_like(dtx_)
        gA = dt_.new_empty(batch, n, width)
        gBp = dt_.new_zeros(batch, nsplit, length, n, LANES)
        gCp = torch.zeros_like(gBp)
        gh0 = dt_.new_empty(batch, n, width)
        _function("scan_backward", dt_.dtype)(
            batch, length, width, n, ctx.T, nsplit, _ptr(dt_), _ptr(dtx_), _ptr(A_), _ptr(B_), _ptr(C_), _ptr(ck),
            _ptr(gy_), _ptr(gh_), _ptr(gdt), _ptr(gdtx), _ptr(gA), _ptr(gBp), _ptr(gCp), _ptr(gh0), threads,
        )

        def channels(t):  # [batch, X, D'] -> [batch, D, X]
            return t[..., :dim].transpose(1, 2)

        gB = gBp.sum((1, 4)).transpose(1, 2)  # [batch, N, L]
        gC = gCp.sum((1, 4)).transpose(1, 2)
        return channels(gdtx), channels(gdt), gA.sum(0)[:, :dim].t(), gB, gC, channels(gh0), None


def selective_scan_cpu(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
    initial_state=None, return_final_state=False, chunk_size=64,
):
    """Selective scan by the compiled C kernel; same contract as ``selective_scan_chunked``.

    ``chunk_size`` is the checkpoint interval of the backward pass.
    """
    op = "selective_scan_cpu"
    if not available():
        raise RuntimeError(f"{op}: the compiled CPU kernel could not be built here (see the log); "
                           "use the 'torch' backend")
    x, dt, A, B, C, h0 = scan_prologue(op, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_size)
    if x.device.type != "cpu":
        raise ValueError(f"{op}: runs on CPU tensors, got {x.device} tensors; use the 'triton' or 'torch' backend")
    y, h = _CompiledScan.apply(dt * x, dt, A, B, C, h0, chunk_size)
    return scan_epilogue(y, h, x, u, D, z, return_final_state)
