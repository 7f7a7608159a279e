"""Selective scan (Mamba-1) and its one-token state update as Triton kernels.

Twin of ``selective_scan_ref`` / ``selective_state_update`` in kernels_selective_scan.py
(same arguments, layouts and state; docs/internals.md "Kernel conventions"):

    dt = softplus(delta + delta_bias)
    h_t = exp(dt_t A) * h_{t-1} + dt_t B_t u_t,    y_t = C_t . h_t + D u_t,    y *= silu(z)

Design. One program owns BLOCK_D channels of one sequence and walks it chunk by chunk
(T positions), carrying the state h [BLOCK_D, N]. Inside a chunk the recurrence
h_t = a_t h_{t-1} + b_t (a = exp(dt A), b = dt u B) is an associative scan over
(a, b) pairs, (a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2), over a [BLOCK_D, N, T]
tile: T positions in parallel, only products of decays <= 1 (no overflow however
steep the decays, unlike exp(-cumsum) forms). Nothing of size [B, D, N, L] is written;
the forward pass stores the state entering every chunk (a checkpoint,
[B, D, L / T, N]). The backward pass walks the chunks in reverse, carrying G, the
gradient of the state leaving the chunk. From the checkpoint it rebuilds h_t and
h_{t-1} (a second scan over the inputs shifted by one position), then the adjoint
state by a reverse scan, g_h_t = gy_t C_t + exp(dt_{t+1} A) g_h_{t+1} (+ G at the
chunk's end), and from it, all elementwise or reduced over one axis of the tile:

    g_C_t = sum_d gy_t h_t,   g_B_t = sum_d g_h dt_t u_t
    g_dt  = sum_n g_h (h_{t-1} e^{dt A} A + B_t u_t),   g_A += g_h h_{t-1} e^{dt A} dt_t
    G     <- e^{dt_0 A} g_h_0     (gy: gradient of y before the skip, after the gate)

Sums over channels (g_B, g_C) and over the batch (g_A, g_D, g_delta_bias) are written
per program and added up by torch afterwards (deterministic, no atomics).

Arithmetic is fp32 whatever the input dtype; y comes back in u's dtype and the final
state in fp32 (fp64 inputs are computed in fp32 too: use the torch form for fp64).
Importing this module never needs triton; calling a kernel does.
"""

from __future__ import annotations

import torch

from strata.kernels.kernels_dispatch import check_chunk_size
from strata.kernels.kernels_dispatch import require_triton
from strata.kernels.kernels_selective_scan import _check_scan_args

try:
    import triton
    import triton.language as tl
except ImportError:  # the models load without triton; the kernels need it
    triton = None
    tl = None

# Channels per program, and the longest chunk: a program holds a few [BLOCK_D, N, T]
# fp32 tiles (T = chunk_size rounded up to a power of two, at most MAX_CHUNK) in registers.
BLOCK_D = 4
MAX_CHUNK = 32


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _softplus(x):
    # torch.nn.functional.softplus with its threshold 20
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@_jit
def _combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@_jit
def _load_tile(ptr, rows, row_mask, pos, length):
    """fp32 [R, T] tile of a [.., L] tensor: rows (row start offsets) x positions pos (zeros outside [0, L))."""
    mask = row_mask[:, None] & ((pos >= 0) & (pos < length))[None, :]
    return tl.load(ptr + rows[:, None] + pos[None, :], mask=mask, other=0.0).to(tl.float32)


