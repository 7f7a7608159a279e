"""The mamba-ssm / causal-conv1d CUDA kernels behind strata's kernel signatures.

The ``mamba_ssm`` backend (kernels_dispatch.py): when those packages are installed and
the tensors are on CUDA, ``selective_scan``, ``selective_state_update``,
``causal_conv1d`` and ``causal_conv1d_update`` can run on the kernels that Mamba's
authors ship, for speed comparisons and as an alternative to strata's Triton kernels.
The adapters keep strata's contract exactly (the twins are ``selective_scan_ref``,
``selective_state_update``, ``causal_conv1d_ref``, ``causal_conv1d_update``):

- mamba-ssm's ``selective_scan_fn`` takes no initial state: a call with one runs on
  strata's Triton scan instead (logged once);
- ``causal_conv1d_fn`` takes an initial state only in channel-last layout: a call with
  one runs on strata's Triton conv instead (logged once); the final state (the last
  W-1 inputs) is sliced by torch;
- the one-token updates of those packages write the state in place; here they work
  on a copy (for the conv, W wide) and return it, as strata's do.

Only checked on a GPU (tests/test_kernels_triton.py, skipped without CUDA and
mamba-ssm); importing this module needs neither package.
"""

from __future__ import annotations

import logging

import torch

from strata.kernels.kernels_conv1d import _check_conv_args
from strata.kernels.kernels_dispatch import require_mamba_ssm
from strata.kernels.kernels_selective_scan import _check_scan_args
from strata.kernels.kernels_triton_conv1d import causal_conv1d_triton
from strata.kernels.kernels_triton_scan import selective_scan_triton

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update as _mamba_state_update
except ImportError:  # optional CUDA extra
    selective_scan_fn = None
    _mamba_state_update = None
try:
    from causal_conv1d import causal_conv1d_fn
    from causal_conv1d import causal_conv1d_update as _cc_update
except ImportError:  # optional CUDA extra
    causal_conv1d_fn = None
    _cc_update = None

logger = logging.getLogger("strata.kernels")
_fallbacks_logged: set[str] = set()


def _fallback(what: str) -> None:
    if what not in _fallbacks_logged:
        _fallbacks_logged.add(what)
        logger.info("mamba_ssm backend: %s; using strata's Triton kernel for such calls", what)


def selective_scan_mamba_ssm(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
    initial_state=None, return_final_state=False, chunk_size=64,
):
    """mamba-ssm's CUDA selective scan with strata's contract (``chunk_size`` is unused by it)."""
    op = "selective_scan_mamba_ssm"
    _check_scan_args(op, u, delta, A, B, C, D, z, delta_bias, initial_state)
    if initial_state is not None:
        _fallback("selective_scan_fn takes no initial state")
        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                     initial_state, return_final_state, chunk_size)
    require_mamba_ssm(op, u.device)
    out = selective_scan_fn(
        u, delta, A.float(), B, C, D.float() if D is not None else None, z,
        delta_bias.float() if delta_bias is not None else None, delta_softplus, return_final_state,
    )
    if not return_final_state:
        return out
    y, last = out
    return y, last.float()


def selective_state_update_mamba_ssm(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True):
    """mamba-ssm's one-token state update (Triton) on a copy of ``state``; returns (y, new_state)."""
    op = "selective_state_update_mamba_ssm"
    _check_scan_args(op, x[:, :, None], dt[:, :, None], A, B[:, :, None], C[:, :, None], D,
                     z[:, :, None] if z is not None else None, dt_bias, state)
    require_mamba_ssm(op, x.device)
    new_state = state.float().clone()
    y = _mamba_state_update(new_state, x, dt, A.float(), B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
    return y, new_state


def causal_conv1d_mamba_ssm(x, weight, bias=None, initial_state=None, activation=None, return_final_state=False):
    """causal-conv1d's CUDA kernel with strata's contract."""
    op = "causal_conv1d_mamba_ssm"
    _check_conv_args(op, x, weight, bias, initial_state, activation)
    if initial_state is not None:
        _fallback("causal_conv1d_fn takes an initial state only in channel-last layout")
        return causal_conv1d_triton(x, weight, bias, initial_state, activation, return_final_state)
    require_mamba_ssm(op, x.device)
    width = weight.shape[1]
    y = causal_conv1d_fn(x, weight.to(x.dtype), bias.to(x.dtype) if bias is not None else None,
                         activation="silu" if activation is not None else None)
    if not return_final_state:
        return y
    length = x.shape[-1]
    if length >= width - 1:
        return y, x[:, :, length - (width - 1):]
    return y, torch.cat([x.new_zeros(*x.shape[:2], width - 1 - length), x], dim=-1)


def causal_conv1d_update_mamba_ssm(x, conv_state, weight, bias=None, activation=None):
    """causal-conv1d's one-token update on a copy of ``conv_state``; returns (y, new_conv_state)."""
    op = "causal_conv1d_update_mamba_ssm"
    _check_conv_args(op, x[:, :, None], weight, bias, conv_state, activation)
    require_mamba_ssm(op, x.device)
    # a W-wide state (oldest column a dummy that shifts out): what every causal-conv1d
    # version accepts (older ones require exactly W, newer ones at least W-1)
    window = torch.cat([conv_state.new_zeros(*conv_state.shape[:2], 1), conv_state], dim=-1).to(x.dtype)
    y = _cc_update(x, window, weight.to(x.dtype), bias.to(x.dtype) if bias is not None else None,
                   activation="silu" if activation is not None else None)
    return y, window[:, :, 1:]


MAMBA_SSM_FORMS = {
    "selective_scan": selective_scan_mamba_ssm,
    "selective_state_update": selective_state_update_mamba_ssm,
    "causal_conv1d": causal_conv1d_mamba_ssm,
    "causal_conv1d_update": causal_conv1d_update_mamba_ssm,
}
