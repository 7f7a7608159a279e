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
        starts = list(range(0, length, chunk_size))
        ends = starts[1:] + [length]
        if bool(((reach[:, :, ends] - reach[:, :, starts]).amax() <= max_span).item()):
            return list(zip(starts, ends))  # the usual case: full-length chunks everywhere
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
#
# The [B, D, N, T] tensors live in a workspace allocated once per call (fresh multi-MB
# tensors per chunk cost page faults on CPU), and the chunk's cumulative sums over T are a
# matmul with a triangular matrix of ones when T is short (faster than cumsum there).
# ``monotone`` (dt >= 0, always so after softplus) lets the range of cs be read off its ends.

_TRIANGLE_MAX = 32  # chunks up to this length sum over T with a matmul


class _Workspace:
    """``count`` buffers of [B, D, N, T] for chunks of any length T <= the longest."""

    def __init__(self, count, like, n, longest):
        batch, dim, _ = like.shape
        self.shape = (batch, dim, n)
        self.buffers = [like.new_empty(batch * dim * n * longest) for _ in range(count)]
        self.triangles = {}

    def views(self, T):
        size = self.shape[0] * self.shape[1] * self.shape[2] * T
        return [buffer[:size].view(*self.shape, T) for buffer in self.buffers]

    def triangle(self, T, upper):
        """[T, T] ones on and above (upper: x @ it is a cumsum) or below (a reverse cumsum) the diagonal."""
        if (T, upper) not in self.triangles:
            ones = self.buffers[0].new_ones(T, T)
            self.triangles[T, upper] = ones.triu() if upper else ones.tril()
        return self.triangles[T, upper]


def _chunk_decay(dt, A, P, monotone):
    """P <- exp(A (cs - r)) in place; returns r, cs - r and exp(A r) (the incoming state's decay)."""
    cs = dt.cumsum(-1)  # [B, D, T]
    if monotone:
        r = 0.5 * (cs[..., :1] + cs[..., -1:])
    else:
        r = 0.5 * (cs.amax(-1, keepdim=True) + cs.amin(-1, keepdim=True))  # [B, D, 1]
    rel = cs - r  # [B, D, T]
    torch.mul(rel[:, :, None, :], A[None, :, :, None], out=P).exp_()
    return r, rel, torch.exp(A * r)


def _states(ws, W, h, g, P, out):
    """out <- h_t for every t of the chunk: P * (cumsum_t(W) + g h), W = dtx B / P."""
    T = W.shape[-1]
    if T <= _TRIANGLE_MAX:
        torch.addmm((g * h).reshape(-1, 1), W.view(-1, T), ws.triangle(T, upper=True), out=out.view(-1, T))
    else:
        torch.cumsum(W, -1, out=out).add_((g * h)[..., None])
    return out.mul_(P)


def _chunk_forward(ws, h, dtx, dt, A, B, C, monotone):
    P, W, H = ws.views(dt.shape[-1])
    _, _, g = _chunk_decay(dt, A, P, monotone)
    torch.reciprocal(P, out=W).mul_(dtx[:, :, None, :]).mul_(B[:, None, :, :])
    hs = _states(ws, W, h, g, P, out=H)
    h_last = hs[..., -1].clone()
    y = hs.mul_(C[:, None, :, :]).sum(2)  # [B, D, T]
    return y, h_last


def _chunk_backward(ws, h, dtx, dt, A, B, C, gy, gh, monotone):
    """Gradients of one chunk from gy [B, D, T] and gh (of its last state) [B, D, N]."""
    T = dt.shape[-1]
    P, Q, W, H, G = ws.views(T)
    r, rel, g = _chunk_decay(dt, A, P, monotone)
    torch.reciprocal(P, out=Q)
    torch.mul(Q, dtx[:, :, None, :], out=W).mul_(B[:, None, :, :])  # W = dtx B / P
    hs = _states(ws, W, h, g, P, out=H)
    gC = torch.mul(hs, gy[:, :, None, :], out=G).sum(1)
    ghs = torch.mul(C[:, None, :, :], gy[:, :, None, :], out=G)  # dL/dh_t, direct part
    ghs[..., -1] += gh
    gacc = P.mul_(ghs)
    g_gh = gacc.sum(-1)  # [B, D, N], of g * h
    ge = hs.mul_(ghs)  # ghs * hs, before G (holding ghs) is overwritten
    # G_t = sum_{s >= t} gacc_s, a reverse cumsum (total - cumsum would cancel badly)
    if T <= _TRIANGLE_MAX:
        torch.matmul(gacc, ws.triangle(T, upper=False), out=G)
    else:
        G.copy_(gacc.flip(-1).cumsum(-1).flip(-1))
    ge.addcmul_(G, W, value=-1)  # of the exponent A (cs - r)
    gw = G.mul_(Q)  # of w = dtx * B (this is the adjoint state)
    gdtx = torch.mul(gw, B[:, None, :, :], out=W).sum(2)
    gB = torch.mul(gw, dtx[:, :, None, :], out=W).sum(1)
    grel = torch.mul(ge, A[None, :, :, None], out=W).sum(2)  # [B, D, T]
    gdt = grel.flip(-1).cumsum(-1).flip(-1)
    gA = torch.mul(ge, rel[:, :, None, :], out=W).sum((0, 3)) + (g_gh * g * h * r).sum(0)
    return gdtx, gdt, gA, gB, gC, g_gh * g


