"""Causal depthwise conv1d (the short convolution in front of Mamba's scan).

x [B, D, L], weight [D, W], bias [D] | None; the conv state is the last W-1 inputs
[B, D, W-1] (zero-padded on the left when fewer have been seen). For every channel d:

    y_t = bias_d + sum_{k=0..W-1} weight[d, k] * x_{t-(W-1)+k}

where positions before the sequence read from ``initial_state`` (or zeros);
activation "silu" applies silu(y). Output and state keep x's dtype.

``causal_conv1d`` / ``causal_conv1d_update`` dispatch (kernels_dispatch.py) to the
tap-by-tap reference, the F.conv1d form (default on CPU), the Triton kernels
(kernels_triton_conv1d.py, default on CUDA) or the causal-conv1d package.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from strata.kernels.kernels_dispatch import check_tensor
from strata.kernels.kernels_dispatch import gpu_form
from strata.kernels.kernels_dispatch import resolve_backend

_ACTIVATIONS = (None, "silu", "swish")


def _check_conv_args(op, x, weight, bias, initial_state, activation):
    check_tensor(op, "x", x, (None, None, None), "[B, D, L]")
    batch, dim, _ = x.shape
    check_tensor(op, "weight", weight, (dim, None), "[D, W]")
    width = weight.shape[1]
    if width < 1:
        raise ValueError(f"{op}: `weight` must have a kernel width W >= 1, got shape {list(weight.shape)}")
    if bias is not None:
        check_tensor(op, "bias", bias, (dim,), "[D]")
    if initial_state is not None:
        check_tensor(op, "initial_state", initial_state, (batch, dim, width - 1), "[B, D, W-1]")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{op}: `activation` must be one of {_ACTIVATIONS}, got {activation!r}")


def _padded_input(x, initial_state, width):
    """x with its W-1 predecessors in front: [B, D, W-1+L]."""
    batch, dim, _ = x.shape
    if initial_state is None:
        initial_state = x.new_zeros(batch, dim, width - 1)
    return torch.cat([initial_state.to(x.dtype), x], dim=-1)


def _activate(y, activation):
    return F.silu(y) if activation is not None else y


def causal_conv1d_ref(x, weight, bias=None, initial_state=None, activation=None, return_final_state=False):
    """Tap-by-tap sum, the specification of ``causal_conv1d``."""
    _check_conv_args("causal_conv1d_ref", x, weight, bias, initial_state, activation)
    length, width = x.shape[-1], weight.shape[1]
    xp = _padded_input(x, initial_state, width)
    y = torch.zeros_like(x)
    for k in range(width):
        y = y + weight[:, k, None].to(x.dtype) * xp[:, :, k:k + length]
    if bias is not None:
        y = y + bias[:, None].to(x.dtype)
    y = _activate(y, activation)
    final_state = xp[:, :, xp.shape[-1] - (width - 1):]
    return (y, final_state) if return_final_state else y


def causal_conv1d_torch(x, weight, bias=None, initial_state=None, activation=None, return_final_state=False):
    """F.conv1d with groups=D on the input left-padded by the state (or zeros)."""
    _check_conv_args("causal_conv1d", x, weight, bias, initial_state, activation)
    dim, width = weight.shape
    xp = _padded_input(x, initial_state, width)
    w = weight.to(x.dtype)[:, None, :]  # [D, 1, W]
    y = F.conv1d(xp, w, bias.to(x.dtype) if bias is not None else None, groups=dim)
    y = _activate(y, activation)
    if not return_final_state:
        return y
    return y, xp[:, :, xp.shape[-1] - (width - 1):]


def causal_conv1d_update_torch(x, conv_state, weight, bias=None, activation=None):
    """One token: x [B, D], conv_state [B, D, W-1]. Returns (y [B, D], new_conv_state)."""
    op = "causal_conv1d_update"
    check_tensor(op, "x", x, (None, None), "[B, D]")
    batch, dim = x.shape
    check_tensor(op, "weight", weight, (dim, None), "[D, W]")
    width = weight.shape[1]
    check_tensor(op, "conv_state", conv_state, (batch, dim, width - 1), "[B, D, W-1]")
    if bias is not None:
        check_tensor(op, "bias", bias, (dim,), "[D]")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{op}: `activation` must be one of {_ACTIVATIONS}, got {activation!r}")
    window = torch.cat([conv_state.to(x.dtype), x[:, :, None]], dim=-1)  # [B, D, W]
    y = (window * weight.to(x.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return _activate(y, activation), window[:, :, 1:]


def _device(t):
    return t.device if isinstance(t, torch.Tensor) else None


def causal_conv1d(x, weight, bias=None, initial_state=None, activation=None, return_final_state=False, backend=None):
    """Causal conv1d with the backend chosen by ``backend``, $STRATA_KERNEL_BACKEND or the device.

    backend: "ref" | "torch" (F.conv1d, default on CPU) | "triton" (default on CUDA) | "mamba_ssm".
    """
    name = resolve_backend("causal_conv1d", backend, _device(x))
    forms = {"ref": causal_conv1d_ref, "torch": causal_conv1d_torch}
    form = forms[name] if name in forms else gpu_form("causal_conv1d", name)
    return form(x, weight, bias, initial_state, activation, return_final_state)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, backend=None):
    """One token with the backend chosen like ``causal_conv1d``'s ("torch" is the reference step)."""
    name = resolve_backend("causal_conv1d_update", backend, _device(x))
    form = causal_conv1d_update_torch if name == "torch" else gpu_form("causal_conv1d_update", name)
    return form(x, conv_state, weight, bias, activation)
