"""Causal depthwise conv1d and its one-token update as Triton kernels.

Twin of ``causal_conv1d_ref`` / ``causal_conv1d_update`` in kernels_conv1d.py (same
arguments and state; docs/internals.md "Kernel conventions"). With xp = [initial_state, x]
(the W-1 predecessors in front, zeros without a state), for every channel d:

    y_t = act(bias_d + sum_{k<W} weight[d, k] * xp_{t+k})

Forward: one program computes a [BLOCK_D, BLOCK_L] tile of y, tap by tap (W is a
compile-time constant). Backward: one kernel recomputes the pre-activation and writes
g_pre = gy * act'(pre); a second gathers g_xp_p = sum_k weight[d, k] g_pre_{p-k} for
every padded position p (the first W-1 go to the initial state) and writes per-tile
partial sums of g_weight[d, k] = sum_t g_pre_t xp_{t+k} and g_bias, added up by torch.
The final state (the last W-1 columns of xp) is a slice, taken by torch so that its
gradient flows by autograd. Arithmetic is fp32; y and the state keep x's dtype.
"""

from __future__ import annotations

import torch

from strata.kernels.kernels_conv1d import _check_conv_args
from strata.kernels.kernels_dispatch import check_tensor
from strata.kernels.kernels_dispatch import require_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the models load without triton; the kernels need it
    triton = None
    tl = None

BLOCK_D, BLOCK_L = 16, 64


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _padded_load(x_ptr, init_ptr, b, d, p, dim, length,
                 HAS_INIT: tl.constexpr, WIDTH: tl.constexpr):
    """xp[b, d, p] for a [BLOCK_D, BLOCK_L] grid of padded positions p (zeros outside)."""
    md = d < dim
    t = p - (WIDTH - 1)  # position in x
    in_x = md[:, None] & (t[None, :] >= 0) & (t[None, :] < length)
    val = tl.load(x_ptr + ((b * dim + d[:, None]) * length + t[None, :]), mask=in_x, other=0.0).to(tl.float32)
    if HAS_INIT:
        in_init = md[:, None] & (p[None, :] >= 0) & (p[None, :] < WIDTH - 1)
        val += tl.load(init_ptr + ((b * dim + d[:, None]) * (WIDTH - 1) + p[None, :]),
                       mask=in_init, other=0.0).to(tl.float32)
    return val


@_jit
def _conv_pre(x_ptr, init_ptr, w_ptr, bias_ptr, b, d, t, dim, length,
              HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, WIDTH: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """Pre-activation bias + sum_k weight[d, k] xp[t + k] on a [BLOCK_D, BLOCK_L] tile."""
    md = d < dim
    acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=md, other=0.0).to(tl.float32)[:, None]
    for k in tl.static_range(WIDTH):
        w = tl.load(w_ptr + d * WIDTH + k, mask=md, other=0.0).to(tl.float32)
        acc += w[:, None] * _padded_load(x_ptr, init_ptr, b, d, t + k, dim, length, HAS_INIT, WIDTH)
    return acc