class _ChunkedScan(torch.autograd.Function):
    """(dtx, dt, A, B, C, h0) -> (y [B, D, L] without the D skip and gate, final state).

    Saves only its inputs and the state entering each chunk; the backward pass
    recomputes every chunk's [B, D, N, T] tensors, chunk by chunk in reverse.
    """

    @staticmethod
    def forward(ctx, dtx, dt, A, B, C, h0, chunk_size):
        bounds = _chunk_spans(dt, A, _MAX_SPAN[dt.dtype], chunk_size)
        longest = max(end - start for start, end in bounds)
        monotone = bool((dt >= 0).all())
        ws = _Workspace(3, dtx, A.shape[1], longest)
        y = torch.empty_like(dtx)
        h = h0
        entering = []
        for start, end in bounds:
            entering.append(h)
            y[:, :, start:end], h = _chunk_forward(
                ws, h, dtx[:, :, start:end], dt[:, :, start:end], A, B[:, :, start:end], C[:, :, start:end], monotone
            )
        ctx.bounds, ctx.longest, ctx.monotone = bounds, longest, monotone
        ctx.save_for_backward(dtx, dt, A, B, C, torch.stack(entering))
        return y, h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gh):
        dtx, dt, A, B, C, entering = ctx.saved_tensors
        ws = _Workspace(5, dtx, A.shape[1], ctx.longest)
        gy = gy.contiguous()
        gdtx, gdt = torch.empty_like(dtx), torch.empty_like(dt)
        gB, gC = torch.empty_like(B), torch.empty_like(C)
        gA = torch.zeros_like(A)
        for i in reversed(range(len(ctx.bounds))):
            s, e = ctx.bounds[i]
            grads = _chunk_backward(
                ws, entering[i], dtx[:, :, s:e], dt[:, :, s:e], A, B[:, :, s:e], C[:, :, s:e], gy[:, :, s:e], gh,
                ctx.monotone,
            )
            gdtx[:, :, s:e], gdt[:, :, s:e], gA_c, gB[:, :, s:e], gC[:, :, s:e], gh = grads
            gA += gA_c
        return gdtx, gdt, gA, gB, gC, gh, None


def selective_scan_chunked(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
    initial_state=None, return_final_state=False, chunk_size=64,
):
    """Chunked selective scan (see the module docstring); same contract as the reference."""
    x, dt, A, B, C, h0 = scan_prologue(
        "selective_scan_chunked", u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_size
    )
    y, h = _ChunkedScan.apply(dt * x, dt, A, B, C, h0, chunk_size)
    return scan_epilogue(y, h, x, u, D, z, return_final_state)


def scan_prologue(op, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_size):
    """Checks, then (x, dt, A, B, C, h0) in the compute dtype, dt = softplus(delta + bias)."""
    _check_scan_args(op, u, delta, A, B, C, D, z, delta_bias, initial_state)
    check_chunk_size(op, chunk_size)
    ct = compute_dtype(u, delta, A, B, C, initial_state)
    batch, dim, _ = u.shape
    dt = delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    if initial_state is None:
        h0 = torch.zeros(batch, dim, A.shape[1], dtype=ct, device=u.device)
    else:
        h0 = initial_state.to(ct)
    return u.to(ct), dt, A.to(ct), B.to(ct), C.to(ct), h0


def scan_epilogue(y, h, x, u, D, z, return_final_state):
    """The D skip and the gate on the scan's output y; y back in u's dtype."""
    if D is not None:
        y = y + D.to(y.dtype)[:, None] * x
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
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

    backend: "ref" (sequential) | "torch" (chunked, default on CPU) | "cpu" (the compiled C
    kernel of kernels_cpu_scan.py, opt-in) | "triton" (default on CUDA) |
    "mamba_ssm". ``chunk_size`` is the chunk length of the chunked form and the
    checkpoint interval of the C and Triton forms.
    """
    name = resolve_backend("selective_scan", backend, u.device if isinstance(u, torch.Tensor) else None)
    kwargs = dict(
        D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        initial_state=initial_state, return_final_state=return_final_state,
    )
    if name in ("torch", "cpu", "triton"):
        kwargs["chunk_size"] = chunk_size
    if name == "cpu":
        from strata.kernels.kernels_cpu_scan import selective_scan_cpu as form
    else:
        form = _FORMS[name] if name in _FORMS else gpu_form("selective_scan", name)
    return form(u, delta, A, B, C, **kwargs)
