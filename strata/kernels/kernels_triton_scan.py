"""Selective scan (Mamba-1) and its one-token state update as Triton kernels.

Twin of ``selective_scan_ref`` / ``selective_state_update`` in kernels_selective_scan.py
(same arguments, layouts and state; docs/internals.md "Kernel conventions"):

    dt = softplus(delta + delta_bias)
    h_t = exp(dt_t A) * h_{t-1} + dt_t B_t u_t,    y_t = C_t . h_t + D u_t,    y *= silu(z)

Design. One program owns BLOCK_D channels of one sequence and keeps their state
h [BLOCK_D, N] in registers while it walks the sequence position by position (the
recurrence of ``selective_scan_ref``, fused: no [B, D, N, L] tensor is ever written).
Every ``chunk_size`` positions the forward kernel stores the state entering the chunk
(a checkpoint, [B, D, L / chunk_size, N]). The backward kernel walks the chunks in
reverse: it replays one chunk forward from its checkpoint into a scratch buffer of
chunk_size + 1 states, then runs the adjoint recurrence backward through it:

    g_h  += gy_t C_t                      (gy_t: gradient of y_t before the skip, after the gate)
    g_C_t = sum_d gy_t h_t,   g_B_t = sum_d g_h dt_t u_t
    g_dt  = sum_n g_h (h_{t-1} e^{dt A} A + B_t u_t),   g_A += g_h h_{t-1} e^{dt A} dt_t
    g_h  <- g_h e^{dt_t A}                (the adjoint state carried to t - 1)

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

# Channels per program. Small blocks give the GPU more programs to run side by side;
# the state of a program is BLOCK_D x next_pow2(N) fp32 values.
BLOCK_D = 16


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _softplus(x):
    # torch.nn.functional.softplus with its threshold 20
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@_jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    y_ptr, hT_ptr, ckpt_ptr,
    dim, length, nstate, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Forward of ``selective_scan_ref`` for BLOCK_D channels of one sequence.

    u, delta, z, y [B, D, L]; A [D, N]; B, C [B, N, L]; D, bias [D]; h0, hT [B, D, N];
    ckpt [B, D, n_chunks, N] receives the state entering every chunk of CHUNK positions.
    """
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    md, mn = d < dim, n < nstate
    mdn = md[:, None] & mn[None, :]
    A = tl.load(A_ptr + d[:, None] * nstate + n[None, :], mask=mdn, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=md, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=md, other=0.0).to(tl.float32)
    state_off = (b * dim + d[:, None]) * nstate + n[None, :]  # [B, D, N]
    if HAS_H0:
        h = tl.load(h0_ptr + state_off, mask=mdn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    seq = (b * dim + d) * length  # row starts in [B, D, L]
    bc = (b * nstate + n) * length  # row starts in [B, N, L]
    ckpt_off = ((b * dim + d[:, None]) * n_chunks) * nstate + n[None, :]
    for t in range(0, length):
        if t % CHUNK == 0:
            tl.store(ckpt_ptr + ckpt_off + (t // CHUNK) * nstate, h, mask=mdn)
        u = tl.load(u_ptr + seq + t, mask=md, other=0.0).to(tl.float32)
        dt = tl.load(delta_ptr + seq + t, mask=md, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt = dt + bias
        if SOFTPLUS:
            dt = _softplus(dt)
        Bt = tl.load(B_ptr + bc + t, mask=mn, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + bc + t, mask=mn, other=0.0).to(tl.float32)
        h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
        y = tl.sum(h * Ct[None, :], axis=1)
        if HAS_D:
            y += Dv * u
        if HAS_Z:
            z = tl.load(z_ptr + seq + t, mask=md, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(y_ptr + seq + t, y.to(y_ptr.dtype.element_ty), mask=md)
    tl.store(hT_ptr + state_off, h, mask=mdn)


@_jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    ckpt_ptr, gy_ptr, ghT_ptr, scratch_ptr,
    gu_ptr, gdelta_ptr, gz_ptr, gA_ptr, gB_ptr, gC_ptr, gD_ptr, gbias_ptr, gh0_ptr,
    batch, dim, length, nstate, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_GHT: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Backward of ``selective_scan_ref`` (see the module docstring) for BLOCK_D channels.

    Writes gu, gdelta, gz [B, D, L] and gh0 [B, D, N] in place, and per-program partial
    sums gA [B, D, N], gD, gbias [B, D], gB, gC [n_dblocks, B, N, L] (summed by torch).
    scratch [B, D, CHUNK + 1, N]: slot 0 holds the state entering the chunk being
    replayed, slot i + 1 the state after its position i.
    """
    b = tl.program_id(0)
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    md, mn = d < dim, n < nstate
    mdn = md[:, None] & mn[None, :]
    A = tl.load(A_ptr + d[:, None] * nstate + n[None, :], mask=mdn, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=md, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=md, other=0.0).to(tl.float32)
    state_off = (b * dim + d[:, None]) * nstate + n[None, :]
    if HAS_GHT:
        gh = tl.load(ghT_ptr + state_off, mask=mdn, other=0.0).to(tl.float32)
    else:
        gh = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    gA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    gD = tl.zeros((BLOCK_D,), dtype=tl.float32)
    gbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    seq = (b * dim + d) * length
    bc = (b * nstate + n) * length
    part = ((pid_d * batch + b) * nstate + n) * length  # rows of the partial gB, gC
    ckpt_off = ((b * dim + d[:, None]) * n_chunks) * nstate + n[None, :]
    scr_off = ((b * dim + d[:, None]) * (CHUNK + 1)) * nstate + n[None, :]

    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        # replay the chunk forward from its checkpoint, keeping every state
        h = tl.load(ckpt_ptr + ckpt_off + c * nstate, mask=mdn, other=0.0)
        tl.debug_barrier()
        tl.store(scratch_ptr + scr_off, h, mask=mdn)
        for i in range(0, CHUNK):
            t = c * CHUNK + i
            live_d, live_n = md & (d * 0 + t < length), mn & (n * 0 + t < length)
            u = tl.load(u_ptr + seq + t, mask=live_d, other=0.0).to(tl.float32)
            dt = tl.load(delta_ptr + seq + t, mask=live_d, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt = dt + bias
            if SOFTPLUS:
                dt = _softplus(dt)
            dt = tl.where(live_d, dt, 0.0)  # past the end: h stays as it is
            Bt = tl.load(B_ptr + bc + t, mask=live_n, other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            tl.store(scratch_ptr + scr_off + (i + 1) * nstate, h, mask=mdn)
        tl.debug_barrier()
        # adjoint recurrence backward through the chunk
        for j in range(0, CHUNK):
            i = CHUNK - 1 - j
            t = c * CHUNK + i
            live_d, live_n = md & (d * 0 + t < length), mn & (n * 0 + t < length)
            h_t = tl.load(scratch_ptr + scr_off + (i + 1) * nstate, mask=mdn, other=0.0)
            h_prev = tl.load(scratch_ptr + scr_off + i * nstate, mask=mdn, other=0.0)
            u = tl.load(u_ptr + seq + t, mask=live_d, other=0.0).to(tl.float32)
            dl = tl.load(delta_ptr + seq + t, mask=live_d, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dl = dl + bias
            dt = dl
            if SOFTPLUS:
                dt = _softplus(dl)
            dt = tl.where(live_d, dt, 0.0)
            Bt = tl.load(B_ptr + bc + t, mask=live_n, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + bc + t, mask=live_n, other=0.0).to(tl.float32)
            gy = tl.load(gy_ptr + seq + t, mask=live_d, other=0.0).to(tl.float32)
            if HAS_Z:
                z = tl.load(z_ptr + seq + t, mask=live_d, other=0.0).to(tl.float32)
                sz = tl.sigmoid(z)
                y = tl.sum(h_t * Ct[None, :], axis=1)
                if HAS_D:
                    y += Dv * u
                gz = gy * y * sz * (1.0 + z * (1.0 - sz))
                tl.store(gz_ptr + seq + t, gz, mask=live_d)
                gy = gy * z * sz
            gu = tl.zeros((BLOCK_D,), dtype=tl.float32)
            if HAS_D:
                gD += gy * u
                gu = gy * Dv
            tl.store(gC_ptr + part + t, tl.sum(gy[:, None] * h_t, axis=0), mask=live_n)
            gh += gy[:, None] * Ct[None, :]
            dA = tl.exp(dt[:, None] * A)
            g_exp = gh * h_prev * dA  # gradient of the exponent dt * A
            gBu = tl.sum(gh * Bt[None, :], axis=1)
            gdt = tl.sum(g_exp * A, axis=1) + gBu * u
            gA += g_exp * dt[:, None]
            tl.store(gB_ptr + part + t, tl.sum(gh * (dt * u)[:, None], axis=0), mask=live_n)
            gu += gBu * dt
            gh = gh * dA
            if SOFTPLUS:
                gdt = gdt * tl.sigmoid(dl)
            gdt = tl.where(live_d, gdt, 0.0)
            gbias += gdt
            tl.store(gu_ptr + seq + t, gu, mask=live_d)
            tl.store(gdelta_ptr + seq + t, gdt, mask=live_d)
        tl.debug_barrier()
    tl.store(gh0_ptr + state_off, gh, mask=mdn)
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
        n_chunks = triton.cdiv(length, chunk_size)
        y = torch.empty_like(u)
        hT = torch.empty(batch, dim, nstate, dtype=torch.float32, device=u.device)
        ckpt = torch.empty(batch, dim, n_chunks, nstate, dtype=torch.float32, device=u.device)
        grid = (batch, triton.cdiv(dim, BLOCK_D))
        _scan_fwd_kernel[grid](
            u, delta, A, B, C, D, z, delta_bias, h0, y, hT, ckpt,
            dim, length, nstate, n_chunks,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus),
            HAS_H0=h0 is not None, CHUNK=chunk_size, BLOCK_D=BLOCK_D, BLOCK_N=triton.next_power_of_2(nstate),
        )
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h0, ckpt)
        ctx.softplus, ctx.chunk_size = bool(softplus), chunk_size
        return y, hT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, ghT):
        u, delta, A, B, C, D, z, delta_bias, h0, ckpt = ctx.saved_tensors
        batch, dim, length = u.shape
        nstate, chunk = A.shape[1], ctx.chunk_size
        n_chunks, n_dblocks = ckpt.shape[2], triton.cdiv(dim, BLOCK_D)
        f32 = dict(dtype=torch.float32, device=u.device)
        gy = torch.zeros_like(u) if gy is None else gy.contiguous()
        gu, gdelta = torch.empty(batch, dim, length, **f32), torch.empty(batch, dim, length, **f32)
        gz = torch.empty(batch, dim, length, **f32) if z is not None else None
        gA, gh0 = torch.empty(batch, dim, nstate, **f32), torch.empty(batch, dim, nstate, **f32)
        gB = torch.empty(n_dblocks, batch, nstate, length, **f32)
        gC = torch.empty(n_dblocks, batch, nstate, length, **f32)
        gD, gbias = torch.empty(batch, dim, **f32), torch.empty(batch, dim, **f32)
        scratch = torch.empty(batch, dim, chunk + 1, nstate, **f32)
        _scan_bwd_kernel[(batch, n_dblocks)](
            u, delta, A, B, C, D, z, delta_bias, ckpt, gy, _contiguous(ghT), scratch,
            gu, gdelta, gz, gA, gB, gC, gD, gbias, gh0,
            batch, dim, length, nstate, n_chunks,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=ctx.softplus,
            HAS_GHT=ghT is not None, CHUNK=chunk, BLOCK_D=BLOCK_D, BLOCK_N=triton.next_power_of_2(nstate),
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

    ``chunk_size`` is the checkpoint interval of the backward pass (memory
    B*D*N*L/chunk_size for the checkpoints, B*D*N*(chunk_size+1) of scratch).
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
