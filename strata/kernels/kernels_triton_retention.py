"""Chunked retention (linear attention with per-head or per-token log-decay) in Triton.

Twin of ``retention_ref`` / ``retention_chunked`` in kernels_retention.py (same
arguments, layouts and state; docs/internals.md "Kernel conventions"):

    S_t = exp(log_decay_t) S_{t-1} + k_t^T v_t,     o_t = scale * q_t S_t

Chunks of T positions (T a power of two >= 16: ``chunk_size`` is rounded up to one;
the values do not depend on it). Inside chunk c, with S_c the state entering it,

    o     = scale * [ (q k^T * E) v + (q * exp(a)) S_c ]
    S_c+1 = exp(a_T) S_c + (k * exp(b))^T v
    E_ts = exp(sum_{s<r<=t} ld_r) for s <= t (else 0),  a_t = sum_{r<=t} ld_r,  b_s = sum_{s<r<=T} ld_r

Every exponent is a sum of log-decays over a span inside one chunk, formed by a
masked cumsum over a [T, T] tile (never as a difference of running sums, which would
lose late small decays to rounding after large early ones), so none is positive.

Kernels: ``_states_fwd`` walks the chunks of one (batch, head) in order and stores S_c;
``_output_fwd`` computes every chunk's output in parallel. Backward: ``_states_bwd``
walks the chunks in reverse carrying dS (the gradient of the state leaving a chunk),
``_chunk_bwd`` gives dq, dk, dv of every chunk in parallel. The log-decay gradient
needs no kernel of its own: every exponent is G_t - G_s with G = cumsum(log_decay),
i.e. the outputs depend on G only through q_t e^{G_t}, k_s e^{-G_s} and the factor
e^{G_L} of the final state, so

    dG_t = q_t . dq_t - k_t . dk_t   (+ sum(dS_final * S_final) at t = L - 1)
    d log_decay_r = sum_{t >= r} dG_t

(a reverse cumsum, done by torch). Arithmetic is fp32 (matmuls in full fp32 precision
for fp32 inputs, tf32 for 16-bit inputs); o comes back in q's dtype, the final state in fp32.
"""

from __future__ import annotations

import torch

from strata.kernels.kernels_dispatch import check_chunk_size
from strata.kernels.kernels_dispatch import require_triton
from strata.kernels.kernels_retention import _check_retention_args

try:
    import triton
    import triton.language as tl
except ImportError:  # the models load without triton; the kernels need it
    triton = None
    tl = None


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _chunk_decays(ld_ptr, bh, c, length, BT: tl.constexpr):
    """Exponents of chunk c: E [BT, BT] (masked exp of span sums), a [BT], b [BT], a_T."""
    t = tl.arange(0, BT)
    pos = c * BT + t
    ld = tl.load(ld_ptr + bh * length + pos, mask=pos < length, other=0.0)  # padding decays by 1
    span = tl.cumsum(tl.where(t[:, None] > t[None, :], ld[:, None], 0.0), axis=0)  # [t, s]: sum_{s<r<=t}
    causal = t[:, None] >= t[None, :]
    E = tl.where(causal, tl.exp(tl.where(causal, span, 0.0)), 0.0)
    a = tl.cumsum(ld, axis=0)
    b = tl.sum(tl.where(t[:, None] == BT - 1, span, 0.0), axis=0)  # the last row of span
    a_end = tl.sum(ld, axis=0)
    return E, a, b, a_end


@_jit
def _load_tile(ptr, bh, c, length, width, BT: tl.constexpr, BW: tl.constexpr):
    """Rows c*BT .. c*BT+BT-1 of a [BH, L, width] tensor as fp32 [BT, BW] (zeros outside)."""
    t = c * BT + tl.arange(0, BT)
    w = tl.arange(0, BW)
    mask = (t < length)[:, None] & (w < width)[None, :]
    return tl.load(ptr + (bh * length + t[:, None]) * width + w[None, :], mask=mask, other=0.0).to(tl.float32)


