"""MT-HOPE (seed 001): a Möbius-twistor recurrent LM with HOPE's test-time memories.

Representation. The residual stream holds one twistor Z = (omega, pi) per token: two
complex vectors of n = dim // 2 channels, stored as real tensors laid out
``[omega_re | omega_im | pi_re | pi_im]`` (width 2 * dim). ``to_complex`` /
``from_complex`` switch to (re, im) pairs of width dim (omega channels, then pi).

Data flow (one direction, top to bottom in this file):

    input_ids -> SpinorEmbedding                        token -> twistor
      -> MTHopeBlock x len(layer_pattern)               pre-norm mixer + residual:
             R: TwistorTitansRecurrent                    complex gated linear recurrence
             I: IncidenceAttention                        twistor-incidence attention
         followed by an AdaptiveMobiusLayer coupling    z -> (az + b)/(cz + d), residual
      -> TwistorSelfModifyingRecurrent (optional)       Titans neural memory: an MLP
                                                          trained by gradient descent at
                                                          test time, chunk-parallel
      -> TwistorMemorySystem (optional)                 slot memory, PhaseCompression
      -> ContinuumMemorySystem                          MLP levels, each with its own
                                                          update period (continual_update)
      -> RMSNorm -> lm_head (tied)                       logits

Every stateful layer keeps its state in the RecurrentCache, so decoding token by token
equals one full forward pass. All scans run in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from strata.configuration.configuration_mt_hope import MTHopeConfig
from strata.modeling.generation_blocks import BlockGenerationMixin
from strata.modeling.layers_common import RMSNorm, SwiGLUMLP, causal_padding_mask
from strata.modeling.modeling_common import StrataPreTrainedModel

# PEFT LoRA targets: every projection of every layer.
LORA_TARGET_MODULES = [
    "in_proj", "gate_proj", "out_proj",  # recurrent blocks, memories
    "q_proj", "k_proj", "v_proj", "o_proj",  # attention, neural memory
    "coef_proj", "coupling_proj",  # Möbius couplings
    "up_proj", "down_proj",  # continuum-memory MLPs
]


# =========================================================================== complex helpers
def to_complex(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[omega_re | omega_im | pi_re | pi_im] (..., 2 dim) -> re, im (..., dim): omega channels, then pi."""
    o_re, o_im, p_re, p_im = x.chunk(4, dim=-1)
    return torch.cat([o_re, p_re], -1), torch.cat([o_im, p_im], -1)


