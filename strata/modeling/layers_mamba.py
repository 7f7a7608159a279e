"""The Mamba (selective state-space) mixer with a full-sequence form and a one-token step.

Parameter names follow transformers' ``MambaMixer`` so that its checkpoints convert
one to one. Padding (``token_mask`` 0) zeroes the SSM input, so padded positions
leave conv and SSM states exactly as they were.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from strata.kernels.kernels_conv1d import causal_conv1d, causal_conv1d_update
from strata.kernels.kernels_selective_scan import selective_scan, selective_state_update

CONV_STATE, SSM_STATE = "conv_state", "ssm_state"


class MambaMixer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.config = config
        d, inner, n = config.hidden_size, config.intermediate_ssm_size, config.state_size
        self.inner, self.state_size, self.dt_rank = inner, n, config.time_step_rank
        self.in_proj = nn.Linear(d, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(
            inner, inner, kernel_size=config.conv_kernel, groups=inner,
            padding=config.conv_kernel - 1, bias=config.use_conv_bias,
        )
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.zeros(inner, n))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, d, bias=False)
        self.kernel_backend = config.kernel_backend
        self.chunk_size = config.scan_chunk_size

    def init_mamba_weights(self, init) -> None:
        """S4D-real A, unit D, step sizes log-uniform in [time_step_min, time_step_max]."""
        c = self.config
        A = torch.arange(1, self.state_size + 1, dtype=torch.float32).expand(self.inner, -1)
        init.copy_(self.A_log, torch.log(A))
        init.ones_(self.D)
        std = self.dt_rank**-0.5
        init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(
            torch.rand(self.inner) * (math.log(c.time_step_max) - math.log(c.time_step_min)) + math.log(c.time_step_min)
        ).clamp(min=c.time_step_floor)
        init.copy_(self.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5))
        if self.conv1d.bias is not None:
            init.zeros_(self.conv1d.bias)

    def forward(self, x, position_embeddings=None, attention_mask=None, token_mask=None, cache=None):
        B, T, _ = x.shape
        xz = self.in_proj(x).transpose(1, 2)  # (B, 2I, T)
        u, z = xz.chunk(2, dim=1)
        mask = token_mask[:, None, :].to(u.dtype) if token_mask is not None else None
        if mask is not None:
            u = u * mask
        weight = self.conv1d.weight.squeeze(1)  # (I, W)
        A = -torch.exp(self.A_log.float())
        state = cache.layer(self.layer_idx) if cache is not None else None
        conv_state = state.get(CONV_STATE) if state is not None else None
        ssm_state = state.get(SSM_STATE) if state is not None else None

        if ssm_state is not None and T == 1:
            u1, conv_state = causal_conv1d_update(
                u[:, :, 0], conv_state, weight, self.conv1d.bias, activation="silu", backend=self.kernel_backend
            )
            dbc = self.x_proj(u1)
            dt, Bm, Cm = dbc.split([self.dt_rank, self.state_size, self.state_size], dim=-1)
            dt = dt @ self.dt_proj.weight.t()
            y, ssm_state = selective_state_update(
                ssm_state, u1, dt, A, Bm, Cm, self.D.float(), z=z[:, :, 0],
                dt_bias=self.dt_proj.bias.float(), dt_softplus=True, backend=self.kernel_backend,
            )
            y = y[:, :, None]
        else:
            u, conv_state = causal_conv1d(
                u, weight, self.conv1d.bias, initial_state=conv_state, activation="silu", return_final_state=True,
                backend=self.kernel_backend,
            )
            if mask is not None:
                u = u * mask
            dbc = self.x_proj(u.transpose(1, 2))  # (B, T, R + 2N)
            dt, Bm, Cm = dbc.split([self.dt_rank, self.state_size, self.state_size], dim=-1)
            dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (B, I, T)
            y, ssm_state = selective_scan(
                u, dt, A, Bm.transpose(1, 2), Cm.transpose(1, 2), self.D.float(), z=z,
                delta_bias=self.dt_proj.bias.float(), delta_softplus=True, initial_state=ssm_state,
                return_final_state=True, backend=self.kernel_backend, chunk_size=self.chunk_size,
            )
        if cache is not None:
            cache.set(self.layer_idx, **{CONV_STATE: conv_state, SSM_STATE: ssm_state})
        return self.out_proj(y.transpose(1, 2).to(x.dtype))
