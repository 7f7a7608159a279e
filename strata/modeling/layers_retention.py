"""Multi-scale retention (RetNet), optionally with Mamba-style selective decay.

Per head h with decay gamma_h = 1 - 2^(-5-h) the state is
    S_t = gamma_h S_{t-1} + k_t^T v_t,    o_t = q_t S_t,
computed in parallel, chunkwise or recurrent form (strata.kernels), then normalised
per head (RetNet's GroupNorm) and gated by swish(g). With ``selective_decay`` the
decay of every token and head becomes gamma_{h,t} = exp(delta_{h,t} log gamma_h),
delta = softplus(W x + b) (the Mamba step size), which needs the data-dependent
chunkwise kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from strata.kernels.kernels_retention import retention, retention_step
from strata.modeling.layers_common import HeadRMSNorm, apply_rotary

RETENTION_STATE = "retention_state"
# retention_mode -> kernel backend; chunkwise is the kernels' automatic default, so None
# lets STRATA_KERNEL_BACKEND and the device decide.
_FORM_TO_BACKEND = {"chunkwise": None, "parallel": "parallel", "recurrent": "ref"}


def retnet_log_decay(num_heads: int, device=None) -> torch.Tensor:
    """log gamma_h with gamma_h = 1 - 2^(-5-h), h = 0..H-1 (computed, not stored: no weights)."""
    return torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(num_heads, dtype=torch.float32, device=device)))


class MultiScaleRetention(nn.Module):
    def __init__(self, config, layer_idx: int, selective_decay: bool = False):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.chunk_size = config.chunk_size
        self.form = config.retention_mode
        self.kernel_backend = config.kernel_backend
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.g_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.group_norm = HeadRMSNorm(self.num_heads, self.head_dim, eps=config.rms_norm_eps)
        self.selective_decay = selective_decay
        if selective_decay:
            # delta_{t,h} = softplus(decay_proj(x)); initialised to delta == 1 (plain RetNet decay).
            self.decay_proj = nn.Linear(d, self.num_heads, bias=True)

    def init_selective_decay(self, init) -> None:
        init.zeros_(self.decay_proj.weight)
        init.constant_(self.decay_proj.bias, math.log(math.e - 1.0))

    def _backend(self) -> str | None:
        return self.kernel_backend if self.kernel_backend else _FORM_TO_BACKEND[self.form]

    def forward(self, x, position_embeddings, attention_mask=None, token_mask=None, cache=None):
        B, T, _ = x.shape
        H, Dh = self.num_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(B, T, H, Dh).transpose(1, 2)
        v = self.v_proj(x).view(B, T, H, Dh).transpose(1, 2)
        cos, sin = position_embeddings
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin) * Dh**-0.5
        if token_mask is not None:  # padding must leave the state untouched
            k = k * token_mask[:, None, :, None].to(k.dtype)
        log_decay = retnet_log_decay(H, x.device)  # (H,)
        if self.selective_decay:
            delta = F.softplus(self.decay_proj(x).float())  # (B, T, H)
            log_decay = delta.transpose(1, 2) * log_decay[None, :, None]  # (B, H, T)

        state = cache.layer(self.layer_idx).get(RETENTION_STATE) if cache is not None else None
        if state is not None and T == 1:
            ld = log_decay[:, :, 0] if log_decay.dim() == 3 else log_decay
            o, state = retention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], ld, state)
            o = o[:, :, None]
        else:
            o, state = retention(
                q, k, v, log_decay, initial_state=state, return_final_state=True,
                backend=self._backend(), chunk_size=self.chunk_size,
            )
        if cache is not None:
            cache.set(self.layer_idx, **{RETENTION_STATE: state})
        o = self.group_norm(o.transpose(1, 2).to(x.dtype))  # (B, T, D)
        return self.o_proj(F.silu(self.g_proj(x)) * o)