@_jit
def _step_terms(u_ptr, delta_ptr, B_ptr, bias, A, seq, bc, md, mn, pos, lo, hi, length,
                HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """dA = exp(dt A) and dBu = dt u B [BD, BN, T] at positions pos; identity (1, 0) outside [lo, hi)."""
    live = (pos >= lo) & (pos < hi) & (pos < length)
    u = _load_tile(u_ptr, seq, md, pos, length)
    dl = _load_tile(delta_ptr, seq, md, pos, length)
    if HAS_BIAS:
        dl = dl + bias[:, None]
    dt = dl
    if SOFTPLUS:
        dt = _softplus(dl)
    dt = tl.where(md[:, None] & live[None, :], dt, 0.0)
    Bt = _load_tile(B_ptr, bc, mn, pos, length)
    dA = tl.exp(dt[:, None, :] * A[:, :, None])
    dBu = (dt * u)[:, None, :] * Bt[None, :, :]
    return dA, dBu, u, dl, dt, Bt


@_jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    y_ptr, hT_ptr, ckpt_ptr,
    dim, length, nstate, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Forward of ``selective_scan_ref`` for BLOCK_D channels of one sequence, T positions at a time.

    u, delta, z, y [B, D, L]; A [D, N]; B, C [B, N, L]; D, bias [D]; h0, hT [B, D, N];
    ckpt [B, D, n_chunks, N] receives the state entering every chunk.
    """
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    t = tl.arange(0, T)
    md, mn = d < dim, n < nstate
    mdn = md[:, None] & mn[None, :]
    A = tl.load(A_ptr + d[:, None] * nstate + n[None, :], mask=mdn, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=md, other=0.0).to(tl.float32)
    state_off = (b * dim + d[:, None]) * nstate + n[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + state_off, mask=mdn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    seq = (b * dim + d) * length  # row starts in [B, D, L]
    bc = (b * nstate + n) * length  # row starts in [B, N, L]
    ckpt_off = ((b * dim + d[:, None]) * n_chunks) * nstate + n[None, :]
    for c in range(0, n_chunks):
        tl.store(ckpt_ptr + ckpt_off + c * nstate, h, mask=mdn)
        pos = c * T + t
        dA, dBu, u, dl, dt, Bt = _step_terms(u_ptr, delta_ptr, B_ptr, bias, A, seq, bc, md, mn, pos, c * T,
                                             c * T + T, length, HAS_BIAS, SOFTPLUS)
        decay, local = tl.associative_scan((dA, dBu), axis=2, combine_fn=_combine)
        hs = local + decay * h[:, :, None]  # h_t for every t of the chunk
        Ct = _load_tile(C_ptr, bc, mn, pos, length)
        y = tl.sum(hs * Ct[None, :, :], axis=1)  # [BD, T]
        if HAS_D:
            y += tl.load(D_ptr + d, mask=md, other=0.0).to(tl.float32)[:, None] * u
        if HAS_Z:
            z = _load_tile(z_ptr, seq, md, pos, length)
            y = y * z * tl.sigmoid(z)
        mask = md[:, None] & (pos < length)[None, :]
        tl.store(y_ptr + seq[:, None] + pos[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
        h = tl.sum(tl.where((t == T - 1)[None, None, :], hs, 0.0), axis=2)  # past L the state stays put
    tl.store(hT_ptr + state_off, h, mask=mdn)


@_jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    ckpt_ptr, gy_ptr, ghT_ptr,
    gu_ptr, gdelta_ptr, gz_ptr, gA_ptr, gB_ptr, gC_ptr, gD_ptr, gbias_ptr, gh0_ptr,
    batch, dim, length, nstate, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_GHT: tl.constexpr, T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Backward of ``selective_scan_ref`` (see the module docstring) for BLOCK_D channels.

    Chunks in reverse, carrying G = dL/d(state leaving the chunk). Per chunk: the states
    h_t and h_{t-1} come from two scans started at the checkpoint (the second over the
    inputs shifted by one position), the adjoint g_h from a reverse scan. Writes gu,
    gdelta, gz [B, D, L], gh0 [B, D, N]; per-program partial sums gA [B, D, N], gD,
    gbias [B, D], gB, gC [n_dblocks, B, N, L] (summed by torch).
    """
    b = tl.program_id(0)
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    t = tl.arange(0, T)
    md, mn = d < dim, n < nstate
    mdn = md[:, None] & mn[None, :]
    A = tl.load(A_ptr + d[:, None] * nstate + n[None, :], mask=mdn, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=md, other=0.0).to(tl.float32)
    Dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=md, other=0.0).to(tl.float32)
    state_off = (b * dim + d[:, None]) * nstate + n[None, :]
    if HAS_GHT:
        G = tl.load(ghT_ptr + state_off, mask=mdn, other=0.0).to(tl.float32)
    else:
        G = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    gA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    gD = tl.zeros((BLOCK_D,), dtype=tl.float32)
    gbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    seq = (b * dim + d) * length
    bc = (b * nstate + n) * length
    part = (pid_d * batch + b) * nstate * length  # start of this program's partial gB, gC [N, L]
    ckpt_off = ((b * dim + d[:, None]) * n_chunks) * nstate + n[None, :]
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        lo, hi = c * T, c * T + T
        pos = lo + t
        live = md[:, None] & (pos < length)[None, :]
        h_in = tl.load(ckpt_ptr + ckpt_off + c * nstate, mask=mdn, other=0.0)
        dA, dBu, u, dl, dt, Bt = _step_terms(u_ptr, delta_ptr, B_ptr, bias, A, seq, bc, md, mn, pos, lo, hi,
                                             length, HAS_BIAS, SOFTPLUS)
        decay, local = tl.associative_scan((dA, dBu), axis=2, combine_fn=_combine)
        hs = local + decay * h_in[:, :, None]  # h_t
        pA, pBu, _u, _dl, _dt, _B = _step_terms(u_ptr, delta_ptr, B_ptr, bias, A, seq, bc, md, mn, pos - 1, lo, hi,
                                                length, HAS_BIAS, SOFTPLUS)
        decay, local = tl.associative_scan((pA, pBu), axis=2, combine_fn=_combine)
        hs_prev = local + decay * h_in[:, :, None]  # h_{t-1} (h_in at the chunk's first position)
        nA, _nBu, _u, _dl, _dt, _B = _step_terms(u_ptr, delta_ptr, B_ptr, bias, A, seq, bc, md, mn, pos + 1, lo, hi,
                                                 length, HAS_BIAS, SOFTPLUS)
        Ct = _load_tile(C_ptr, bc, mn, pos, length)
        gy = _load_tile(gy_ptr, seq, md, pos, length)
        if HAS_Z:
            z = _load_tile(z_ptr, seq, md, pos, length)
            sz = tl.sigmoid(z)
            y = tl.sum(hs * Ct[None, :, :], axis=1) + Dv[:, None] * u
            tl.store(gz_ptr + seq[:, None] + pos[None, :], gy * y * sz * (1.0 + z * (1.0 - sz)), mask=live)
            gy = gy * z * sz
        # adjoint: g_h_t = gy_t C_t + exp(dt_{t+1} A) g_h_{t+1}, g_h at the chunk's end + G
        rev, local = tl.associative_scan((nA, gy[:, None, :] * Ct[None, :, :]), axis=2, combine_fn=_combine,
                                         reverse=True)
        gh = local + rev * G[:, :, None]
        g_exp = gh * hs_prev * dA  # gradient of the exponent dt * A
        gBu = tl.sum(gh * Bt[None, :, :], axis=1)  # [BD, T]
        gdt = tl.sum(g_exp * A[:, :, None], axis=1) + gBu * u
        gA += tl.sum(g_exp * dt[:, None, :], axis=2)
        gD += tl.sum(gy * u, axis=1)
        nt = (pos < length)[None, :]
        tl.store(gB_ptr + part + n[:, None] * length + pos[None, :], tl.sum(gh * (dt * u)[:, None, :], axis=0),
                 mask=mn[:, None] & nt)
        tl.store(gC_ptr + part + n[:, None] * length + pos[None, :], tl.sum(gy[:, None, :] * hs, axis=0),
                 mask=mn[:, None] & nt)
        if SOFTPLUS:
            gdt = gdt * tl.sigmoid(dl)
        gdt = tl.where(live, gdt, 0.0)
        gbias += tl.sum(gdt, axis=1)
        tl.store(gu_ptr + seq[:, None] + pos[None, :], gy * Dv[:, None] + gBu * dt, mask=live)
        tl.store(gdelta_ptr + seq[:, None] + pos[None, :], gdt, mask=live)
        G = tl.sum(tl.where((t == 0)[None, None, :], gh * dA, 0.0), axis=2)  # dL/dh_in
    tl.store(gh0_ptr + state_off, G, mask=mdn)
    tl.store(gA_ptr + state_off, gA, mask=mdn)
    tl.store(gD_ptr + b * dim + d, gD, mask=md)
    tl.store(gbias_ptr + b * dim + d, gbias, mask=md)


