"""Retention / linear attention with decay: recurrent reference, parallel, chunked, one step.

Layout (fla): q, k [B, H, L, Dk], v [B, H, L, Dv]; state S [B, H, Dk, Dv];
``log_decay`` is [H] (per-head constant log gamma, RetNet) or [B, H, L] (per token,
data-dependent), values <= 0:

    S_t = exp(log_decay_t) S_{t-1} + k_t^T v_t,     o_t = scale * q_t S_t

Parallel form, with cum_t = sum_{r<=t} log_decay_r:

    o = scale * [ (q k^T * M) v + (q * exp(cum)) S_0 ],   M_ts = exp(sum_{r=s+1..t} log_decay_r) for s <= t, else 0

The exponents are sums of log-decays over spans (``_segment_sums``), masked to -inf
above the diagonal before exp (never exp then mask), so neither the outputs nor the
gradients see inf - inf or inf * 0, even for log_decay = -inf (a full reset). RetNet's extra normalisations of M
are not part of these kernels. Arithmetic is fp32 (fp64 when an input is fp64); o comes
back in q's dtype, the final state in the compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from strata.kernels.kernels_dispatch import check_chunk_size
from strata.kernels.kernels_dispatch import check_tensor
from strata.kernels.kernels_dispatch import compute_dtype
from strata.kernels.kernels_dispatch import gpu_form
from strata.kernels.kernels_dispatch import resolve_backend


def _check_retention_args(op, q, k, v, log_decay, initial_state):
    check_tensor(op, "q", q, (None, None, None, None), "[B, H, L, Dk]")
    batch, heads, length, dk = q.shape
    if length < 1:
        raise ValueError(f"{op}: `q` must have at least one position, got L = 0")
    check_tensor(op, "k", k, (batch, heads, length, dk), "[B, H, L, Dk]")
    check_tensor(op, "v", v, (batch, heads, length, None), "[B, H, L, Dv]")
    if isinstance(log_decay, torch.Tensor) and log_decay.dim() == 1:
        check_tensor(op, "log_decay", log_decay, (heads,), "[H]")
    else:
        check_tensor(op, "log_decay", log_decay, (batch, heads, length), "[H] or [B, H, L]")
    if initial_state is not None:
        check_tensor(op, "initial_state", initial_state, (batch, heads, dk, v.shape[-1]), "[B, H, Dk, Dv]")


def _log_decay_per_token(log_decay, batch, length, ct):
    """[H] or [B, H, L] -> [B, H, L] in the compute dtype."""
    log_decay = log_decay.to(ct)
    if log_decay.dim() == 1:
        return log_decay[None, :, None].expand(batch, -1, length)
    return log_decay


def _segment_sums(log_decay):
    """seg[..., t, s] = sum_{r=s+1..t} log_decay_r for s <= t, -inf above the diagonal.

    Summed segment by segment (a masked cumsum over a [T, T] grid), not as the
    difference cum_t - cum_s, which would lose the small decays of late positions
    to rounding once cum has grown large. log_decay [..., T] -> [..., T, T].
    """
    size = log_decay.shape[-1]
    ones = torch.ones(size, size, dtype=torch.bool, device=log_decay.device)
    terms = log_decay[..., :, None].expand(*log_decay.shape, size)  # [..., r, s] = log_decay_r
    seg = torch.where(ones.tril(-1), terms, 0.0).cumsum(-2)  # sum over s < r <= t
    return torch.where(ones.tril(), seg, float("-inf"))


def retention_ref(q, k, v, log_decay, initial_state=None, scale=1.0, return_final_state=False):
    """The recurrence, one position at a time: the specification of the other forms."""
    out_dtype = q.dtype
    _check_retention_args("retention_ref", q, k, v, log_decay, initial_state)
    ct = compute_dtype(q, k, v, log_decay, initial_state)
    batch, heads, length, dk = q.shape
    q, k, v = q.to(ct), k.to(ct), v.to(ct)
    ld = _log_decay_per_token(log_decay, batch, length, ct)
    if initial_state is None:
        S = torch.zeros(batch, heads, dk, v.shape[-1], dtype=ct, device=q.device)
    else:
        S = initial_state.to(ct)
    outs = []
    for t in range(length):
        S = torch.exp(ld[:, :, t])[:, :, None, None] * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    o = torch.stack(outs, dim=2).to(out_dtype)
    return (o, S) if return_final_state else o


def retention_parallel(q, k, v, log_decay, initial_state=None, scale=1.0, return_final_state=False):
    """The O(L^2) parallel form (one [B, H, L, L] decay matrix)."""
    out_dtype = q.dtype
    _check_retention_args("retention_parallel", q, k, v, log_decay, initial_state)
    ct = compute_dtype(q, k, v, log_decay, initial_state)
    batch, heads, length, _ = q.shape
    q, k, v = q.to(ct), k.to(ct), v.to(ct)
    ld = _log_decay_per_token(log_decay, batch, length, ct)
    seg = _segment_sums(ld)  # [B, H, L, L]

    o = ((q @ k.transpose(-1, -2)) * torch.exp(seg)) @ v
    k_to_end = k * torch.exp(seg[..., -1, :])[..., None]  # decayed from s to the end
    S = k_to_end.transpose(-1, -2) @ v  # [B, H, Dk, Dv]
    if initial_state is not None:
        S0 = initial_state.to(ct)
        cum = ld.cumsum(-1)  # decay of S0 up to t
        o = o + (q * torch.exp(cum)[..., None]) @ S0
        S = S + torch.exp(cum[..., -1])[..., None, None] * S0
    o = (scale * o).to(out_dtype)
    return (o, S) if return_final_state else o


def retention_chunked(q, k, v, log_decay, initial_state=None, scale=1.0, return_final_state=False, chunk_size=64):
    """Chunkwise form: parallel inside chunks of ``chunk_size``, recurrent across them.

    Every exponent is a sum of log-decays over a span inside one chunk, never positive.
    """
    op = "retention_chunked"
    out_dtype = q.dtype
    _check_retention_args(op, q, k, v, log_decay, initial_state)
    check_chunk_size(op, chunk_size)
    ct = compute_dtype(q, k, v, log_decay, initial_state)
    batch, heads, length, dk = q.shape
    dv = v.shape[-1]
    q, k, v = q.to(ct), k.to(ct), v.to(ct)
    ld = _log_decay_per_token(log_decay, batch, length, ct)

    # pad to whole chunks: padded positions have k = 0 and log-decay 0, so they leave S unchanged
    size = min(chunk_size, length)
    n_chunks = -(-length // size)
    pad = n_chunks * size - length
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        ld = F.pad(ld, (0, pad))
    q = q.reshape(batch, heads, n_chunks, size, dk)
    k = k.reshape(batch, heads, n_chunks, size, dk)
    v = v.reshape(batch, heads, n_chunks, size, dv)
    ld = ld.reshape(batch, heads, n_chunks, size)
    seg = _segment_sums(ld)  # [B, H, n, T, T], within chunks
    cum = ld.cumsum(-1)  # [B, H, n, T], from each chunk's start

    o = ((q @ k.transpose(-1, -2)) * torch.exp(seg)) @ v  # within chunks
    k_to_end = k * torch.exp(seg[..., -1, :])[..., None]
    chunk_kv = k_to_end.transpose(-1, -2) @ v  # [B, H, n, Dk, Dv]: each chunk's addition to S
    chunk_decay = torch.exp(cum[..., -1])[..., None, None]  # [B, H, n, 1, 1]

    if initial_state is None:
        S = torch.zeros(batch, heads, dk, dv, dtype=ct, device=q.device)
    else:
        S = initial_state.to(ct)
    states = []  # S before each chunk
    for c in range(n_chunks):
        states.append(S)
        S = chunk_decay[:, :, c] * S + chunk_kv[:, :, c]
    o = o + (q * torch.exp(cum)[..., None]) @ torch.stack(states, dim=2)  # from earlier chunks

    o = (scale * o).reshape(batch, heads, n_chunks * size, dv)[:, :, :length].to(out_dtype)
    return (o, S) if return_final_state else o


def retention_step(q, k, v, log_decay, state, scale=1.0):
    """One token: q, k [B, H, Dk], v [B, H, Dv], log_decay [H] or [B, H], state [B, H, Dk, Dv] or None.

    Returns (o [B, H, Dv], new_state).
    """
    op = "retention_step"
    check_tensor(op, "q", q, (None, None, None), "[B, H, Dk]")
    batch, heads, dk = q.shape
    check_tensor(op, "k", k, (batch, heads, dk), "[B, H, Dk]")
    check_tensor(op, "v", v, (batch, heads, None), "[B, H, Dv]")
    dv = v.shape[-1]
    if isinstance(log_decay, torch.Tensor) and log_decay.dim() == 1:
        check_tensor(op, "log_decay", log_decay, (heads,), "[H]")
    else:
        check_tensor(op, "log_decay", log_decay, (batch, heads), "[H] or [B, H]")
    if state is not None:
        check_tensor(op, "state", state, (batch, heads, dk, dv), "[B, H, Dk, Dv]")

    ct = compute_dtype(q, k, v, log_decay, state)
    decay = torch.exp(log_decay.to(ct))
    decay = decay[None, :, None, None] if decay.dim() == 1 else decay[:, :, None, None]
    update = k.to(ct)[:, :, :, None] * v.to(ct)[:, :, None, :]
    new_state = update if state is None else decay * state.to(ct) + update
    o = scale * torch.einsum("bhk,bhkv->bhv", q.to(ct), new_state)
    return o.to(q.dtype), new_state


_FORMS = {"ref": retention_ref, "parallel": retention_parallel, "chunked": retention_chunked}


def retention(q, k, v, log_decay, initial_state=None, scale=1.0, return_final_state=False, chunk_size=64, backend=None):
    """Retention with the backend chosen by ``backend``, $STRATA_KERNEL_BACKEND or default.

    backend: "ref" (recurrent) | "parallel" | "chunked" (default on CPU; "torch" is an
    alias) | "triton" (default on CUDA). ``chunk_size`` is used by the chunked forms only.
    """
    name = resolve_backend("retention", backend, q.device if isinstance(q, torch.Tensor) else None)
    kwargs = dict(initial_state=initial_state, scale=scale, return_final_state=return_final_state)
    if name in ("chunked", "triton"):
        kwargs["chunk_size"] = chunk_size
    form = _FORMS[name] if name in _FORMS else gpu_form("retention", name)
    return form(q, k, v, log_decay, **kwargs)