def from_complex(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    o_re, p_re = re.chunk(2, dim=-1)
    o_im, p_im = im.chunk(2, dim=-1)
    return torch.cat([o_re, o_im, p_re, p_im], -1)


def swap_chirality(re: torch.Tensor, im: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(omega, pi) -> (pi, omega)."""
    return torch.cat(re.chunk(2, -1)[::-1], -1), torch.cat(im.chunk(2, -1)[::-1], -1)


def cmul(ar, ai, br, bi):
    return ar * br - ai * bi, ar * bi + ai * br


def cdiv(ar, ai, br, bi, eps: float = 0.0):
    den = br * br + bi * bi + eps
    return (ar * br + ai * bi) / den, (ai * br - ar * bi) / den


def csqrt(re, im):
    """Principal square root for Re > 0 (all this file needs): sqrt((|z| + re) / 2) + i im / (2 that).

    This form is smooth there; the textbook one takes sqrt(|z| - re), whose gradient is
    infinite on the positive real axis.
    """
    mod = torch.sqrt(re * re + im * im)
    out_re = torch.sqrt((mod + re) / 2)
    return out_re, im / (2 * out_re)


# =========================================================================== scans
def chunked_scan(log_decay, x_re, x_im=None, angle=None, h0_re=None, h0_im=None, chunk_size: int = 16):
    """All states of h_t = exp(log_decay_t + i angle_t) h_{t-1} + x_t, t = 0..T-1, in fp32.

    x_re, x_im: (B, T, *S) real and imaginary parts (x_im None: a real scan);
    log_decay, angle: (B, T, *S') broadcastable to x, log_decay in [-2, 0] per token;
    h0: (B, *S). Returns (h_re, h_im, last_re, last_im) (imaginary parts None for a real scan).

    Within a chunk of C tokens, with L_t, P_t the cumulative log-decay and angle,
    h_t = e^{L_t + i P_t} (h_0 + sum_{s<=t} e^{-L_s - i P_s} x_s); the largest term is
    s = t, so the e^{-L} factor (<= e^{2C}) costs no precision. A loop carries the
    state from chunk to chunk.
    """
    B, T = x_re.shape[:2]
    rest = x_re.shape[2:]
    C = min(chunk_size, T)  # the result does not depend on the chunking: no padding for short inputs
    pad = (-T) % C
    is_complex = x_im is not None or angle is not None or h0_im is not None
    f32 = torch.float32
    x_re = x_re.to(f32)
    x_im = torch.zeros_like(x_re) if (is_complex and x_im is None) else (x_im.to(f32) if x_im is not None else None)
    log_decay = log_decay.to(f32).expand(B, T, *log_decay.shape[2:])
    if angle is not None:
        angle = angle.to(f32).expand(B, T, *angle.shape[2:])

    def chunks(t):
        if t is None:
            return None
        if pad:
            t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(B, (T + pad) // C, C, *t.shape[2:])

    ld, xr, xi, ang = chunks(log_decay), chunks(x_re), chunks(x_im), chunks(angle)
    L = ld.cumsum(2)
    grow = torch.exp(-L)
    if ang is not None:
        P = ang.cumsum(2)
        cos, sin = torch.cos(P), torch.sin(P)
        # e^{-L_s - i P_s} x_s
        yr, yi = grow * (xr * cos + xi * sin), grow * (xi * cos - xr * sin)
    else:
        yr = grow * xr
        yi = grow * xi if xi is not None else None
    cr = yr.cumsum(2)
    ci = yi.cumsum(2) if yi is not None else None

    nc = xr.shape[1]
    shape = (B, *rest)
    hr = torch.zeros(shape, dtype=f32, device=xr.device) if h0_re is None else h0_re.to(f32).expand(shape)
    hi = None
    if is_complex:
        hi = torch.zeros(shape, dtype=f32, device=xr.device) if h0_im is None else h0_im.to(f32).expand(shape)
    starts_r, starts_i = [], []
    decay = torch.exp(L)
    for c in range(nc):  # carry: h0 of chunk c + 1 = state at the end of chunk c
        starts_r.append(hr)
        if is_complex:
            starts_i.append(hi)
            if ang is None:
                ar, ai = decay[:, c, -1].expand_as(hr), torch.zeros_like(hr)
            else:
                ar, ai = decay[:, c, -1] * cos[:, c, -1], decay[:, c, -1] * sin[:, c, -1]
            hr, hi = cmul(ar, ai, hr + cr[:, c, -1], hi + ci[:, c, -1])
        else:
            hr = decay[:, c, -1] * (hr + cr[:, c, -1])
    s_r = torch.stack(starts_r, 1)[:, :, None] + cr
    if is_complex:
        s_i = torch.stack(starts_i, 1)[:, :, None] + ci
        if ang is not None:
            out_r, out_i = cmul(decay * cos, decay * sin, s_r, s_i)
        else:
            out_r, out_i = decay * s_r, decay * s_i
        out_i = out_i.reshape(B, T + pad, *rest)[:, :T]
    else:
        out_r, out_i = decay * s_r, None
    out_r = out_r.reshape(B, T + pad, *rest)[:, :T]
    return out_r, out_i, hr, hi


# =========================================================================== embedding
class SpinorEmbedding(nn.Module):
    """Token -> twistor (omega, pi) in C^n x C^n, width 2 * dim.

    A lookup table (tied with the LM head) gives the raw components; ``spinor`` then
    rotates pi by a learned relative phase per channel, e^{i phi}, which fixes the
    relative orientation of the two spinors (it is also applied to ``inputs_embeds``).
    """

    def __init__(self, config: MTHopeConfig):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.pi_phase = nn.Parameter(torch.zeros(config.dim // 2))

    def init_custom_(self, init, std):
        init.zeros_(self.pi_phase)

    def spinor(self, e: torch.Tensor) -> torch.Tensor:
        o_re, o_im, p_re, p_im = e.chunk(4, dim=-1)
        c, s = torch.cos(self.pi_phase).to(e.dtype), torch.sin(self.pi_phase).to(e.dtype)
        p_re, p_im = p_re * c - p_im * s, p_re * s + p_im * c
        return torch.cat([o_re, o_im, p_re, p_im], -1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.spinor(self.embed(input_ids))


# =========================================================================== Möbius
def mobius_apply(z_re, z_im, coefs, guard: float):
    """w = (a z + b) / (c z + d), elementwise; where |c z + d| < ``guard`` (near the pole) the
    denominator is lengthened to modulus ``guard`` in the same direction, elsewhere the map is exact."""
    (ar, ai), (br, bi), (cr, ci), (dr, di) = coefs
    nr, ni = cmul(ar, ai, z_re, z_im)
    nr, ni = nr + br, ni + bi
    dr_, di_ = cmul(cr, ci, z_re, z_im)
    dr_, di_ = dr_ + dr, di_ + di
    mod = torch.sqrt(dr_ * dr_ + di_ * di_ + 1e-12)
    scale = torch.clamp(guard / mod, min=1.0)  # |den'| = max(|den|, guard)
    at_pole = mod < 1e-5  # no direction to lengthen: use the positive real one
    dr_ = torch.where(at_pole, torch.full_like(dr_, guard), dr_ * scale)
    di_ = torch.where(at_pole, torch.zeros_like(di_), di_ * scale)
    return cdiv(nr, ni, dr_, di_)


def mobius_inverse(w_re, w_im, coefs):
    """z = (d w - b) / (-c w + a): the inverse map (exact where the guard was inactive)."""
    (ar, ai), (br, bi), (cr, ci), (dr, di) = coefs
    nr, ni = cmul(dr, di, w_re, w_im)
    nr, ni = nr - br, ni - bi
    er, ei = cmul(-cr, -ci, w_re, w_im)
    return cdiv(nr, ni, er + ar, ei + ai)


def mobius_coefficients(raw: torch.Tensor, max_shift: float, dim: int = -2):
    """raw (..., 8, N) (the 8 real numbers along ``dim``) -> normalised (a, b, c, d), complex, with ad - bc = 1.

    a = 1 + da, d = 1 + dd, b = db, c = dc, each |d.| <= s = max_shift (tanh bounds), so
    |ad - bc| >= 1 - 2s > 0 and the matrix [[a, b], [c, d]] has entries of modulus
    <= 1 + s: the map is invertible with a bounded condition number. Dividing by
    sqrt(ad - bc) (Re(ad - bc) > 0 for s <= 0.35, away from the branch cut) leaves the
    map unchanged and puts the matrix in SL(2, C).
    """
    d = torch.tanh(raw) * (max_shift / math.sqrt(2.0))
    ar, ai, br, bi, cr, ci, dr, di = d.unbind(dim)
    ar, dr = ar + 1, dr + 1
    detr, deti = cmul(ar, ai, dr, di)
    bcr, bci = cmul(br, bi, cr, ci)
    sr, si = csqrt(detr - bcr, deti - bci)
    return tuple(cdiv(pr, pi_, sr, si) for pr, pi_ in ((ar, ai), (br, bi), (cr, ci), (dr, di)))


class AdaptiveMobiusLayer(nn.Module):
    """The seed's topological coupling between layers, as a residual update.

    z = twistor of RMSNorm(x) (dim complex channels). For cycle k = 0..K-1:
    conjugate z on odd cycles (``mobius_conjugate``), apply the Möbius map with
    coefficients base_k + (per-token modulation) x direction_k, then swap omega and pi
    (``mobius_chirality_flip``) before the next cycle; the last swap is undone, so
    omega stays omega. The layer returns x + out_proj(kappa * (w - z)), kappa =
    sigmoid(coupling_proj(x)) per channel: the adaptive coupling rate; the residual
    path lets depth train, and with identity maps the layer is the identity.
    """

    def __init__(self, config: MTHopeConfig):
        super().__init__()
        self.cycles = config.num_mobius_cycles
        self.flip = config.mobius_chirality_flip
        self.conjugate = config.mobius_conjugate
        self.max_shift = config.mobius_max_shift
        self.guard = 0.25
        h, n = config.hidden_size, config.dim
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.coef_base = nn.Parameter(torch.zeros(self.cycles, 8, n))
        self.coef_dir = nn.Parameter(torch.zeros(self.cycles, 8, n))
        self.coef_proj = nn.Linear(h, self.cycles * 8, bias=False)
        self.coupling_proj = nn.Linear(h, h, bias=True)
        self.out_proj = nn.Linear(h, h, bias=False)

    def init_custom_(self, init, std):
        init.normal_(self.coef_base, std=0.3)
        init.normal_(self.coef_dir, std=0.3)
        init.constant_(self.coupling_proj.bias, -2.0)

    def coefficients(self, u: torch.Tensor):
        """Per cycle, the normalised (a, b, c, d) for every token and channel of u = RMSNorm(x)."""
        mod = self.coef_proj(u).float().unflatten(-1, (self.cycles, 8))  # (B, T, K, 8)
        raw = self.coef_base.float() + mod[..., None] * self.coef_dir.float()  # (B, T, K, 8, n)
        return [mobius_coefficients(raw[..., k, :, :], self.max_shift) for k in range(self.cycles)]

    def transform(self, z_re, z_im, coefs):
        for k, ck in enumerate(coefs):
            if self.conjugate and k % 2 == 1:
                z_im = -z_im
            z_re, z_im = mobius_apply(z_re, z_im, ck, self.guard)
            if self.flip and k < self.cycles - 1:
                z_re, z_im = swap_chirality(z_re, z_im)
        if self.flip and (self.cycles - 1) % 2 == 1:
            z_re, z_im = swap_chirality(z_re, z_im)
        return z_re, z_im

    def inverse(self, w_re, w_im, coefs):
        """Inverse of ``transform`` (where no denominator guard was active)."""
        if self.flip and (self.cycles - 1) % 2 == 1:
            w_re, w_im = swap_chirality(w_re, w_im)
        for k in reversed(range(self.cycles)):
            if self.flip and k < self.cycles - 1:
                w_re, w_im = swap_chirality(w_re, w_im)
            w_re, w_im = mobius_inverse(w_re, w_im, coefs[k])
            if self.conjugate and k % 2 == 1:
                w_im = -w_im
        return w_re, w_im

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.norm(x)
        z_re, z_im = to_complex(u.float())
        w_re, w_im = self.transform(z_re, z_im, self.coefficients(u))
        delta = (from_complex(w_re, w_im) - from_complex(z_re, z_im)).to(x.dtype)
        kappa = torch.sigmoid(self.coupling_proj(u))
        return x + self.out_proj(kappa * delta)


# =========================================================================== recurrent layer
REC_RE, REC_IM = "rec_re", "rec_im"


class TwistorTitansRecurrent(nn.Module):
    """Complex diagonal gated linear recurrence over the twistor channels.

    Per complex channel j and token t, with dt_t = 2 sigmoid(W_dt u_t) (step size),
    lambda_t = exp(-dt_t A_j + i dt_t theta_j) (|lambda| >= e^{-2}):
        h_t = lambda_t h_{t-1} + (1 - |lambda_t|) v_t,     v_t = in_proj(u_t) (complex)
        y_t = out_proj(silu(gate_proj(u_t)) * [h_t as real])
    A_j in (0, 1) and the rotation frequencies theta_j are learned. Padding tokens get
    dt = 0, which leaves the state untouched. ``bidirectional`` (encoders only) adds
    the same recurrence run from the end of the sequence.
    """

    def __init__(self, config: MTHopeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.chunk_size = config.chunk_size
        self.bidirectional = config.bidirectional
        h, n = config.hidden_size, config.dim
        self.in_proj = nn.Linear(h, h, bias=False)
        self.dt_proj = nn.Linear(h, n, bias=True)
        self.gate_proj = nn.Linear(h, h, bias=False)
        self.out_proj = nn.Linear(h, h, bias=False)
        self.decay_logit = nn.Parameter(torch.zeros(n))  # A = sigmoid(decay_logit)
        self.frequency = nn.Parameter(torch.zeros(n))

    def init_custom_(self, init, std):
        n = self.decay_logit.numel()
        # A spread over (0.01, 0.9): slow and fast channels; rotary-like frequencies.
        a = torch.linspace(0.01, 0.9, n)
        init.copy_(self.decay_logit, torch.log(a / (1 - a)))
        init.copy_(self.frequency, 1.0 / (10000.0 ** (torch.arange(n, dtype=torch.float32) / n)))
        init.zeros_(self.dt_proj.bias)

    def _scan(self, u, token_mask, h0_re=None, h0_im=None):
        dt = 2 * torch.sigmoid(self.dt_proj(u).float())  # (B, T, n)
        if token_mask is not None:
            dt = dt * token_mask[..., None].float()
        log_r = -dt * torch.sigmoid(self.decay_logit.float())
        angle = dt * self.frequency.float()
        v_re, v_im = to_complex(self.in_proj(u).float())
        w = 1 - torch.exp(log_r)
        return chunked_scan(log_r, w * v_re, w * v_im, angle, h0_re, h0_im, self.chunk_size)

    def forward(self, u, positions=None, attention_mask=None, token_mask=None, cache=None):
        state = cache.layer(self.layer_idx) if cache is not None else None
        h0_re = state.get(REC_RE) if state is not None else None
        h0_im = state.get(REC_IM) if state is not None else None
        h_re, h_im, last_re, last_im = self._scan(u, token_mask, h0_re, h0_im)
        if self.bidirectional:
            flip = (lambda t: None if t is None else t.flip(1))
            b_re, b_im, _, _ = self._scan(u.flip(1), flip(token_mask))
            h_re, h_im = h_re + b_re.flip(1), h_im + b_im.flip(1)
        if cache is not None:
            cache.set(self.layer_idx, **{REC_RE: last_re, REC_IM: last_im})
        y = from_complex(h_re, h_im).to(u.dtype)
        return self.out_proj(F.silu(self.gate_proj(u)) * y)


# =========================================================================== attention
class IncidenceAttention(nn.Module):
    """Causal attention scored by the twistor incidence of query and key, plus a Möbius term.

    Per head, queries and keys are twistors Q = (q_omega, q_pi), K = (k_omega, k_pi),
    rotated by e^{i p f} at position p (so the score depends on relative position).
    The incidence I(Q, K) = sum_j q_omega_j conj(k_pi_j) + q_pi_j conj(k_omega_j)
    (the twistor Hermitian form, which vanishes when the two twistor lines meet);
    score = s Re I + w_h Re mu_h(s I), mu_h a per-head Möbius map (bounded as in
    ``mobius_coefficients``), s = 1 / sqrt(channels).
    """

    def __init__(self, config: MTHopeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.channels = config.dim // 2 // self.num_heads  # complex channels per head per component
        self.max_shift = config.mobius_max_shift
        h = config.hidden_size
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)
        self.mobius_raw = nn.Parameter(torch.zeros(8, self.num_heads))
        self.mobius_weight = nn.Parameter(torch.zeros(self.num_heads))

    def init_custom_(self, init, std):
        init.normal_(self.mobius_raw, std=0.3)
        init.constant_(self.mobius_weight, 0.1)

    def _heads(self, x, positions):
        """(B, T, 2 dim) -> (B, H, T, 4 c): [omega_re, omega_im, pi_re, pi_im] per head, rotated."""
        B, T, _ = x.shape
        H, c = self.num_heads, self.channels
        parts = [p.reshape(B, T, H, c) for p in x.float().chunk(4, -1)]
        freq = 1.0 / (10000.0 ** (torch.arange(c, dtype=torch.float32, device=x.device) / c))
        ang = positions[..., None, None].float() * freq  # (B, T, 1, c)
        cos, sin = torch.cos(ang), torch.sin(ang)
        o_re, o_im = cmul(parts[0], parts[1], cos, sin)
        p_re, p_im = cmul(parts[2], parts[3], cos, sin)
        return torch.cat([o_re, o_im, p_re, p_im], -1).transpose(1, 2)

    def incidence(self, q, k):
        """Re and Im of I(Q, K) for all query/key pairs: (B, H, T, S) each."""
        q_or, q_oi, q_pr, q_pi = q.chunk(4, -1)
        k_or, k_oi, k_pr, k_pi = k.chunk(4, -1)
        kk = torch.cat([k_pr, k_pi, k_or, k_oi], -1).transpose(-1, -2)
        re = torch.cat([q_or, q_oi, q_pr, q_pi], -1) @ kk
        im = torch.cat([q_oi, -q_or, q_pi, -q_pr], -1) @ kk
        return re, im

    def forward(self, u, positions, attention_mask=None, token_mask=None, cache=None):
        B, T, _ = u.shape
        q = self._heads(self.q_proj(u), positions)
        k = self._heads(self.k_proj(u), positions)
        v = self.v_proj(u).float().view(B, T, self.num_heads, -1).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        scale = (2 * self.channels) ** -0.5
        re, im = self.incidence(q, k)
        re, im = re * scale, im * scale
        coefs = mobius_coefficients(self.mobius_raw.float()[:, :, None, None], self.max_shift, dim=0)
        mu_re, _ = mobius_apply(re, im, coefs, guard=0.25)
        scores = re + self.mobius_weight.float()[:, None, None] * mu_re
        S = k.shape[2]
        mask = causal_padding_mask(attention_mask, T, S, u.device)
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=u.device).tril(S - T)[None, None]
        scores = scores.masked_fill(~mask, float("-inf"))
        o = scores.softmax(-1) @ v  # (B, H, T, Dh)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1).to(u.dtype))


# =========================================================================== neural memory (Titans / HOPE)
NM_KEYS = ("grad_w1", "grad_w2", "w1", "w2", "s1", "s2")
NM_POS = "memory_pos"
THETA_MAX, ALPHA_MAX = 1.0, 0.5
# Largest norm of one token's test-time gradient (W1 and W2 of a head together): larger ones
# are scaled down to it. At initialisation the norms are ~0.07-0.18; without the bound a memory
# whose weights have grown can take a step past the loss's curvature limit and diverge.
MEMORY_GRAD_CLIP = 1.0


def _silu_grad(z):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _lower_decay(log_g):
    """D[..., t, s] = prod_{s < j <= t} g_j for s <= t, else 0, from log g (..., C)."""
    L = log_g.cumsum(-1)
    diff = L[..., :, None] - L[..., None, :]
    C = log_g.shape[-1]
    keep = torch.ones(C, C, dtype=torch.bool, device=log_g.device).tril()
    return torch.exp(diff.masked_fill(~keep, float("-inf")))


def neural_memory_chunk(q, k, v, log_eta, theta, log_beta, m, grad_w, w, s):
    """One chunk of Titans test-time learning; everything (B, H, ...), fp32.

    Memory per head: M(x) = x + W2 g silu(W1 x), g = 1/sqrt(F) (F hidden units: keeps the
    curvature of the loss in W2 O(1)), loss l_t = 1/2 ||M(k_t) - v_t||^2.
    Gradients of every token of the chunk are taken at ``grad_w`` = (W1, W2) of the
    chunk start (Titans' chunk-parallel form), each clipped to norm ``MEMORY_GRAD_CLIP``
    (a per-token factor, so the chunk form still equals the token recurrence). Momentum and
    forgetting:
        S_t = eta_t S_{t-1} - theta_t grad_t,    W_t = beta_t W_{t-1} + m_t S_t
    (beta = 1 - alpha; m = 0 marks padding slots: no change at all). Unrolled,
    W_t = a_t W_0 + b_t S_0 + sum_s c_ts g_s with C x C coefficient matrices, so the
    outputs M_t(q_t) of all tokens come from a few matmuls.
    q, k, v: (B, H, C, D); log_eta, theta, log_beta, m: (B, H, C);
    grad_w, w, s: pairs (W1 (B, H, F, D), W2 (B, H, D, F)).
    Returns outputs (B, H, C, D) and the end-of-chunk (w, s).
    """
    gw1, gw2 = grad_w
    w1, w2 = w
    s1, s2 = s
    # gradients at the chunk-start weights
    g = gw1.shape[-2] ** -0.5
    zk = k @ gw1.transpose(-1, -2)  # (B, H, C, F)
    hk = g * F.silu(zk)
    err = k + hk @ gw2.transpose(-1, -2) - v  # dl/dM(k): (B, H, C, D)
    delta = g * (err @ gw2) * _silu_grad(zk)  # (B, H, C, F): g_W1 = delta k^T, g_W2 = err hk^T
    # clip each token's gradient to MEMORY_GRAD_CLIP: ||g||^2 = |delta|^2 |k|^2 + |err|^2 |hk|^2
    # (clamped before the root: padding slots have a zero gradient, where sqrt has no derivative)
    norm = ((delta**2).sum(-1) * (k**2).sum(-1) + (err**2).sum(-1) * (hk**2).sum(-1)).clamp_min(1e-24).sqrt()
    clip = (MEMORY_GRAD_CLIP / norm).clamp(max=1.0)[..., None]
    delta, err = delta * clip, err * clip
    # coefficients
    Deta = _lower_decay(log_eta)  # (B, H, C, C)
    Dbeta = _lower_decay(log_beta)
    Peta = log_eta.cumsum(-1).exp()  # prod_{j<=r} eta_j
    a = log_beta.cumsum(-1).exp()  # (B, H, C)
    Dm = Dbeta * m[..., None, :]
    b = (Dm @ Peta[..., None])[..., 0]  # (B, H, C)
    coef = -(Dm @ Deta) * theta[..., None, :]  # c_ts (B, H, C, C)
    # outputs: layer 1
    z = a[..., None] * (q @ w1.transpose(-1, -2)) + b[..., None] * (q @ s1.transpose(-1, -2))
    z = z + (coef * (q @ k.transpose(-1, -2))) @ delta
    hq = g * F.silu(z)
    o = a[..., None] * (hq @ w2.transpose(-1, -2)) + b[..., None] * (hq @ s2.transpose(-1, -2))
    o = q + o + (coef * (hq @ hk.transpose(-1, -2))) @ err
    # end-of-chunk state
    cl = coef[..., -1, :]  # (B, H, C)
    dk = (delta * cl[..., None]).transpose(-1, -2)  # (B, H, F, C)
    de = (err * cl[..., None]).transpose(-1, -2)  # (B, H, D, C)
    new_w1 = a[..., -1, None, None] * w1 + b[..., -1, None, None] * s1 + dk @ k
    new_w2 = a[..., -1, None, None] * w2 + b[..., -1, None, None] * s2 + de @ hk
    ce = -(Deta[..., -1, :] * theta)  # S_C = P_C S_0 + sum_s ce_s g_s
    new_s1 = Peta[..., -1, None, None] * s1 + (delta * ce[..., None]).transpose(-1, -2) @ k
    new_s2 = Peta[..., -1, None, None] * s2 + (err * ce[..., None]).transpose(-1, -2) @ hk
    return o, (new_w1, new_w2), (new_s1, new_s2)


class TwistorSelfModifyingRecurrent(nn.Module):
    """HOPE's self-modifying Titans: a neural memory that learns at test time.

    Per head, an MLP memory M(x) = x + W2 silu(W1 x) / sqrt(F) is trained while it reads, by
    gradient descent on the associative loss 1/2 ||M(k_t) - v_t||^2, with momentum and
    forgetting that the model itself computes from every token (its own update rule):
        theta_t (step size), eta_t (momentum), alpha_t (forgetting) = sigmoid(W u_t + b) (scaled)
        S_t = eta_t S_{t-1} - theta_t grad l_t(W),   W_t = (1 - alpha_t) W_{t-1} + S_t
        y_t = M_t(q_t)
    Gradients inside a chunk of ``memory_chunk_size`` = C tokens are taken at the weights
    of the chunk start (Titans' chunk-parallel training form), so a chunk sums C
    gradients at the same point: theta_t <= 1 / C keeps that step stable (keys are
    unit vectors; heavy-ball momentum is stable for theta * curvature < 2). Chunks are aligned to
    each row's token count, so one forward, a two-part prefill and token-by-token
    decoding compute the same thing. The initial W1, W2 are trained by backprop (the
    outer level); the cache holds the current W, the momentum S, the chunk-start W and
    the row's token count.
    """

    def __init__(self, config: MTHopeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads = config.memory_heads
        self.head_dim = config.hidden_size // config.memory_heads
        self.mem_hidden = config.memory_hidden_size
        self.chunk_size = config.memory_chunk_size
        h = config.hidden_size
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.gate_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)
        self.lr_proj = nn.Linear(h, 3 * self.heads, bias=False)  # theta, eta, alpha
        self.lr_bias = nn.Parameter(torch.zeros(3, self.heads))
        self.init_w1 = nn.Parameter(torch.zeros(self.heads, self.mem_hidden, self.head_dim))
        self.init_w2 = nn.Parameter(torch.zeros(self.heads, self.head_dim, self.mem_hidden))

    def init_custom_(self, init, std):
        init.normal_(self.init_w1, std=self.head_dim**-0.5)
        init.normal_(self.init_w2, std=0.02)
        bias = torch.tensor([[-1.0], [1.0], [-4.0]]).expand(3, self.heads)  # theta ~0.27, eta ~0.73, alpha ~0.01
        init.copy_(self.lr_bias, bias)

    def project(self, u, token_mask):
        """q, k, v (B, H, T, D) and log_eta, theta, log_beta, m (B, H, T) in fp32."""
        B, T, _ = u.shape
        heads = lambda t: t.float().view(B, T, self.heads, self.head_dim).transpose(1, 2)
        q = F.normalize(heads(self.q_proj(u)), dim=-1)
        k = F.normalize(heads(self.k_proj(u)), dim=-1)
        v = heads(self.v_proj(u))
        g = self.lr_proj(u).float().view(B, T, 3, self.heads) + self.lr_bias.float()
        g = g.permute(2, 0, 3, 1)  # (3, B, H, T)
        m = torch.ones_like(g[0]) if token_mask is None else token_mask[:, None, :].float().expand_as(g[0])
        theta = (THETA_MAX / self.chunk_size) * torch.sigmoid(g[0]) * m
        log_eta = F.logsigmoid(g[1]) * m
        log_beta = torch.log1p(-ALPHA_MAX * torch.sigmoid(g[2])) * m
        return q, k, v, log_eta, theta, log_beta, m

    def initial_state(self, B, device):
        w1 = self.init_w1.float()[None].expand(B, -1, -1, -1)
        w2 = self.init_w2.float()[None].expand(B, -1, -1, -1)
        z1, z2 = torch.zeros_like(w1), torch.zeros_like(w2)
        pos = torch.zeros(B, dtype=torch.long, device=device)
        return dict(grad_w1=w1, grad_w2=w2, w1=w1, w2=w2, s1=z1, s2=z2, memory_pos=pos)

    def memorize(self, q, k, v, log_eta, theta, log_beta, m, state):
        """Run the memory over (B, H, T, .) inputs whose padding slots have m = 0.

        Real tokens are placed on a grid aligned to their position in the row
        (slot = pos0 % C + rank among the row's real tokens), so chunk boundaries fall
        at multiples of C in every row whatever its padding. Returns outputs (B, H, T, D)
        (zeros at padding) and the new state.
        """
        B, H, T, D = q.shape
        C = self.chunk_size
        real = m[:, 0] > 0  # (B, T)
        rank = real.long().cumsum(-1) - 1
        n = real.sum(-1)
        pos0 = state[NM_POS]
        off = pos0 % C
        length = int((off + n).max())
        n_chunks = max(1, -(-length // C))
        Lp = n_chunks * C
        slot = torch.where(real, off[:, None] + rank, torch.full_like(rank, Lp))  # padding -> dummy slot Lp

        def scatter(t, fill=0.0):  # (B, H, T, ...) -> (B, H, Lp, ...)
            shape = (B, H, Lp + 1, *t.shape[3:])
            out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
            idx = slot[:, None].expand(B, H, T)
            idx = idx.reshape(B, H, T, *([1] * (t.dim() - 3))).expand_as(t)
            return out.scatter(2, idx, t)[:, :, :Lp]

        qs, ks, vs = scatter(q), scatter(k), scatter(v)
        ls_eta, th, ls_beta, ms = scatter(log_eta), scatter(theta), scatter(log_beta), scatter(m)
        w = (state["w1"], state["w2"])
        s = (state["s1"], state["s2"])
        at_boundary = (off == 0)[:, None, None, None]
        grad_w = (torch.where(at_boundary, w[0], state["grad_w1"]), torch.where(at_boundary, w[1], state["grad_w2"]))
        outs, grads = [], []
        for c in range(n_chunks):
            if c > 0:
                grad_w = w
            grads.append(grad_w)
            sl = slice(c * C, (c + 1) * C)
            o, w, s = neural_memory_chunk(qs[:, :, sl], ks[:, :, sl], vs[:, :, sl], ls_eta[:, :, sl], th[:, :, sl],
                                          ls_beta[:, :, sl], ms[:, :, sl], grad_w, w, s)
            outs.append(o)
        out = torch.cat(outs, 2)  # (B, H, Lp, D)
        gather = slot.clamp(max=Lp - 1)[:, None, :, None].expand(B, H, T, D)
        y = out.gather(2, gather) * real[:, None, :, None]
        # the chunk-start weights of the chunk holding each row's last real token
        last = ((off + n - 1).clamp(min=0) // C)[:, None, None, None]
        g1 = torch.stack([g[0] for g in grads], 1)  # (B, n_chunks, H, F, D)
        g2 = torch.stack([g[1] for g in grads], 1)
        pick = lambda g: g.gather(1, last[:, None].expand(B, 1, *g.shape[2:]))[:, 0]
        new = dict(grad_w1=pick(g1), grad_w2=pick(g2), w1=w[0], w2=w[1], s1=s[0], s2=s[1], memory_pos=pos0 + n)
        return y, new

    def memorize_one(self, q, k, v, log_eta, theta, log_beta, m, state):
        """``memorize`` for one real token per row (decoding): a chunk of one slot, no layout.

        Padding slots of a chunk contribute nothing, so the token's own slot is all that
        ``memorize`` would compute; the chunk-start weights are the current ones when the
        token opens a chunk.
        """
        at_boundary = (state[NM_POS] % self.chunk_size == 0)[:, None, None, None]
        grad_w = (torch.where(at_boundary, state["w1"], state["grad_w1"]),
                  torch.where(at_boundary, state["w2"], state["grad_w2"]))
        y, w, s = neural_memory_chunk(q, k, v, log_eta, theta, log_beta, m, grad_w,
                                      (state["w1"], state["w2"]), (state["s1"], state["s2"]))
        new = dict(grad_w1=grad_w[0], grad_w2=grad_w[1], w1=w[0], w2=w[1], s1=s[0], s2=s[1],
                   memory_pos=state[NM_POS] + 1)
        return y, new

    def forward(self, u, positions=None, attention_mask=None, token_mask=None, cache=None):
        B, T, _ = u.shape
        layer = cache.layer(self.layer_idx) if cache is not None else None
        if layer is not None and layer.get(NM_POS) is not None:
            state = {key: layer.get(key) for key in NM_KEYS + (NM_POS,)}
        else:
            state = self.initial_state(B, u.device)
        q, k, v, log_eta, theta, log_beta, m = self.project(u, token_mask)
        if T == 1 and token_mask is None:
            y, new = self.memorize_one(q, k, v, log_eta, theta, log_beta, m, state)
        else:
            y, new = self.memorize(q, k, v, log_eta, theta, log_beta, m, state)
        if cache is not None:
            cache.set(self.layer_idx, **new)
        y = y.transpose(1, 2).reshape(B, T, -1).to(u.dtype)
        return self.o_proj(F.silu(self.gate_proj(u)) * y)


# =========================================================================== memory system
MS_RE, MS_IM = "slots_re", "slots_im"


class PhaseCompression(nn.Module):
    """Complex vector -> magnitude and a compressed phase -> complex vector.

    The phase e^{i phi} of N channels is encoded as rank numbers (enc of (cos, sin)),
    decoded back to a unit phasor per channel; the magnitude passes unchanged. A
    written value thus carries N + rank numbers instead of 2N.
    """

    def __init__(self, channels: int, rank: int):
        super().__init__()
        self.enc = nn.Linear(2 * channels, rank, bias=False)
        self.dec = nn.Linear(rank, 2 * channels, bias=True)

    def forward(self, re, im):
        mag = torch.sqrt(re * re + im * im + 1e-8)
        code = self.enc(torch.cat([re / mag, im / mag], -1))
        c, s = self.dec(code).chunk(2, -1)
        norm = torch.sqrt(c * c + s * s + 1e-8)
        return mag * c / norm, mag * s / norm


class TwistorMemorySystem(nn.Module):
    """``num_memories`` complex slots updated recurrently, M <- f(M, h, alpha).

    Per token: a value w_t (complex, optionally through PhaseCompression), an address
    p_t = softmax over slots, a rate alpha_t = a_max sigmoid(.) and per slot
    a_tk = alpha_t p_tk. One update is M_k <- (1 - a) M_k + a w; ``num_memory_cycles``
    = c repeated updates collapse exactly to
        M_tk = (1 - a_tk)^c M_{t-1,k} + (1 - (1 - a_tk)^c) w_t
    (a_max keeps (1 - a)^c >= e^{-2}, what the chunked scan needs). The read is
    attention over the slots: r_t = sum_k softmax_k(Re <q_t, M_tk> / sqrt(dim)) M_tk.
    """

    def __init__(self, config: MTHopeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.slots = config.num_memories
        self.cycles = config.num_memory_cycles
        self.chunk_size = config.chunk_size
        self.rate_max = 1.0 - math.exp(-2.0 / self.cycles)
        h, n = config.hidden_size, config.dim
        self.in_proj = nn.Linear(h, h, bias=False)  # value written
        self.q_proj = nn.Linear(h, h, bias=False)  # read query
        self.gate_proj = nn.Linear(h, self.slots + 1, bias=True)  # slot address logits + rate logit
        self.out_proj = nn.Linear(h, h, bias=False)
        self.compression = PhaseCompression(n, config.phase_rank) if config.phase_compression else None

    def updates(self, u, token_mask):
        """log retention (B, T, K, 1) and the written increment (B, T, K, dim) x2 per token."""
        g = self.gate_proj(u).float()
        address = g[..., : self.slots].softmax(-1)
        rate = self.rate_max * torch.sigmoid(g[..., self.slots :])  # (B, T, 1)
        a = rate * address
        if token_mask is not None:
            a = a * token_mask[..., None].float()
        log_keep = self.cycles * torch.log1p(-a)  # (B, T, K)
        w_re, w_im = to_complex(self.in_proj(u).float())
        if self.compression is not None:
            w_re, w_im = self.compression(w_re, w_im)
        written = (1 - torch.exp(log_keep))[..., None]  # (B, T, K, 1)
        return log_keep[..., None], written * w_re[:, :, None], written * w_im[:, :, None]

    def forward(self, u, positions=None, attention_mask=None, token_mask=None, cache=None):
        layer = cache.layer(self.layer_idx) if cache is not None else None
        h0_re = layer.get(MS_RE) if layer is not None else None
        h0_im = layer.get(MS_IM) if layer is not None else None
        log_keep, x_re, x_im = self.updates(u, token_mask)
        m_re, m_im, last_re, last_im = chunked_scan(log_keep, x_re, x_im, None, h0_re, h0_im, self.chunk_size)
        if cache is not None:
            cache.set(self.layer_idx, **{MS_RE: last_re, MS_IM: last_im})
        q_re, q_im = to_complex(self.q_proj(u).float())
        score = (m_re * q_re[:, :, None] + m_im * q_im[:, :, None]).sum(-1) / math.sqrt(q_re.shape[-1])
        p = score.softmax(-1)[..., None]  # (B, T, K, 1)
        r = from_complex((p * m_re).sum(2), (p * m_im).sum(2)).to(u.dtype)
        return self.out_proj(r)


# =========================================================================== continuum memory
class ContinuumMemorySystem(nn.Module):
    """HOPE's continuum memory: a chain of MLP levels, x <- x + MLP_l(RMSNorm(x)).

    Level l has its own update period ``cms_periods[l]`` (tokens between two updates of
    its parameters) used by ``MTHopeForCausalLM.continual_update``; fast levels adapt
    to new text, slow ones keep what was learned before.
    """

    def __init__(self, config: MTHopeConfig):
        super().__init__()
        self.periods = list(config.cms_periods)
        self.norms = nn.ModuleList(RMSNorm(config.hidden_size, config.rms_norm_eps) for _ in self.periods)
        self.levels = nn.ModuleList(SwiGLUMLP(config.hidden_size, config.cms_hidden_size) for _ in self.periods)

    def forward(self, x):
        for norm, mlp in zip(self.norms, self.levels):
            x = x + mlp(norm(x))
        return x


# =========================================================================== blocks and models
MIXERS = {"R": TwistorTitansRecurrent, "I": IncidenceAttention}


class MTHopeBlock(GradientCheckpointingLayer):
    """x + mixer(RMSNorm(x)), then (``use_mobius``) the Möbius coupling to the next layer."""

    def __init__(self, config: MTHopeConfig, layer_idx: int, mixer_cls, mobius: bool):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = mixer_cls(config, layer_idx)
        self.mobius = AdaptiveMobiusLayer(config) if mobius else None

    def forward(self, x, positions, attention_mask=None, token_mask=None, cache=None):
        x = x + self.mixer(self.norm(x), positions, attention_mask, token_mask, cache)
        return x if self.mobius is None else self.mobius(x)


class MTHopePreTrainedModel(StrataPreTrainedModel):
    config_class = MTHopeConfig
    config: MTHopeConfig
    base_model_prefix = "model"
    _no_split_modules = ["MTHopeBlock"]
    _auto_map_classes = {"AutoModel": "MTHopeModel", "AutoModelForCausalLM": "MTHopeForCausalLM"}

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if hasattr(module, "init_custom_"):
            module.init_custom_(init, self.config.initializer_range)


class MTHopeModel(MTHopePreTrainedModel):
    """The MT-HOPE trunk; with ``config.bidirectional`` an encoder (no cache)."""

    def __init__(self, config: MTHopeConfig):
        super().__init__(config)
        self.embed_tokens = SpinorEmbedding(config)
        idx = 0
        blocks = []
        for kind in config.layer_pattern:
            blocks.append(MTHopeBlock(config, idx, MIXERS[kind], config.use_mobius))
            idx += 1
        self.layers = nn.ModuleList(blocks)
        self.memory = None
        if config.use_neural_memory:
            self.memory = MTHopeBlock(config, idx, TwistorSelfModifyingRecurrent, False)
            idx += 1
        self.memory_system = None
        if config.use_memory_system:
            self.memory_system = MTHopeBlock(config, idx, TwistorMemorySystem, False)
            idx += 1
        self.cms = ContinuumMemorySystem(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens.embed

    def set_input_embeddings(self, value):
        self.embed_tokens.embed = value

    def stateful_layers(self):
        return [*self.layers, *(b for b in (self.memory, self.memory_system) if b is not None)]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if self.config.bidirectional:
            if use_cache or past_key_values is not None:
                raise ValueError(
                    "this MT-HOPE model is bidirectional (an encoder): it reads whole sequences and cannot keep a "
                    "cache or generate; build it with bidirectional=False for causal language modelling"
                )
            use_cache = False
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        cache = self.resolve_cache(past_key_values, use_cache)
        B, T = self.check_inputs(input_ids, inputs_embeds, attention_mask, cache)
        past = cache.get_seq_length() if cache is not None else 0
        h = self.embed_tokens.embed(input_ids) if inputs_embeds is None else inputs_embeds
        h = self.embed_tokens.spinor(h)
        positions, key_mask, token_mask = self.positions_and_masks(attention_mask, past, T, h.device)
        if position_ids is not None and key_mask is None:
            positions = position_ids
        positions = positions.expand(B, T)

        all_hidden = (h,) if output_hidden_states else None
        for layer in self.stateful_layers():
            h = layer(h, positions, key_mask, token_mask, cache)
            if output_hidden_states:
                all_hidden += (h,)
        h = self.cms(h)
        h = self.norm(h)
        if output_hidden_states:
            all_hidden += (h,)
        if cache is not None:
            cache.advance(T)
        return BaseModelOutputWithPast(last_hidden_state=h, past_key_values=cache, hidden_states=all_hidden)


def twistor_constraint_loss(hidden: torch.Tensor, target: float) -> torch.Tensor:
    """Mean over tokens of (|omega . pi| / n - target)^2 (complex bilinear product, n channels).

    The seed's geometric constraint: it keeps the twistor components from collapsing
    (omega . pi -> 0) or blowing up.
    """
    re, im = to_complex(hidden.float())
    o_re, p_re = re.chunk(2, -1)
    o_im, p_im = im.chunk(2, -1)
    dot_re, dot_im = cmul(o_re, o_im, p_re, p_im)
    n = o_re.shape[-1]
    mod = torch.sqrt(dot_re.sum(-1) ** 2 + dot_im.sum(-1) ** 2 + 1e-12) / n
    return ((mod - target) ** 2).mean()


class MTHopeForCausalLM(MTHopePreTrainedModel, BlockGenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.embed.weight"}

    def __init__(self, config: MTHopeConfig):
        if config.bidirectional:
            raise ValueError(
                "MTHopeForCausalLM cannot be bidirectional: a causal language model (and generation) must not see "
                "later tokens. Use bidirectional=False (e.g. preset 'recommended-causal'), or MTHopeModel as an encoder"
            )
        super().__init__(config)
        self.model = MTHopeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens.embed

    def set_input_embeddings(self, value):
        self.model.embed_tokens.embed = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        return self.causal_lm_output(out, labels, logits_to_keep, **kwargs)

    # ------------------------------------------------------------------ continual learning
    @torch.no_grad()
    def _mean_loss(self, segments: list[torch.Tensor]) -> float:
        losses = [self(seg[None], labels=seg[None], use_cache=False).loss.item() for seg in segments]
        return sum(losses) / len(losses)

    def continual_update(self, texts, tokenizer=None, heldout=None, segment_length: int = 64, lr: float = 1e-3,
                         epochs: int = 1) -> dict:
        """Learn new text online with the continuum memory system; report forgetting.

        ``texts`` (a string, a list of strings with ``tokenizer``, or a 1-D LongTensor of
        ids) is read in order in segments of ``segment_length`` tokens. After each
        segment the CMS gradients are accumulated; level l applies its accumulated
        (averaged) gradient with its own Adam every ``cms_periods[l]`` tokens (at the
        first segment end at or after that many tokens since its last update). All
        other parameters stay frozen. ``heldout`` (same forms) is old text whose loss
        is measured before and after: forgetting is reported, not hidden.

        Returns losses before/after on the new text and on the held-out text,
        ``forgetting`` (held-out after - before) and the number of updates per level.
        """
        new_segments = self._segments(texts, tokenizer, segment_length)
        old_segments = self._segments(heldout, tokenizer, segment_length) if heldout is not None else None
        was_training = self.training
        self.eval()
        report = {"new_loss_before": self._mean_loss(new_segments)}
        if old_segments:
            report["heldout_loss_before"] = self._mean_loss(old_segments)

        cms = self.model.cms
        flags = {p: p.requires_grad for p in self.parameters()}
        for p in self.parameters():
            p.requires_grad_(False)
        levels = [list(level.parameters()) + list(norm.parameters()) for level, norm in zip(cms.levels, cms.norms)]
        for params in levels:
            for p in params:
                p.requires_grad_(True)
        optimizers = [torch.optim.Adam(params, lr=lr) for params in levels]
        pending = [0] * len(levels)  # segments accumulated since the level's last update
        since = [0] * len(levels)  # tokens since the level's last update
        updates = [0] * len(levels)
        try:
            for _ in range(epochs):
                for seg in new_segments:
                    loss = self(seg[None], labels=seg[None], use_cache=False).loss
                    loss.backward()
                    for level, opt in enumerate(optimizers):
                        pending[level] += 1
                        since[level] += seg.numel()
                        if since[level] >= cms.periods[level]:
                            for p in levels[level]:
                                if p.grad is not None:
                                    p.grad /= pending[level]
                            opt.step()
                            opt.zero_grad(set_to_none=True)
                            updates[level] += 1
                            pending[level] = since[level] = 0
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
                p.grad = None
        report["new_loss_after"] = self._mean_loss(new_segments)
        if old_segments:
            report["heldout_loss_after"] = self._mean_loss(old_segments)
            report["forgetting"] = report["heldout_loss_after"] - report["heldout_loss_before"]
        report["updates_per_level"] = updates
        self.train(was_training)
        return report

    def _segments(self, texts, tokenizer, segment_length: int) -> list[torch.Tensor]:
        if isinstance(texts, torch.Tensor):
            ids = texts.reshape(-1).long()
        else:
            if tokenizer is None:
                raise ValueError("continual_update needs a `tokenizer` to read text (or pass a tensor of token ids)")
            texts = [texts] if isinstance(texts, str) else list(texts)
            ids = torch.tensor([i for t in texts for i in tokenizer(t)["input_ids"]], dtype=torch.long)
        if segment_length < 2:
            raise ValueError(f"`segment_length` must be >= 2, got {segment_length}")
        if ids.numel() < 2:
            raise ValueError("continual_update needs at least 2 tokens of text")
        device = self.lm_head.weight.device
        return [ids[i : i + segment_length].to(device) for i in range(0, ids.numel() - 1, segment_length)
                if ids[i : i + segment_length].numel() >= 2]