@_jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, new_state_ptr,
    dim, nstate,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One token of ``selective_state_update``: state [B, D, N]; x, dt, z, y [B, D]; B, C [B, N]."""
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    md, mn = d < dim, n < nstate
    mdn = md[:, None] & mn[None, :]
    state_off = (b * dim + d[:, None]) * nstate + n[None, :]
    h = tl.load(state_ptr + state_off, mask=mdn, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + d[:, None] * nstate + n[None, :], mask=mdn, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b * dim + d, mask=md, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * dim + d, mask=md, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt = dt + tl.load(bias_ptr + d, mask=md, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    Bt = tl.load(B_ptr + b * nstate + n, mask=mn, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + b * nstate + n, mask=mn, other=0.0).to(tl.float32)
    h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bt[None, :]
    y = tl.sum(h * Ct[None, :], axis=1)
    if HAS_D:
        y += tl.load(D_ptr + d, mask=md, other=0.0).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(z_ptr + b * dim + d, mask=md, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(y_ptr + b * dim + d, y.to(y_ptr.dtype.element_ty), mask=md)
    tl.store(new_state_ptr + state_off, h, mask=mdn)


def _contiguous(t):
    return None if t is None else t.contiguous()


class _TritonScan(torch.autograd.Function):
    """(u, delta, A, B, C, D, z, delta_bias, h0) -> (y, final state): the two kernels above."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, softplus, chunk_size):
        u, delta, A, B, C, D, z, delta_bias, h0 = map(_contiguous, (u, delta, A, B, C, D, z, delta_bias, h0))
        batch, dim, length = u.shape
        nstate = A.shape[1]
        chunk = min(triton.next_power_of_2(chunk_size), MAX_CHUNK)
        n_chunks = triton.cdiv(length, chunk)
        y = torch.empty_like(u)
        hT = torch.empty(batch, dim, nstate, dtype=torch.float32, device=u.device)
        ckpt = torch.empty(batch, dim, n_chunks, nstate, dtype=torch.float32, device=u.device)
        grid = (batch, triton.cdiv(dim, BLOCK_D))
        _scan_fwd_kernel[grid](
            u, delta, A, B, C, D, z, delta_bias, h0, y, hT, ckpt,
            dim, length, nstate, n_chunks,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus),
            HAS_H0=h0 is not None, T=chunk, BLOCK_D=BLOCK_D, BLOCK_N=triton.next_power_of_2(nstate),
        )
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h0, ckpt)
        ctx.softplus, ctx.chunk = bool(softplus), chunk
        return y, hT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, ghT):
        u, delta, A, B, C, D, z, delta_bias, h0, ckpt = ctx.saved_tensors
        batch, dim, length = u.shape
        nstate, chunk = A.shape[1], ctx.chunk
        n_chunks, n_dblocks = ckpt.shape[2], triton.cdiv(dim, BLOCK_D)
        f32 = dict(dtype=torch.float32, device=u.device)
        gy = torch.zeros_like(u) if gy is None else gy.contiguous()
        gu, gdelta = torch.empty(batch, dim, length, **f32), torch.empty(batch, dim, length, **f32)
        gz = torch.empty(batch, dim, length, **f32) if z is not None else None
        gA, gh0 = torch.empty(batch, dim, nstate, **f32), torch.empty(batch, dim, nstate, **f32)
        gB = torch.empty(n_dblocks, batch, nstate, length, **f32)
        gC = torch.empty(n_dblocks, batch, nstate, length, **f32)
        gD, gbias = torch.empty(batch, dim, **f32), torch.empty(batch, dim, **f32)
        _scan_bwd_kernel[(batch, n_dblocks)](
            u, delta, A, B, C, D, z, delta_bias, ckpt, gy, _contiguous(ghT),
            gu, gdelta, gz, gA, gB, gC, gD, gbias, gh0,
            batch, dim, length, nstate, n_chunks,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=ctx.softplus,
            HAS_GHT=ghT is not None, T=chunk, BLOCK_D=BLOCK_D, BLOCK_N=triton.next_power_of_2(nstate),
        )
        return (
            gu.to(u.dtype), gdelta.to(delta.dtype), gA.sum(0).to(A.dtype), gB.sum(0).to(B.dtype),
            gC.sum(0).to(C.dtype), gD.sum(0).to(D.dtype) if D is not None else None,
            gz.to(z.dtype) if z is not None else None,
            gbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None,
            gh0.to(h0.dtype) if h0 is not None else None, None, None,
        )