@_jit
def _conv_fwd_kernel(
    x_ptr, init_ptr, w_ptr, bias_ptr, y_ptr, dim, length,
    HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, WIDTH: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Forward of ``causal_conv1d_ref``: x, y [B, D, L]; init [B, D, W-1]; weight [D, W]; bias [D]."""
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    y = _conv_pre(x_ptr, init_ptr, w_ptr, bias_ptr, b, d, t, dim, length,
                  HAS_INIT, HAS_BIAS, WIDTH, BLOCK_D, BLOCK_L)
    if SILU:
        y = y * tl.sigmoid(y)
    mask = (d < dim)[:, None] & (t < length)[None, :]
    tl.store(y_ptr + (b * dim + d[:, None]) * length + t[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@_jit
def _conv_bwd_pre_kernel(
    x_ptr, init_ptr, w_ptr, bias_ptr, gy_ptr, gpre_ptr, dim, length,
    HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, WIDTH: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """g_pre = gy * act'(pre) [B, D, L] (fp32), recomputing the pre-activation."""
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask = (d < dim)[:, None] & (t < length)[None, :]
    off = (b * dim + d[:, None]) * length + t[None, :]
    g = tl.load(gy_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        pre = _conv_pre(x_ptr, init_ptr, w_ptr, bias_ptr, b, d, t, dim, length,
                        HAS_INIT, HAS_BIAS, WIDTH, BLOCK_D, BLOCK_L)
        s = tl.sigmoid(pre)
        g = g * s * (1.0 + pre * (1.0 - s))
    tl.store(gpre_ptr + off, g, mask=mask)


@_jit
def _conv_bwd_kernel(
    x_ptr, init_ptr, w_ptr, gpre_ptr, gx_ptr, ginit_ptr, gw_ptr, gbias_ptr, dim, length, n_tiles,
    HAS_INIT: tl.constexpr, WIDTH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Input, state, weight and bias gradients from g_pre (see the module docstring).

    Tile j of BLOCK_L positions serves as padded positions p (g_xp, scattered into gx
    [B, D, L] and ginit [B, D, W-1]) and as output positions t (partial sums gw
    [B, n_tiles, D, W] and gbias [B, n_tiles, D]).
    """
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tile = tl.program_id(2)
    j = tile * BLOCK_L + tl.arange(0, BLOCK_L)
    md = d < dim
    row = (b * dim + d[:, None]) * length
    g_xp = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    g_here = tl.load(gpre_ptr + row + j[None, :], mask=md[:, None] & (j < length)[None, :], other=0.0)
    part = (b * n_tiles + tile) * dim + d
    for k in tl.static_range(WIDTH):
        w = tl.load(w_ptr + d * WIDTH + k, mask=md, other=0.0).to(tl.float32)
        s = j - k
        g_s = tl.load(gpre_ptr + row + s[None, :], mask=md[:, None] & ((s >= 0) & (s < length))[None, :], other=0.0)
        g_xp += w[:, None] * g_s
        xp = _padded_load(x_ptr, init_ptr, b, d, j + k, dim, length, HAS_INIT, WIDTH)
        tl.store(gw_ptr + part * WIDTH + k, tl.sum(g_here * xp, axis=1), mask=md)
    tl.store(gbias_ptr + part, tl.sum(g_here, axis=1), mask=md)
    t = j - (WIDTH - 1)
    tl.store(gx_ptr + row + t[None, :], g_xp, mask=md[:, None] & ((t >= 0) & (t < length))[None, :])
    if HAS_INIT:
        tl.store(ginit_ptr + (b * dim + d[:, None]) * (WIDTH - 1) + j[None, :], g_xp,
                 mask=md[:, None] & (j < WIDTH - 1)[None, :])


@_jit
def _conv_update_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, y_ptr, new_state_ptr, dim,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, WIDTH: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One token of ``causal_conv1d_update``: x, y [B, D]; state, new state [B, D, W-1]."""
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    md = d < dim
    x = tl.load(x_ptr + b * dim + d, mask=md, other=0.0)
    y = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + d, mask=md, other=0.0).to(tl.float32)
    srow = (b * dim + d) * (WIDTH - 1)
    for k in tl.static_range(WIDTH):
        if k < WIDTH - 1:
            xk = tl.load(state_ptr + srow + k, mask=md, other=0.0)
        else:
            xk = x
        y += tl.load(w_ptr + d * WIDTH + k, mask=md, other=0.0).to(tl.float32) * xk.to(tl.float32)
        if k > 0:  # the window shifts left by one
            tl.store(new_state_ptr + srow + (k - 1), xk.to(new_state_ptr.dtype.element_ty), mask=md)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + b * dim + d, y.to(y_ptr.dtype.element_ty), mask=md)


def _contiguous(t):
    return None if t is None else t.contiguous()


class _TritonConv(torch.autograd.Function):
    """(x, weight, bias, initial_state) -> y: the kernels above."""

    @staticmethod
    def forward(ctx, x, weight, bias, init, silu):
        x, weight, bias, init = map(_contiguous, (x, weight, bias, init))
        batch, dim, length = x.shape
        width = weight.shape[1]
        y = torch.empty_like(x)
        flags = dict(HAS_INIT=init is not None and width > 1, HAS_BIAS=bias is not None, SILU=silu, WIDTH=width,
                     BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L)
        grid = (batch, triton.cdiv(dim, BLOCK_D), triton.cdiv(length, BLOCK_L))
        _conv_fwd_kernel[grid](x, init, weight, bias, y, dim, length, **flags)
        ctx.save_for_backward(x, weight, bias, init)
        ctx.silu = silu
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, weight, bias, init = ctx.saved_tensors
        batch, dim, length = x.shape
        width = weight.shape[1]
        f32 = dict(dtype=torch.float32, device=x.device)
        gpre = torch.empty(batch, dim, length, **f32)
        grid = (batch, triton.cdiv(dim, BLOCK_D), triton.cdiv(length, BLOCK_L))
        _conv_bwd_pre_kernel[grid](
            x, init, weight, bias, gy.contiguous(), gpre, dim, length,
            HAS_INIT=init is not None and width > 1, HAS_BIAS=bias is not None, SILU=ctx.silu, WIDTH=width,
            BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L,
        )
        n_tiles = triton.cdiv(length + width - 1, BLOCK_L)
        gx = torch.empty(batch, dim, length, **f32)
        ginit = torch.zeros(batch, dim, width - 1, **f32) if init is not None else None
        gw = torch.empty(batch, n_tiles, dim, width, **f32)
        gbias = torch.empty(batch, n_tiles, dim, **f32)
        _conv_bwd_kernel[(batch, triton.cdiv(dim, BLOCK_D), n_tiles)](
            x, init, weight, gpre, gx, ginit, gw, gbias, dim, length, n_tiles,
            HAS_INIT=init is not None and width > 1, WIDTH=width, BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L,
        )
        return (
            gx.to(x.dtype), gw.sum((0, 1)).to(weight.dtype),
            gbias.sum((0, 1)).to(bias.dtype) if bias is not None else None,
            ginit.to(init.dtype) if init is not None else None, None,
        )


def causal_conv1d_triton(x, weight, bias=None, initial_state=None, activation=None, return_final_state=False):
    """Triton causal depthwise conv1d; same contract as ``causal_conv1d_ref``."""
    op = "causal_conv1d_triton"
    _check_conv_args(op, x, weight, bias, initial_state, activation)
    require_triton(op, x.device)
    length, width = x.shape[-1], weight.shape[1]
    init = initial_state
    if init is not None and init.dtype != x.dtype:
        init = init.to(x.dtype)
    y = _TritonConv.apply(x, weight, bias, init, activation is not None)
    if not return_final_state:
        return y
    # the last W-1 columns of [initial_state, x]
    if length >= width - 1:
        final_state = x[:, :, length - (width - 1):]
    else:
        front = init if init is not None else x.new_zeros(*x.shape[:2], width - 1)
        final_state = torch.cat([front[:, :, length:], x], dim=-1)
    return y, final_state


def causal_conv1d_update_triton(x, conv_state, weight, bias=None, activation=None):
    """Triton twin of ``causal_conv1d_update`` (one token); returns (y, new_conv_state).

    Without gradients one fused kernel; when an input needs a gradient the step runs as
    a one-position ``causal_conv1d_triton`` with the state as its initial state.
    """
    op = "causal_conv1d_update_triton"
    check_tensor(op, "x", x, (None, None), "[B, D]")
    batch, dim = x.shape
    check_tensor(op, "weight", weight, (dim, None), "[D, W]")
    width = weight.shape[1]
    check_tensor(op, "conv_state", conv_state, (batch, dim, width - 1), "[B, D, W-1]")
    _check_conv_args(op, x[:, :, None], weight, bias, conv_state, activation)
    require_triton(op, x.device)
    inputs = (x, conv_state, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        y, new_state = causal_conv1d_triton(x[:, :, None], weight, bias, conv_state, activation, True)
        return y[:, :, 0], new_state
    x, conv_state, weight, bias = map(_contiguous, inputs)
    y = torch.empty_like(x)
    new_state = torch.empty(batch, dim, width - 1, dtype=x.dtype, device=x.device)
    _conv_update_kernel[(batch, triton.cdiv(dim, BLOCK_D))](
        x, conv_state, weight, bias, y, new_state, dim,
        HAS_BIAS=bias is not None, SILU=activation is not None, WIDTH=width, BLOCK_D=BLOCK_D,
    )
    return y, new_state
