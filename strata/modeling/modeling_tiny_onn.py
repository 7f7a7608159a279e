"""Tiny-ONN (seed 004): a dynamic-expert language model, one tower for text and patches.

Data flow:

    input_ids, word_token_ids -> char_embed + word_embed ----------------.
    pixel_values (patches)    -> patch_embed, rotated by 2D RoPE (x, y) --+-> sequence
    sequence -> blocks [RMSNorm, DynSIHA attention, RMSNorm, MoIE] -> RMSNorm -> lm_head

- The 1D sequence position of every token (text or patch) is the rotary encoding of the
  attention (RoPE; YaRN / linear scaling through the standard Transformers
  ``rope_scaling`` dict, computed with ``transformers.modeling_rope_utils``).
- ``ThresholdGate`` routes each token to a variable number of experts:
  logits = cos(h, S) - sigmoid(g); active = logits > 0 (straight-through); a token with no
  active expert falls back to its top-k_min experts; weights = softmax over the active ones.
  DynSIHA uses it over a pool of attention heads, MoIE over many small feed-forward experts.
  Every head / expert is computed densely (SDPA / einsum) and masked by its weight.
- Gating runs outside activation checkpointing, the expert computation inside, so a
  recomputation (bf16 or not) cannot flip a threshold decision.
- Training (``labels`` given, grad enabled) adds the surprise routing loss inside the main
  backward pass (``RoutingLossTap``; ``routing_loss`` is its readable two-pass twin) and
  reports the PI score.
- All key/value state lives in the strata ``RecurrentCache`` (``cache.update``), so decoding
  token by token equals one full forward pass, beam search reorders it, left padding works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from strata.configuration.configuration_tiny_onn import TinyONNConfig
from strata.modeling.generation_blocks import BlockGenerationMixin
from strata.modeling.layers_common import RMSNorm, apply_rotary, causal_padding_mask, rotate_half
from strata.modeling.modeling_common import StrataPreTrainedModel

# PEFT LoRA targets: the projections of DynSIHA. MoIE experts are batched parameters
# (E, D, F), not nn.Linear modules, so LoRA cannot wrap them.
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]

# Generation keeps the last characters of every row in the cache, to compute the word
# ids of new characters (a word longer than this is cut).
WORD_HISTORY = 32
WORD_HISTORY_KEY = "word_history"


# --------------------------------------------------------------------------- word ids
def causal_word_token_ids(tokenizer, ids: Sequence[int], word_vocab: dict | None = None) -> list[int]:
    """Word ids that a causal model may see: char t gets the word formed by the characters of
    its word up to and including t (``"the"`` -> ids of "t", "th", "the"; ``<unk>`` when that
    prefix is not a word). The last character of a word gets the whole word, as in
    ``CharWordTokenizer(return_word_ids=True)``; earlier characters never see later ones.

    This is exactly what generation can compute for a new character, so training with these
    ids and generating with ``generate(..., tokenizer=tok)`` see the same kind of input.
    """
    ids = [int(i) for i in ids]
    if not ids:
        return []
    enc = tokenizer.compute_word_ids(ids)
    units, out = enc["word_ids"], list(enc["word_token_ids"])
    vocab = word_vocab if word_vocab is not None else tokenizer.get_word_vocab()
    unk = vocab.get("<unk>", 3)
    t, n = 0, len(ids)
    while t < n:
        unit = units[t]
        end = t
        while end + 1 < n and units[end + 1] == unit:
            end += 1
        if unit >= 0 and end > t:
            text = tokenizer.decode(ids[t : end + 1])
            if len(text) == end - t + 1:  # one character per id: prefixes are slices
                for k in range(t, end):
                    out[k] = vocab.get(text[: k - t + 1], unk)
            else:  # byte-fallback ids: decode every prefix
                for k in range(t, end):
                    out[k] = vocab.get(tokenizer.decode(ids[t : k + 1]), unk)
        t = end + 1
    return out


# --------------------------------------------------------------------------- rotary
class TinyONNRotaryEmbedding(nn.Module):
    """cos/sin of the 1D sequence position; YaRN / linear scaling from ``config.rope_parameters``
    through ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`` (recomputed per call:
    a handful of numbers, and no non-persistent buffer for ``from_pretrained`` to miss)."""

    def __init__(self, config: TinyONNConfig):
        super().__init__()
        self.config = config

    def frequencies(self, device) -> tuple[torch.Tensor, float]:
        cfg = self.config
        if cfg.rope_type == "default":
            exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device) / cfg.head_dim
            return 1.0 / (cfg.rope_theta**exponents), 1.0
        inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[cfg.rope_type](cfg, device)
        return inv_freq.to(device=device, dtype=torch.float32), float(attention_factor)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, scale = self.frequencies(position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, Dh/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def rotate_2d(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """2D RoPE inside a patch embedding: x (B, N, D), positions (B, N, 2) = (x, y).

    Channels [0, D/2) rotate by the x coordinate, [D/2, D) by the y coordinate, each half
    with the rotate-half pairing of 1D RoPE and frequencies theta^(-2i/(D/2)).
    """
    half = x.shape[-1] // 2
    exponents = torch.arange(0, half, 2, dtype=torch.float32, device=x.device) / half
    inv_freq = 1.0 / (theta**exponents)  # (D/4,)
    out = []
    for axis in range(2):
        part = x[..., axis * half : (axis + 1) * half]
        freqs = positions[..., axis : axis + 1].float() * inv_freq  # (B, N, D/4)
        emb = torch.cat([freqs, freqs], dim=-1)
        out.append(part * emb.cos().to(x.dtype) + rotate_half(part) * emb.sin().to(x.dtype))
    return torch.cat(out, dim=-1)


def patchify(pixel_values: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) images -> patches (B, N, C*p*p) in row-major order and their (x, y) (B, N, 2)."""
    B, C, H, W = pixel_values.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} must be divisible by `patch_size` ({p})")
    patches = pixel_values.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)
    ys, xs = torch.meshgrid(torch.arange(H // p), torch.arange(W // p), indexing="ij")
    positions = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1).to(pixel_values.device)
    return patches, positions[None].expand(B, -1, -1)


# --------------------------------------------------------------------------- gating
class Routing(NamedTuple):
    logits: torch.Tensor  # (B, T, E) fp32, cos(h, S) - sigmoid(g), differentiable w.r.t. the gate
    weights: torch.Tensor  # (B, T, E) softmax over active experts, straight-through mask
    active: torch.Tensor  # (B, T, E) bool
    # The same logits with h detached (training only): the routing loss trains the gate's
    # keys and thresholds, not the representation (the main loss does that).
    loss_logits: torch.Tensor | None = None


class ThresholdGate(nn.Module):
    """logits = cos(h, S_e) - sigmoid(g_e); active = logits > 0, or top-k_min if none is.

    ``eligible`` (persistent) marks the experts the top-k_min fallback may pick: experts added
    by ``grow`` join it only once their own threshold has opened for some token in training,
    so adding experts never changes what existing tokens compute.
    """

    def __init__(self, hidden_size: int, num_experts: int, k_min: int, groups: list[int] | None = None):
        super().__init__()
        self.groups = list(groups) if groups is not None else [num_experts]
        self.keys = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.threshold = nn.Parameter(torch.empty(num_experts))
        # 1.0 / 0.0 per expert (a float buffer: state dicts stay numeric for sharding tools)
        self.register_buffer("eligible", torch.ones(num_experts))
        self.k_min = k_min
        self.activation_counts: torch.Tensor | None = None  # tokens routed to each expert in training

    @property
    def num_experts(self) -> int:
        return self.keys.shape[0]

    def initial_threshold(self) -> float:
        # sigmoid(g) = 1/sqrt(D): one standard deviation of cos(h, S) for a random key, so about
        # a sixth of the experts open for a token at initialisation whatever the width.
        tau = 1.0 / math.sqrt(self.keys.shape[1])
        return math.log(tau / (1 - tau))

    def spans(self) -> list[tuple[int, int]]:
        """(start, end) of every generation of experts (see ``TinyONNConfig.expert_groups``)."""
        ends = torch.tensor(self.groups).cumsum(0).tolist()
        return list(zip([0] + ends[:-1], ends))

    def forward(self, x: torch.Tensor) -> Routing:
        # Every generation of experts separately: reductions over the experts of earlier
        # generations run exactly as before a `grow`, so no output bit changes.
        x_unit, keys_unit = F.normalize(x.float(), dim=-1), F.normalize(self.keys.float(), dim=-1)
        spans = self.spans()
        logits = torch.cat([x_unit @ keys_unit[a:b].T for a, b in spans], dim=-1)
        logits = logits - torch.sigmoid(self.threshold.float())
        by_threshold = logits > 0
        k = min(self.k_min, self.num_experts)
        ranked = logits.detach().masked_fill(self.eligible == 0, float("-inf"))
        fallback = torch.zeros_like(by_threshold).scatter_(-1, ranked.topk(k, dim=-1).indices, True)
        active = torch.where(by_threshold.any(-1, keepdim=True), by_threshold, fallback)
        relu = F.relu(logits)
        mask = relu + (active.float() - relu).detach()  # forward: 0/1, backward: d relu
        z = logits.masked_fill(~active, float("-inf"))
        e = torch.exp(z - z.max(-1, keepdim=True).values.detach())
        total = sum(e[..., a:b].sum(-1, keepdim=True) for a, b in spans)  # softmax over the active ones
        weights = e / total * mask
        loss_logits = None
        if self.training:
            with torch.no_grad():
                counts = active.flatten(0, -2).sum(0).float()
                self.activation_counts = counts if self.activation_counts is None else self.activation_counts + counts
                self.eligible.copy_(torch.maximum(self.eligible, by_threshold.flatten(0, -2).any(0).to(self.eligible.dtype)))
            if torch.is_grad_enabled():
                loss_logits = torch.cat([x_unit.detach() @ keys_unit[a:b].T for a, b in spans], dim=-1)
                loss_logits = loss_logits - torch.sigmoid(self.threshold.float())
        return Routing(logits, weights.to(x.dtype), active, loss_logits)

    @torch.no_grad()
    def grow(self, n: int, threshold: float) -> None:
        d = self.keys.shape[1]
        new_keys = torch.randn(n, d, device=self.keys.device, dtype=self.keys.dtype)
        self.keys = nn.Parameter(torch.cat([self.keys.data, new_keys]))
        new_threshold = torch.full((n,), threshold, device=self.threshold.device, dtype=self.threshold.dtype)
        self.threshold = nn.Parameter(torch.cat([self.threshold.data, new_threshold]))
        self.eligible = torch.cat([self.eligible, self.eligible.new_zeros(n)])
        self.groups.append(n)
        if self.activation_counts is not None:
            self.activation_counts = torch.cat([self.activation_counts, self.activation_counts.new_zeros(n)])


# --------------------------------------------------------------------------- routing loss
def gate_loss_and_gradient(S, logits, config):
    """The surprise routing loss of one gated sub-layer and its gradient w.r.t. ``logits``.

    S, logits: (B, T, E). Over the tokens with a loss gradient (S > 0 somewhere):
    L = w_ce CE(logits, argmin_e S) + w_kl KL(softmax(-S / mean_e S) || softmax(logits)),
    means over those tokens. Returns (L, dL/dlogits, valid) or None when no token counts.
    """
    valid = S.sum(-1) > 0
    n = int(valid.sum())
    if n == 0:
        return None
    S_v, logits_v = S[valid], logits[valid].float()
    log_q = F.log_softmax(logits_v, dim=-1)
    log_p = F.log_softmax(-S_v / S_v.mean(-1, keepdim=True).clamp_min(1e-12), dim=-1)
    target = S_v.argmin(-1)
    loss = (config.gate_ce_weight * F.nll_loss(log_q, target)
            + config.gate_kl_weight * (log_p.exp() * (log_p - log_q)).sum(-1).mean())
    q = log_q.exp()
    grad_v = (config.gate_ce_weight * (q - F.one_hot(target, q.shape[-1]).float())
              + config.gate_kl_weight * (q - log_p.exp())) / n
    grad = torch.zeros_like(logits, dtype=torch.float32)
    grad[valid] = grad_v
    return loss, grad, valid


class RoutingLossTap:
    """The surprise routing loss in the main backward pass (one pass, no second gradient).

    ``_SurpriseTap`` sits on the routed outputs u of every gated sub-layer (identity forward).
    In the backward pass it receives dL/du, exactly the gradient of the main loss there
    (the routing loss reaches only gate parameters, never u), turns it into the surprise S,
    and returns the routing loss's gradient w.r.t. the gate logits, scaled by w_gate / number
    of gated sub-layers and by the factor the backward applied to the loss (gradient
    accumulation, loss scaling; read by ``_ScaleProbe`` on the loss). The loss values and the
    surprise are collected here for logging and the PI score.
    """

    def __init__(self, config, n_sublayers: int, n_tokens: int):
        self.config, self.n_sublayers, self.n_tokens = config, n_sublayers, max(int(n_tokens), 1)
        self.scale: torch.Tensor | None = None
        self.parts: dict = {}
        self.losses: list[float] = []
        self.surprises: list[float] = []

    def collect(self, key, part, n_parts, S_part, logits, active):
        parts = self.parts.setdefault(key, {})
        parts[part] = S_part
        if len(parts) < n_parts:
            return torch.zeros_like(logits)
        S = torch.cat([parts[i] for i in range(n_parts)], dim=-1)
        del self.parts[key]
        scale = self.scale if self.scale is not None else torch.ones((), device=S.device)
        S = S / scale.float().abs().clamp_min(1e-30) * self.n_tokens  # per token, unscaled
        if self.config.surprise_times_routing_weight:
            S = S * torch.softmax(logits.float().masked_fill(~active, float("-inf")), -1)  # see the config
        result = gate_loss_and_gradient(S, logits, self.config)
        if result is None:
            return torch.zeros_like(logits)
        loss, grad, valid = result
        act = active[valid]
        self.losses.append(float(loss))
        self.surprises.append(float((S[valid] * act).sum() / act.sum().clamp_min(1)))
        weight = self.config.gate_loss_weight / self.n_sublayers
        return (grad * (weight * scale.float())).to(logits.dtype)

    @property
    def gate_loss(self) -> float | None:
        return sum(self.losses) / len(self.losses) if self.losses else None

    @property
    def surprise(self) -> float | None:
        return sum(self.surprises) / len(self.surprises) if self.surprises else None


class _SurpriseTap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, loss_logits, active, tap, key, part, n_parts):
        ctx.tap, ctx.key, ctx.part, ctx.n_parts = tap, key, part, n_parts
        ctx.save_for_backward(loss_logits.detach(), active)
        return u.view_as(u)

    @staticmethod
    def backward(ctx, grad_u):
        logits, active = ctx.saved_tensors
        S_part = grad_u.detach().float().flatten(3).norm(dim=-1)  # (B, T, E_part)
        grad_logits = ctx.tap.collect(ctx.key, ctx.part, ctx.n_parts, S_part, logits, active)
        return grad_u, grad_logits, None, None, None, None, None