@_jit
def _store_tile(ptr, value, bh, c, length, width, BT: tl.constexpr, BW: tl.constexpr):
    t = c * BT + tl.arange(0, BT)
    w = tl.arange(0, BW)
    mask = (t < length)[:, None] & (w < width)[None, :]
    tl.store(ptr + (bh * length + t[:, None]) * width + w[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@_jit
def _state_offsets(dk, dv, BK: tl.constexpr, BV: tl.constexpr):
    i, j = tl.arange(0, BK), tl.arange(0, BV)
    return i[:, None] * dv + j[None, :], (i < dk)[:, None] & (j < dv)[None, :]


@_jit
def _states_fwd(
    k_ptr, v_ptr, ld_ptr, s0_ptr, states_ptr, sT_ptr, length, dk, dv, n_chunks,
    HAS_S0: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    """States entering every chunk, states [BH, n_chunks, Dk, Dv], and the final state sT [BH, Dk, Dv]."""
    bh = tl.program_id(0)
    off, mask = _state_offsets(dk, dv, BK, BV)
    if HAS_S0:
        S = tl.load(s0_ptr + bh * dk * dv + off, mask=mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((BK, BV), dtype=tl.float32)
    for c in range(0, n_chunks):
        tl.store(states_ptr + (bh * n_chunks + c) * dk * dv + off, S, mask=mask)
        k = _load_tile(k_ptr, bh, c, length, dk, BT, BK)
        v = _load_tile(v_ptr, bh, c, length, dv, BT, BV)
        E, a, b, a_end = _chunk_decays(ld_ptr, bh, c, length, BT)
        S = tl.exp(a_end) * S + tl.dot(tl.trans(k * tl.exp(b)[:, None]), v, input_precision=PRECISION)
    tl.store(sT_ptr + bh * dk * dv + off, S, mask=mask)


@_jit
def _output_fwd(
    q_ptr, k_ptr, v_ptr, ld_ptr, states_ptr, o_ptr, scale, length, dk, dv, n_chunks,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    """o of chunk program_id(1): scale * [(q k^T * E) v + (q * exp(a)) S_c]."""
    bh, c = tl.program_id(0), tl.program_id(1)
    q = _load_tile(q_ptr, bh, c, length, dk, BT, BK)
    k = _load_tile(k_ptr, bh, c, length, dk, BT, BK)
    v = _load_tile(v_ptr, bh, c, length, dv, BT, BV)
    E, a, b, a_end = _chunk_decays(ld_ptr, bh, c, length, BT)
    off, mask = _state_offsets(dk, dv, BK, BV)
    S = tl.load(states_ptr + (bh * n_chunks + c) * dk * dv + off, mask=mask, other=0.0)
    A = tl.dot(q, tl.trans(k), input_precision=PRECISION) * E
    o = tl.dot(A, v, input_precision=PRECISION) + tl.dot(q * tl.exp(a)[:, None], S, input_precision=PRECISION)
    _store_tile(o_ptr, scale * o, bh, c, length, dv, BT, BV)


@_jit
def _states_bwd(
    q_ptr, do_ptr, ld_ptr, dsT_ptr, dstates_ptr, ds0_ptr, scale, length, dk, dv, n_chunks,
    HAS_DST: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    """Gradients of the state leaving every chunk, dstates [BH, n_chunks, Dk, Dv]; ds0 of the initial state.

    dS_c = exp(a_T) dS_{c+1} + scale * (q * exp(a))^T do, from dS_n = d(final state).
    """
    bh = tl.program_id(0)
    off, mask = _state_offsets(dk, dv, BK, BV)
    if HAS_DST:
        dS = tl.load(dsT_ptr + bh * dk * dv + off, mask=mask, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros((BK, BV), dtype=tl.float32)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        tl.store(dstates_ptr + (bh * n_chunks + c) * dk * dv + off, dS, mask=mask)
        q = _load_tile(q_ptr, bh, c, length, dk, BT, BK)
        do = _load_tile(do_ptr, bh, c, length, dv, BT, BV)
        E, a, b, a_end = _chunk_decays(ld_ptr, bh, c, length, BT)
        dS = tl.exp(a_end) * dS + scale * tl.dot(tl.trans(q * tl.exp(a)[:, None]), do, input_precision=PRECISION)
    tl.store(ds0_ptr + bh * dk * dv + off, dS, mask=mask)


@_jit
def _chunk_bwd(
    q_ptr, k_ptr, v_ptr, ld_ptr, do_ptr, states_ptr, dstates_ptr, dq_ptr, dk_ptr, dv_ptr, dg_ptr,
    scale, length, dk, dv, n_chunks,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    """dq, dk, dv of one chunk, and dG = q . dq - k . dk (the gradient of the cumulative log-decay)."""
    bh, c = tl.program_id(0), tl.program_id(1)
    q = _load_tile(q_ptr, bh, c, length, dk, BT, BK)
    k = _load_tile(k_ptr, bh, c, length, dk, BT, BK)
    v = _load_tile(v_ptr, bh, c, length, dv, BT, BV)
    do = _load_tile(do_ptr, bh, c, length, dv, BT, BV)
    E, a, b, a_end = _chunk_decays(ld_ptr, bh, c, length, BT)
    off, mask = _state_offsets(dk, dv, BK, BV)
    S = tl.load(states_ptr + (bh * n_chunks + c) * dk * dv + off, mask=mask, other=0.0)
    dS = tl.load(dstates_ptr + (bh * n_chunks + c) * dk * dv + off, mask=mask, other=0.0)
    A = tl.dot(q, tl.trans(k), input_precision=PRECISION) * E
    dA = scale * tl.dot(do, tl.trans(v), input_precision=PRECISION) * E
    eb = tl.exp(b)[:, None]
    d_v = scale * tl.dot(tl.trans(A), do, input_precision=PRECISION) + tl.dot(k * eb, dS, input_precision=PRECISION)
    d_q = tl.dot(dA, k, input_precision=PRECISION) + \
        scale * tl.dot(do, tl.trans(S), input_precision=PRECISION) * tl.exp(a)[:, None]
    d_k = tl.dot(tl.trans(dA), q, input_precision=PRECISION) + tl.dot(v, tl.trans(dS), input_precision=PRECISION) * eb
    _store_tile(dq_ptr, d_q, bh, c, length, dk, BT, BK)
    _store_tile(dk_ptr, d_k, bh, c, length, dk, BT, BK)
    _store_tile(dv_ptr, d_v, bh, c, length, dv, BT, BV)
    t = c * BT + tl.arange(0, BT)
    tl.store(dg_ptr + bh * length + t, tl.sum(q * d_q, axis=1) - tl.sum(k * d_k, axis=1), mask=t < length)


def _blocks(dk, dv, chunk_size):
    size = lambda n: max(16, triton.next_power_of_2(n))  # noqa: E731  (tl.dot needs >= 16)
    return size(chunk_size), size(dk), size(dv)


class _TritonRetention(torch.autograd.Function):
    """(q, k, v, log_decay [B, H, L], S0) -> (o, final state): the four kernels above."""

    @staticmethod
    def forward(ctx, q, k, v, ld, s0, scale, chunk_size):
        batch, heads, length, dk = q.shape
        dv = v.shape[-1]
        q, k, v, ld = (t.contiguous() for t in (q, k, v, ld))
        s0 = s0.contiguous() if s0 is not None else None
        BT, BK, BV = _blocks(dk, dv, chunk_size)
        n_chunks = triton.cdiv(length, BT)
        precision = "ieee" if q.dtype in (torch.float32, torch.float64) else "tf32"
        f32 = dict(dtype=torch.float32, device=q.device)
        states = torch.empty(batch * heads, n_chunks, dk, dv, **f32)
        sT = torch.empty(batch, heads, dk, dv, **f32)
        # [64, 64] fp32 tiles: 8 warps keep more of them in registers
        blocks = dict(BT=BT, BK=BK, BV=BV, PRECISION=precision, num_warps=8 if BT * max(BK, BV) >= 4096 else 4)
        _states_fwd[(batch * heads,)](k, v, ld, s0, states, sT, length, dk, dv, n_chunks,
                                      HAS_S0=s0 is not None, **blocks)
        o = torch.empty(batch, heads, length, dv, dtype=q.dtype, device=q.device)
        _output_fwd[(batch * heads, n_chunks)](q, k, v, ld, states, o, scale, length, dk, dv, n_chunks, **blocks)
        ctx.save_for_backward(q, k, v, ld, s0, states, sT)
        ctx.scale, ctx.blocks = scale, blocks
        return o, sT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dsT):
        q, k, v, ld, s0, states, sT = ctx.saved_tensors
        batch, heads, length, dk = q.shape
        dv = v.shape[-1]
        n_chunks = states.shape[1]
        f32 = dict(dtype=torch.float32, device=q.device)
        do = torch.zeros(batch, heads, length, dv, **f32) if do is None else do.contiguous()
        dsT = dsT.contiguous() if dsT is not None else None
        dstates = torch.empty_like(states)
        ds0 = torch.empty(batch, heads, dk, dv, **f32)
        _states_bwd[(batch * heads,)](q, do, ld, dsT, dstates, ds0, ctx.scale, length, dk, dv, n_chunks,
                                      HAS_DST=dsT is not None, **ctx.blocks)
        dq, dk_ = torch.empty(batch, heads, length, dk, **f32), torch.empty(batch, heads, length, dk, **f32)
        dv_ = torch.empty(batch, heads, length, dv, **f32)
        dg = torch.empty(batch, heads, length, **f32)
        _chunk_bwd[(batch * heads, n_chunks)](q, k, v, ld, do, states, dstates, dq, dk_, dv_, dg,
                                              ctx.scale, length, dk, dv, n_chunks, **ctx.blocks)
        if dsT is not None:  # the final state carries e^{G_L}
            dg[:, :, -1] += (dsT * sT).sum((-2, -1))
        dld = dg.flip(-1).cumsum(-1).flip(-1)
        return (dq.to(q.dtype), dk_.to(k.dtype), dv_.to(v.dtype), dld.to(ld.dtype),
                ds0.to(s0.dtype) if s0 is not None else None, None, None)


def retention_triton(q, k, v, log_decay, initial_state=None, scale=1.0, return_final_state=False, chunk_size=64):
    """Triton chunked retention; same contract as ``retention_ref``.

    ``log_decay`` [H] (per head) or [B, H, L] (per token); ``chunk_size`` is rounded up
    to a power of two >= 16. Log-decays must be finite (use a large negative value such
    as -1e4 for a full reset).
    """
    op = "retention_triton"
    _check_retention_args(op, q, k, v, log_decay, initial_state)
    check_chunk_size(op, chunk_size)
    require_triton(op, q.device)
    batch, heads, length, _ = q.shape
    ld = log_decay.float()
    if ld.dim() == 1:
        ld = ld[None, :, None].expand(batch, heads, length)
    s0 = initial_state.float() if initial_state is not None else None
    o, sT = _TritonRetention.apply(q, k, v, ld, s0, float(scale), chunk_size)
    return (o, sT) if return_final_state else o