def selective_scan_triton(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
    initial_state=None, return_final_state=False, chunk_size=64,
):
    """Triton selective scan; same contract as ``selective_scan_ref``.

    ``chunk_size``, rounded up to a power of two and capped at ``MAX_CHUNK``, is the
    chunk length T (checkpoints: B*D*N*L/T fp32 values); results do not depend on it.
    """
    op = "selective_scan_triton"
    _check_scan_args(op, u, delta, A, B, C, D, z, delta_bias, initial_state)
    check_chunk_size(op, chunk_size)
    require_triton(op, u.device)
    h0 = initial_state.float() if initial_state is not None else None
    y, h = _TritonScan.apply(u, delta, A, B, C, D, z, delta_bias, h0, delta_softplus, chunk_size)
    return (y, h) if return_final_state else y


def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True):
    """Triton twin of ``selective_state_update`` (one token); returns (y, new_state).

    Without gradients one fused kernel; when an input needs a gradient the step runs as
    a one-position ``selective_scan_triton`` (same values, with a backward pass).
    """
    op = "selective_state_update_triton"
    _check_scan_args(op, x[:, :, None], dt[:, :, None], A, B[:, :, None], C[:, :, None], D,
                     z[:, :, None] if z is not None else None, dt_bias, state)
    require_triton(op, x.device)
    inputs = (state, x, dt, A, B, C, D, z, dt_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        y, new_state = selective_scan_triton(
            x[:, :, None], dt[:, :, None], A, B[:, :, None], C[:, :, None], D,
            z[:, :, None] if z is not None else None, dt_bias, dt_softplus,
            initial_state=state, return_final_state=True, chunk_size=1,
        )
        return y[:, :, 0], new_state
    batch, dim = x.shape
    nstate = A.shape[1]
    state, x, dt, A, B, C, D, z, dt_bias = map(_contiguous, inputs)
    y = torch.empty_like(x)
    new_state = torch.empty(batch, dim, nstate, dtype=torch.float32, device=x.device)
    _state_update_kernel[(batch, triton.cdiv(dim, BLOCK_D))](
        state, x, dt, A, B, C, D, z, dt_bias, y, new_state, dim, nstate,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        BLOCK_D=BLOCK_D, BLOCK_N=triton.next_power_of_2(nstate),
    )
    return y, new_state