class _ScaleProbe(torch.autograd.Function):
    """Identity on the loss; its backward records d(total)/d(loss) for the taps (it runs first)."""

    @staticmethod
    def forward(ctx, loss, tap):
        ctx.tap = tap
        return loss.clone()  # a scalar; a view would forbid the Trainer's in-place scaling

    @staticmethod
    def backward(ctx, grad):
        ctx.tap.scale = grad.detach()
        return grad, None


def tap_routed(u, route: "Routing", tap, key, part=0, n_parts=1):
    """u, marked for the routing loss when a tap is active (training with labels)."""
    if tap is None or route.loss_logits is None or not u.requires_grad:
        return u
    return _SurpriseTap.apply(u, route.loss_logits, route.active, tap, key, part, n_parts)


# --------------------------------------------------------------------------- DynSIHA
class DynSIHAttention(nn.Module):
    """Dynamic sparse-head attention: a pool of H heads; each token's output mixes the heads
    its gate opened (weights), all heads computed densely with SDPA and masked."""

    def __init__(self, config: TinyONNConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        d, inner = config.hidden_size, config.num_attention_heads * config.head_dim
        self.q_proj = nn.Linear(d, inner, bias=False)
        self.k_proj = nn.Linear(d, inner, bias=False)
        self.v_proj = nn.Linear(d, inner, bias=False)
        self.o_proj = nn.Linear(inner, d, bias=False)
        self.gate = ThresholdGate(d, config.num_attention_heads, config.min_active_heads)

    def execute(self, x, weights, cos, sin, key_mask=None, cache=None, route=None, tap=None, key=None):
        """x (B, T, D), weights (B, T, H) -> output (B, T, D), routed head outputs (u,), u (B, T, H, Dh)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        mask = causal_padding_mask(key_mask, T, k.shape[2], x.device)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        u = tap_routed(o.transpose(1, 2) * weights[..., None], route, tap, key)  # (B, T, H, Dh)
        return self.o_proj(u.reshape(B, T, -1)), (u,)


# --------------------------------------------------------------------------- MoIE
class MoIEFeedForward(nn.Module):
    """Mixture of many small experts (x -> SiLU(x W_in_e) W_out_e), computed densely with einsum
    and mixed by the threshold gate's weights."""

    def __init__(self, config: TinyONNConfig):
        super().__init__()
        d, e, f = config.hidden_size, config.num_experts, config.expert_size
        self.w_in = nn.Parameter(torch.empty(e, d, f))
        self.w_out = nn.Parameter(torch.empty(e, f, d))
        self.gate = ThresholdGate(d, e, config.min_active_experts, config.expert_groups)
        self.initializer_range = config.initializer_range

    def execute(self, x, weights, route=None, tap=None, key=None):
        """x (B, T, D), weights (B, T, E) -> output (B, T, D), routed expert hiddens u: one
        (B, T, E_g, F) tensor per generation of experts, added in order."""
        y, us = None, []
        spans = self.gate.spans()
        for part, (a, b) in enumerate(spans):
            h = F.silu(torch.einsum("btd,edf->btef", x, self.w_in[a:b]))
            u = tap_routed(h * weights[..., a:b, None], route, tap, key, part, len(spans))
            part = torch.einsum("btef,efd->btd", u, self.w_out[a:b])
            y = part if y is None else y + part
            us.append(u)
        return y, tuple(us)

    @torch.no_grad()
    def grow(self, n: int, threshold: float) -> None:
        """Append n experts: random input matrix, zero output matrix, gate closed (threshold g)."""
        _, d, f = self.w_in.shape
        w_in = torch.randn(n, d, f, device=self.w_in.device, dtype=self.w_in.dtype) * self.initializer_range
        self.w_in = nn.Parameter(torch.cat([self.w_in.data, w_in]))
        self.w_out = nn.Parameter(torch.cat([self.w_out.data, self.w_out.new_zeros(n, f, d)]))
        self.gate.grow(n, threshold)

    @torch.no_grad()
    def reinit_dead(self, min_count: float = 0.0) -> int:
        """Re-initialise the experts routed at most ``min_count`` tokens since the last call
        (fresh weights, key and threshold); reset the counts. Returns how many."""
        counts = self.gate.activation_counts
        if counts is None:
            return 0
        dead = counts <= min_count
        n = int(dead.sum())
        if n:
            std = self.initializer_range
            self.w_in[dead] = torch.randn_like(self.w_in[dead]) * std
            self.w_out[dead] = torch.randn_like(self.w_out[dead]) * std
            self.gate.keys[dead] = torch.randn_like(self.gate.keys[dead])
            self.gate.threshold[dead] = self.gate.initial_threshold()
        self.gate.activation_counts = None
        return n


# --------------------------------------------------------------------------- block
class RoutingRecord(NamedTuple):
    routing: Routing
    u: tuple  # routed outputs of the experts, (B, T, E_g, ...) per generation of experts


class TinyONNBlock(nn.Module):
    """Pre-norm block: h += DynSIHA(norm(h)); h += MoIE(norm(h)).

    Activation checkpointing wraps only ``execute`` of each sub-layer: the gates run outside,
    their (weights) enter the checkpointed function as inputs, so recomputation reuses them.
    """

    gradient_checkpointing = False

    def __init__(self, config: TinyONNConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = DynSIHAttention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.moie = MoIEFeedForward(config)

    def forward(self, h, rope, key_mask=None, cache=None, records: list | None = None, tap=None):
        cos, sin = rope
        checkpoint = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        key = 2 * self.attn.layer_idx
        x = self.attn_norm(h)
        route = self.attn.gate(x)
        if checkpoint:
            y, u = self._gradient_checkpointing_func(self.attn.execute, x, route.weights, cos, sin, key_mask, None,
                                                     route, tap, key)
        else:
            y, u = self.attn.execute(x, route.weights, cos, sin, key_mask, cache, route, tap, key)
        if records is not None:
            records.append(RoutingRecord(route, u))
        h = h + y
        x = self.mlp_norm(h)
        route = self.moie.gate(x)
        if checkpoint:
            y, u = self._gradient_checkpointing_func(self.moie.execute, x, route.weights, route, tap, key + 1)
        else:
            y, u = self.moie.execute(x, route.weights, route, tap, key + 1)
        if records is not None:
            records.append(RoutingRecord(route, u))
        return h + y


# --------------------------------------------------------------------------- outputs
@dataclass
class TinyONNModelOutput(BaseModelOutputWithPast):
    """Also: ``routing`` (one RoutingRecord per gated sub-layer: attention, MoIE, attention, ...;
    only in training with labels) and the mean fraction of heads / experts active per
    (non-padding) token, averaged over blocks."""

    routing: list | None = None
    head_active_fraction: torch.Tensor | None = None
    expert_active_fraction: torch.Tensor | None = None


@dataclass
class TinyONNCausalLMOutput(CausalLMOutputWithPast):
    """``loss`` has the value of ``main_loss`` (the language-model loss); in training its backward
    pass also gives the gate parameters ``w_gate * grad`` of the surprise routing loss, whose
    value, like the surprise, exists only after that backward: ``model.routing_stats()``."""

    main_loss: torch.Tensor | None = None
    output_entropy: torch.Tensor | None = None
    pi_score: torch.Tensor | None = None
    head_active_fraction: torch.Tensor | None = None
    expert_active_fraction: torch.Tensor | None = None


# --------------------------------------------------------------------------- models
class WordEmbedding(nn.Embedding):
    """``word_embed``: initialised to zero, so a fresh model is the character model and the word
    term grows from its gradient (which does not depend on the embedding's value)."""


class TinyONNPreTrainedModel(StrataPreTrainedModel):
    config_class = TinyONNConfig
    config: TinyONNConfig
    base_model_prefix = "model"
    _no_split_modules = ["TinyONNBlock"]
    _auto_map_classes = {"AutoModel": "TinyONNModel", "AutoModelForCausalLM": "TinyONNForCausalLM"}

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, WordEmbedding):
            init.zeros_(module.weight)
            return
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, ThresholdGate):
            init.normal_(module.keys, std=1.0)
            init.constant_(module.threshold, module.initial_threshold())
            init.ones_(module.eligible)
        elif isinstance(module, MoIEFeedForward):
            init.normal_(module.w_in, std=std)
            init.normal_(module.w_out, std=std)


