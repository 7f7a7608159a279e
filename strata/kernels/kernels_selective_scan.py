"""Selective scan (Mamba-1): the sequential reference, a chunked PyTorch form, one-token step.

Layout (mamba-ssm): u, delta, z [B, D, L]; A [D, N]; B, C [B, N, L]; D, delta_bias [D];
state h [B, D, N]. With dt = softplus(delta + delta_bias):

    h_t = exp(dt_t A) * h_{t-1} + dt_t B_t u_t        (per channel d, state n)
    y_t = C_t . h_t + D u_t,   y *= silu(z)

Arithmetic is fp32 (fp64 when an input is fp64); y comes back in u's dtype, the final
state in the compute dtype.

Chunked form. A is a different decay per (channel, state), so the SSD matmul trick of
Mamba-2 does not apply; but every decay over a span is exp(A_dn * (sum of dt over the
span)), so inside a chunk, with cs_t = cumsum(dt) and any reference value r per channel,

    h_t = exp(A (cs_t - r)) * [ sum_{s<=t} exp(A (r - cs_s)) dt_s u_s B_s  +  exp(A r) h_in ]

which is one exp, a reciprocal, products and a cumsum over [B, D, N, T]: no Python
loop over time and no [.., T, T] matrix. It is exact algebra; the only risk is
overflow of the factors exp(+-A (cs - r)). With r the midpoint of cs over the chunk
they stay within exp(+-R/2), R = max_n |A_dn| * sum_chunk |dt|. Chunk boundaries are
therefore chosen per call so that R <= _MAX_SPAN[dtype] (factors within exp(+-50) in
fp32): ``chunk_size`` positions where decays allow, fewer where they are steep, down
to one position, where the factors are exactly 1 and the formula is the plain
recurrence. Chunks run in order carrying h, so each step's working set stays in cache.

Backward is written by hand (``_ChunkedScan``): the forward pass keeps only its inputs
and the state entering each chunk, the backward pass recomputes one chunk at a time in
reverse, so memory is O(B D N L / T) instead of several [B, D, N, L] tensors. The
tests hold values and gradients to ``selective_scan_ref``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from strata.kernels.kernels_dispatch import check_chunk_size
from strata.kernels.kernels_dispatch import check_tensor
from strata.kernels.kernels_dispatch import compute_dtype
from strata.kernels.kernels_dispatch import gpu_form
from strata.kernels.kernels_dispatch import resolve_backend

# Largest exponent span R allowed inside one chunk (the factors stay within exp(+-R/2)).
_MAX_SPAN = {torch.float32: 100.0, torch.float64: 600.0}


def _check_scan_args(op, u, delta, A, B, C, D, z, delta_bias, initial_state):
    check_tensor(op, "u", u, (None, None, None), "[B, D, L]")
    batch, dim, length = u.shape
    if length < 1:
        raise ValueError(f"{op}: `u` must have at least one position, got L = 0")
    check_tensor(op, "delta", delta, (batch, dim, length), "[B, D, L]")
    check_tensor(op, "A", A, (dim, None), "[D, N]")
    n = A.shape[1]
    check_tensor(op, "B", B, (batch, n, length), "[B, N, L]")
    check_tensor(op, "C", C, (batch, n, length), "[B, N, L]")
    if D is not None:
        check_tensor(op, "D", D, (dim,), "[D]")
    if z is not None:
        check_tensor(op, "z", z, (batch, dim, length), "[B, D, L]")
    if delta_bias is not None:
        check_tensor(op, "delta_bias", delta_bias, (dim,), "[D]")
    if initial_state is not None:
        check_tensor(op, "initial_state", initial_state, (batch, dim, n), "[B, D, N]")


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
    initial_state=None, return_final_state=False,
):
    """Sequential scan, one position at a time: the specification of the other forms."""
    _check_scan_args("selective_scan_ref", u, delta, A, B, C, D, z, delta_bias, initial_state)
    ct = compute_dtype(u, delta, A, B, C, initial_state)
    batch, dim, length = u.shape
    x = u.to(ct)
    dt = delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    A, B, C = A.to(ct), B.to(ct), C.to(ct)

    if initial_state is None:
        h = torch.zeros(batch, dim, A.shape[1], dtype=ct, device=u.device)
    else:
        h = initial_state.to(ct)
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, :, t, None] * A)  # [B, D, N]
        h = decay * h + (dt[:, :, t] * x[:, :, t])[:, :, None] * B[:, None, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=-1)  # [B, D, L]

    if D is not None:
        y = y + D.to(ct)[:, None] * x
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(u.dtype)
    return (y, h) if return_final_state else y


def _chunk_spans(dt, A, max_span, chunk_size):
    """Chunk boundaries [(start, end)]: at most chunk_size long, exponent span <= max_span."""
    length = dt.shape[-1]
    with torch.no_grad():
        steps = dt.detach().abs().double() * A.detach().abs().amax(dim=1).double()[:, None]  # [B, D, L]
        reach = F.pad(steps.cumsum(-1), (1, 0))  # reach[..., t] = sum of the steps before t
        bounds = []
        start = 0
        while start < length:
            end = min(length, start + chunk_size)
            if end - start > 1:
                # spans of [start, start + 2), [start, start + 3), ... (non-decreasing)
                span = (reach[:, :, start + 2:end + 1] - reach[:, :, start:start + 1]).amax(dim=(0, 1))
                end = start + 1 + int((span <= max_span).sum())
            bounds.append((start, end))
            start = end
    return bounds


def _step(h, x, dt, A, B, C):
    """One position of the recurrence. h [B, D, N]; x, dt [B, D]; B, C [B, N]."""
    h = torch.exp(dt[:, :, None] * A) * h + (dt * x)[:, :, None] * B[:, None, :]
    return torch.einsum("bdn,bn->bd", h, C), h


# One chunk, T positions: h [B, D, N]; dtx = dt * u, dt [B, D, T]; B, C [B, N, T].
# r is the midpoint of cs over the chunk (any r gives the same values, so r carries no
# gradient); then |A (cs_t - r)| <= R / 2 and P = exp(A (cs - r)), 1 / P stay finite.


def _chunk_decay(dt, A):
    cs = dt.cumsum(-1)  # [B, D, T]
    r = 0.5 * (cs.amax(-1, keepdim=True) + cs.amin(-1, keepdim=True))  # [B, D, 1]
    rel = cs - r  # [B, D, T]
    P = (rel[:, :, None, :] * A[None, :, :, None]).exp_()  # [B, D, N, T]
    return r, rel, torch.exp(A * r), P  # the incoming state decays by exp(A r) * P_t


def _chunk_forward(h, dtx, dt, A, B, C):
    _, _, g, P = _chunk_decay(dt, A)
    acc = torch.reciprocal(P).mul_(dtx[:, :, None, :]).mul_(B[:, None, :, :])
    hs = acc.cumsum_(-1).add_((g * h)[..., None]).mul_(P)  # h_t for every t of the chunk
    y = (hs * C[:, None, :, :]).sum(2)  # [B, D, T]
    return y, hs[..., -1].clone()


def _chunk_backward(h, dtx, dt, A, B, C, gy, gh):
    """Gradients of one chunk from gy [B, D, T] and gh (of its last state) [B, D, N]."""
    r, rel, g, P = _chunk_decay(dt, A)
    Q = torch.reciprocal(P)
    Qw = Q * dtx[:, :, None, :] * B[:, None, :, :]
    hs = Qw.cumsum(-1).add_((g * h)[..., None]).mul_(P)
    ghs = C[:, None, :, :] * gy[:, :, None, :]  # dL/dh_t, direct part
    ghs[..., -1] += gh
    gC = (hs * gy[:, :, None, :]).sum(1)
    gacc = ghs * P
    g_gh = gacc.sum(-1)  # [B, D, N], of g * h
    G = gacc.flip(-1).cumsum(-1).flip(-1)  # reverse cumsum; total - cumsum would cancel badly
    ge = ghs.mul_(hs).addcmul_(G, Qw, value=-1)  # of the exponent A (cs - r)
    gw = G.mul_(Q)  # of w = dtx * B (this is the adjoint state)
    gdtx = (gw * B[:, None, :, :]).sum(2)
    gB = (gw * dtx[:, :, None, :]).sum(1)
    grel = (ge * A[None, :, :, None]).sum(2)  # [B, D, T]
    gdt = grel.flip(-1).cumsum(-1).flip(-1)
    gA = (ge * rel[:, :, None, :]).sum((0, 3)) + (g_gh * g * h * r).sum(0)
    return gdtx, gdt, gA, gB, gC, g_gh * g


class _ChunkedScan(torch.autograd.Function):
    """(dtx, dt, A, B, C, h0) -> (y [B, D, L] without the D skip and gate, final state).

    Saves only its inputs and the state entering each chunk; the backward pass
    recomputes every chunk's [B, D, N, T] tensors, chunk by chunk in reverse.
    """

    @staticmethod
    def forward(ctx, dtx, dt, A, B, C, h0, chunk_size):
        bounds = _chunk_spans(dt, A, _MAX_SPAN[dt.dtype], chunk_size)
        y = torch.empty_like(dtx)
        h = h0
        entering = []
        for start, end in bounds:
            entering.append(h)
            y[:, :, start:end], h = _chunk_forward(
                h, dtx[:, :, start:end], dt[:, :, start:end], A, B[:, :, start:end], C[:, :, start:end]
            )
        ctx.bounds = bounds
        ctx.save_for_backward(dtx, dt, A, B, C, torch.stack(entering))
        return y, h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gh):
        dtx, dt, A, B, C, entering = ctx.saved_tensors
        gdtx, gdt = torch.empty_like(dtx), torch.empty_like(dt)
        gB, gC = torch.empty_like(B), torch.empty_like(C)
        gA = torch.zeros_like(A)
        for i in reversed(range(len(ctx.bounds))):
            s, e = ctx.bounds[i]
            grads = _chunk_backward(
                entering[i], dtx[:, :, s:e], dt[:, :, s:e], A, B[:, :, s:e], C[:, :, s:e], gy[:, :, s:e], gh
            )
            gdtx[:, :, s:e], gdt[:, :, s:e], gA_c, gB[:, :, s:e], gC[:, :, s:e], gh = grads
            gA += gA_c
        return gdtx, gdt, gA, gB, gC, gh, None


def selective_scan_chunked(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
    initial_state=None, return_final_state=False, chunk_size=64,
):
    """Chunked selective scan (see the module docstring); same contract as the reference."""
    op = "selective_scan_chunked"
    _check_scan_args(op, u, delta, A, B, C, D, z, delta_bias, initial_state)
    check_chunk_size(op, chunk_size)
    ct = compute_dtype(u, delta, A, B, C, initial_state)
    batch, dim, length = u.shape
    x = u.to(ct)
    dt = delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    if initial_state is None:
        h0 = torch.zeros(batch, dim, A.shape[1], dtype=ct, device=u.device)
    else:
        h0 = initial_state.to(ct)
    y, h = _ChunkedScan.apply(dt * x, dt, A.to(ct), B.to(ct), C.to(ct), h0, chunk_size)

    if D is not None:
        y = y + D.to(ct)[:, None] * x
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(u.dtype)
    return (y, h) if return_final_state else y


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, backend=None):
    """One token: state [B, D, N]; x, dt, z [B, D]; B, C [B, N]. Returns (y, new_state).

    backend: "torch" (this function, the reference step) | "triton" | "mamba_ssm";
    chosen like ``selective_scan``'s.
    """
    op = "selective_state_update"
    name = resolve_backend(op, backend, x.device if isinstance(x, torch.Tensor) else None)
    if name != "torch":
        return gpu_form(op, name)(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    check_tensor(op, "x", x, (None, None), "[B, D]")
    batch, dim = x.shape
    check_tensor(op, "A", A, (dim, None), "[D, N]")
    n = A.shape[1]
    check_tensor(op, "state", state, (batch, dim, n), "[B, D, N]")
    check_tensor(op, "dt", dt, (batch, dim), "[B, D]")
    check_tensor(op, "B", B, (batch, n), "[B, N]")
    check_tensor(op, "C", C, (batch, n), "[B, N]")
    if D is not None:
        check_tensor(op, "D", D, (dim,), "[D]")
    if z is not None:
        check_tensor(op, "z", z, (batch, dim), "[B, D]")
    if dt_bias is not None:
        check_tensor(op, "dt_bias", dt_bias, (dim,), "[D]")

    ct = compute_dtype(state, x, dt, A, B, C)
    xc = x.to(ct)
    delta = dt.to(ct)
    if dt_bias is not None:
        delta = delta + dt_bias.to(ct)
    if dt_softplus:
        delta = F.softplus(delta)
    y, new_state = _step(state.to(ct), xc, delta, A.to(ct), B.to(ct), C.to(ct))
    if D is not None:
        y = y + D.to(ct) * xc
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(x.dtype), new_state


_FORMS = {"ref": selective_scan_ref, "torch": selective_scan_chunked}


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
    initial_state=None, return_final_state=False, chunk_size=64, backend=None,
):
    """Selective scan with the backend chosen by ``backend``, $STRATA_KERNEL_BACKEND or default.

    backend: "ref" (sequential) | "torch" (chunked, default on CPU) | "triton" (default on
    CUDA) | "mamba_ssm". ``chunk_size`` is the chunk length of the chunked form and the
    checkpoint interval of the Triton form.
    """
    name = resolve_backend("selective_scan", backend, u.device if isinstance(u, torch.Tensor) else None)
    kwargs = dict(
        D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        initial_state=initial_state, return_final_state=return_final_state,
    )
    if name in ("torch", "triton"):
        kwargs["chunk_size"] = chunk_size
    form = _FORMS[name] if name in _FORMS else gpu_form("selective_scan", name)
    return form(u, delta, A, B, C, **kwargs)