class TinyONNModel(TinyONNPreTrainedModel):
    def __init__(self, config: TinyONNConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.word_embed = (
            WordEmbedding(config.word_vocab_size, config.hidden_size) if config.word_vocab_size else None
        )
        self.patch_embed = nn.Linear(config.patch_dim, config.hidden_size, bias=True)
        self.layers = nn.ModuleList(TinyONNBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = TinyONNRotaryEmbedding(config)
        self.gradient_checkpointing = False
        # Set by TinyONNForCausalLM.generate(tokenizer=...): word ids of new characters.
        self.word_tokenizer = None
        self.prompt_word_token_ids: torch.Tensor | None = None
        self.post_init()

    # ------------------------------------------------------------------ inputs
    def _check_word_ids(self, word_token_ids, input_ids):
        if input_ids is None:
            raise ValueError("`word_token_ids` need `input_ids` (they are aligned with the characters)")
        if self.word_embed is None:
            raise ValueError("`word_token_ids` were given but this model has no word embedding (word_vocab_size=0)")
        if word_token_ids.shape != input_ids.shape:
            raise ValueError(
                f"`word_token_ids` must have the shape of `input_ids` {tuple(input_ids.shape)}, "
                f"got {tuple(word_token_ids.shape)}"
            )
        if word_token_ids.is_floating_point():
            raise TypeError(f"`word_token_ids` must be an integer tensor, got {word_token_ids.dtype}")
        low, high = int(word_token_ids.min()), int(word_token_ids.max())
        if low < 0 or high >= self.config.word_vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"word id {bad} in `word_token_ids` is outside the word vocabulary [0, {self.config.word_vocab_size})"
            )

    def _generation_word_ids(self, input_ids, cache, past):
        """Word ids of new characters during ``generate(tokenizer=...)`` (see causal_word_token_ids)."""
        B, T = input_ids.shape
        prompt = self.prompt_word_token_ids
        if prompt is not None and past == 0 and prompt.shape[1] == T and B % prompt.shape[0] == 0:
            words = prompt.to(input_ids.device).repeat_interleave(B // prompt.shape[0], dim=0)
        else:
            history = cache.layer(self.config.num_hidden_layers).get(WORD_HISTORY_KEY) if cache is not None else None
            full = input_ids if history is None else torch.cat([history, input_ids], dim=1)
            vocab = self.word_tokenizer.get_word_vocab()
            rows = [causal_word_token_ids(self.word_tokenizer, row, vocab)[-T:] for row in full.tolist()]
            words = torch.tensor(rows, dtype=torch.long, device=input_ids.device)
            words = words.clamp(max=self.config.word_vocab_size - 1)
        if cache is not None:
            history = cache.layer(self.config.num_hidden_layers).get(WORD_HISTORY_KEY)
            full = input_ids if history is None else torch.cat([history, input_ids], dim=1)
            cache.set(self.config.num_hidden_layers, **{WORD_HISTORY_KEY: full[:, -WORD_HISTORY:]})
        return words

    def embed(self, input_ids, inputs_embeds, word_token_ids, pixel_values, patch_positions):
        """Sequence embeddings (B, N + T, D): patches (if any) first, then the text."""
        parts = []
        if pixel_values is not None:
            if pixel_values.dim() == 4:
                if patch_positions is not None:
                    raise ValueError("`patch_positions` are derived from 4D `pixel_values`; pass one or the other")
                if pixel_values.shape[1] != self.config.num_channels:
                    raise ValueError(
                        f"`pixel_values` must have {self.config.num_channels} channels, got {pixel_values.shape[1]}"
                    )
                patches, patch_positions = patchify(pixel_values, self.config.patch_size)
            elif pixel_values.dim() == 3:
                if patch_positions is None:
                    raise ValueError("flattened patches (B, N, patch_dim) need `patch_positions` (B, N, 2) = (x, y)")
                patches = pixel_values
            else:
                raise ValueError(
                    f"`pixel_values` must be images (B, C, H, W) or patches (B, N, patch_dim), got {tuple(pixel_values.shape)}"
                )
            if patches.shape[-1] != self.config.patch_dim:
                raise ValueError(f"patches must have {self.config.patch_dim} values, got {patches.shape[-1]}")
            if patch_positions.shape != (*patches.shape[:2], 2):
                raise ValueError(
                    f"`patch_positions` must have shape {(*patches.shape[:2], 2)}, got {tuple(patch_positions.shape)}"
                )
            dtype = self.patch_embed.weight.dtype
            parts.append(rotate_2d(self.patch_embed(patches.to(dtype)), patch_positions, self.config.patch_rope_theta))
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if word_token_ids is not None:
            h = h + self.word_embed(word_token_ids)
        parts.append(h)
        return torch.cat(parts, dim=1) if len(parts) > 1 else h

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        word_token_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        patch_positions: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_routing: bool = False,
        routing_tap: RoutingLossTap | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TinyONNModelOutput:
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        cache = self.resolve_cache(past_key_values, use_cache)
        past = cache.get_seq_length() if cache is not None else 0
        n_patches = 0
        if pixel_values is not None:
            if past:
                raise ValueError("`pixel_values` can only start a sequence (the cache must be empty)")
            p = self.config.patch_size
            n_patches = (pixel_values.shape[-2] // p) * (pixel_values.shape[-1] // p) if pixel_values.dim() == 4 \
                else pixel_values.shape[1]
            if attention_mask is not None and input_ids is not None and attention_mask.shape[-1] == input_ids.shape[1]:
                attention_mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], n_patches), attention_mask], 1)
            text_mask = attention_mask[:, n_patches:] if attention_mask is not None else None
            self.check_inputs(input_ids, inputs_embeds, text_mask, cache)
        else:
            self.check_inputs(input_ids, inputs_embeds, attention_mask, cache)
        if word_token_ids is not None:
            self._check_word_ids(word_token_ids, input_ids)
        elif self.word_tokenizer is not None and self.word_embed is not None and input_ids is not None:
            word_token_ids = self._generation_word_ids(input_ids, cache, past)

        h = self.embed(input_ids, inputs_embeds, word_token_ids, pixel_values, patch_positions)
        T = h.shape[1]
        positions, key_mask, _ = self.positions_and_masks(attention_mask, past, T, h.device)
        if position_ids is not None and key_mask is None and n_patches == 0:
            positions = position_ids
        rope = self.rotary(positions, h.dtype)

        records = []
        all_hidden = (h,) if output_hidden_states else None
        for layer in self.layers:
            h = layer(h, rope, key_mask, cache, records, routing_tap)
            if output_hidden_states:
                all_hidden += (h,)
        h = self.norm(h)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (h,)
        if cache is not None:
            cache.advance(T)

        token_mask = key_mask[:, -T:].bool() if key_mask is not None else torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        with torch.no_grad():
            n = token_mask.sum().clamp_min(1)
            heads = [r.routing.active for r in records[0::2]]
            experts = [r.routing.active for r in records[1::2]]
            head_frac = torch.stack([(a.float().mean(-1) * token_mask).sum() / n for a in heads]).mean()
            expert_frac = torch.stack([(a.float().mean(-1) * token_mask).sum() / n for a in experts]).mean()
        return TinyONNModelOutput(
            last_hidden_state=h, past_key_values=cache, hidden_states=all_hidden,
            routing=records if return_routing else None,
            head_active_fraction=head_frac, expert_active_fraction=expert_frac,
        )

    # ------------------------------------------------------------------ growth
    def grow_experts(self, n: int) -> None:
        """Add ``n`` MoIE experts to every block; existing outputs do not change (new experts
        start with a closed gate, a zero output matrix and outside the top-k_min fallback).
        Build a new optimizer afterwards: the parameter tensors are replaced."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"`n` must be a positive integer, got {n!r}")
        for layer in self.layers:
            layer.moie.grow(n, self.config.grow_threshold)
        self.config.num_experts += n
        self.config.expert_groups = list(self.config.expert_groups) + [n]

    def reinit_dead_experts(self, min_count: float = 0.0) -> list[int]:
        """Re-initialise, in every block, the MoIE experts routed at most ``min_count`` tokens
        (in training forwards) since the last call. Returns the count per block."""
        return [layer.moie.reinit_dead(min_count) for layer in self.layers]


class TinyONNForCausalLM(TinyONNPreTrainedModel, BlockGenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TinyONNConfig):
        super().__init__(config)
        self.model = TinyONNModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def grow_experts(self, n: int) -> None:
        self.model.grow_experts(n)

    def reinit_dead_experts(self, min_count: float = 0.0) -> list[int]:
        return self.model.reinit_dead_experts(min_count)

    def generate(self, inputs=None, *args, tokenizer=None, word_token_ids=None, **kwargs):
        """``generate`` of Transformers, plus word ids: with ``tokenizer=`` (a CharWordTokenizer)
        the word id of every character, prompt and new text alike, is computed with
        ``causal_word_token_ids``; ``word_token_ids=`` may give the prompt's own (then
        ``tokenizer`` is required, for the new characters). Without a tokenizer the word
        term is omitted."""
        if word_token_ids is not None and tokenizer is None:
            raise ValueError(
                "`word_token_ids` given to generate() need `tokenizer=` too: the word ids of the new "
                "characters are computed from the generated text"
            )
        use_words = tokenizer is not None and self.model.word_embed is not None and hasattr(tokenizer, "compute_word_ids")
        if use_words:
            self.model.word_tokenizer = tokenizer
            self.model.prompt_word_token_ids = word_token_ids
        try:
            if tokenizer is not None:
                kwargs["tokenizer"] = tokenizer
            return super().generate(inputs, *args, **kwargs)
        finally:
            self.model.word_tokenizer = None
            self.model.prompt_word_token_ids = None

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        word_token_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        patch_positions: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> TinyONNCausalLMOutput:
        train_routing = labels is not None and self.training and torch.is_grad_enabled()
        tap = None
        if train_routing and self.config.gate_loss_weight > 0:
            n_tokens = int((labels[:, 1:] != -100).sum())
            tap = RoutingLossTap(self.config, 2 * self.config.num_hidden_layers, n_tokens)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, word_token_ids=word_token_ids,
            pixel_values=pixel_values, patch_positions=patch_positions, use_cache=use_cache,
            output_hidden_states=output_hidden_states, routing_tap=tap,
        )
        h = out.last_hidden_state
        if logits_to_keep and labels is None:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        result = TinyONNCausalLMOutput(
            logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states,
            head_active_fraction=out.head_active_fraction, expert_active_fraction=out.expert_active_fraction,
        )
        if labels is None:
            return result
        if labels.shape[1] != logits.shape[1]:  # labels of the text only: patches predict nothing
            if labels.shape[1] > logits.shape[1]:
                raise ValueError(f"`labels` are longer ({labels.shape[1]}) than the sequence ({logits.shape[1]})")
            labels = torch.cat([labels.new_full((labels.shape[0], logits.shape[1] - labels.shape[1]), -100), labels], 1)
        main = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        loss = main
        if tap is not None and main.requires_grad:
            # Same value as the LM loss (comparable with any model); the backward pass adds
            # w_gate * grad of the routing loss to the gate parameters (RoutingLossTap).
            loss = _ScaleProbe.apply(main, tap)
        with torch.no_grad():
            target = labels[:, 1:] != -100
            logp = logits[:, :-1].float().log_softmax(-1)
            entropy = -(logp.exp() * logp).sum(-1)
            tau = (entropy * target).sum() / target.sum().clamp_min(1)
        previous = self._last_surprise() if train_routing else None
        result.loss, result.main_loss, result.output_entropy = loss, main.detach(), tau
        result.pi_score = self.pi_score(main.detach(), tau, previous)
        if train_routing:
            self._routing_stats = {"main_loss": main.detach(), "output_entropy": tau, "tap": tap,
                                   "surprise": previous}
        return result

    _routing_stats: dict = {}

    def _last_surprise(self) -> float | None:
        stats = self._routing_stats
        tap = stats.get("tap")
        if tap is not None and tap.surprise is not None:
            return tap.surprise
        return stats.get("surprise")

    def pi_score(self, main_loss, tau, surprise=None) -> torch.Tensor:
        """PI = exp(-alpha((1 - gamma) L / tau + gamma Surprise)); Surprise 0 when unknown."""
        a, g = self.config.pi_alpha, self.config.pi_gamma
        s = float(surprise) if surprise is not None else 0.0
        return torch.exp(-a * ((1 - g) * main_loss.float() / tau.clamp_min(1e-6) + g * s))

    def routing_stats(self) -> dict:
        """After the backward pass of a training forward with labels: the routing loss, the mean
        surprise and the PI score of that step (the forward's ``out.pi_score`` can only use the
        surprise of the step before, because the surprise is a gradient)."""
        stats = self._routing_stats
        if not stats:
            return {}
        tap = stats["tap"]
        surprise = self._last_surprise()
        result = {"pi_score": float(self.pi_score(stats["main_loss"], stats["output_entropy"], surprise)),
                  "output_entropy": float(stats["output_entropy"])}
        if surprise is not None:
            result["surprise"] = float(surprise)
        if tap is not None and tap.gate_loss is not None:
            result["gate_loss"] = tap.gate_loss
        return result

    def routing_loss(self, main_loss: torch.Tensor, records: list, labels: torch.Tensor):
        """The surprise routing loss written out with a second gradient: the readable twin of
        ``RoutingLossTap`` (which computes the same in the main backward pass), used by tests.

        S[t, e] = ||dL_main / du[t, e]|| * N, the gradient norm of the main loss at the routed
        output u of expert (head) e for token t (the slot before the output projection; it
        exists for inactive experts too, so S says how much each expert's output would move
        the loss), times the N tokens of the mean loss so that S is per token. L_gate, averaged
        over gated sub-layers: see ``gate_loss_and_gradient``. S is a target (no graph); L_gate
        reaches the gate parameters through the gate logits computed on a detached h.
        Returns (loss, mean surprise over active experts).
        """
        records = [r for r in records if all(u.requires_grad for u in r.u)]
        if not records:
            return None, None
        flat = [u for r in records for u in r.u]
        grads = iter(torch.autograd.grad(main_loss, flat, retain_graph=True, allow_unused=True))
        n_tokens = (labels[:, 1:] != -100).sum().clamp_min(1)
        cfg = self.config
        losses, surprises = [], []
        for record in records:
            parts = [(next(grads), u) for u in record.u]
            S = torch.cat([(g if g is not None else torch.zeros_like(u)).float().flatten(3).norm(dim=-1)
                           for g, u in parts], dim=-1) * n_tokens  # (B, T, E)
            route = record.routing
            if cfg.surprise_times_routing_weight:
                S = S * torch.softmax(route.logits.detach().masked_fill(~route.active, float("-inf")), -1)
            valid = S.sum(-1) > 0
            if not bool(valid.any()):
                continue
            S_v, logits, active = S[valid], route.loss_logits[valid], route.active[valid]
            log_q = F.log_softmax(logits, dim=-1)
            log_p = F.log_softmax(-S_v / S_v.mean(-1, keepdim=True).clamp_min(1e-12), dim=-1)
            ce = F.nll_loss(log_q, S_v.argmin(-1))
            kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
            losses.append(cfg.gate_ce_weight * ce + cfg.gate_kl_weight * kl)
            surprises.append((S_v * active).sum() / active.sum().clamp_min(1))
        if not losses:
            return None, None
        return torch.stack(losses).mean(), torch.stack(surprises).mean().detach()
