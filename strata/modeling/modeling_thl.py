"""THL (seed 002): a hierarchical recurrent LM with a fixed-slot memory bank.

Per real token, for every row of the batch at once:

    e_t = embed(token)                                  (all tokens of a call in parallel)
    x_t = e_t + local_attention(last W token embeddings) (in parallel; optional)
    q_t = Wq x_t + Ws [s0_{t-1}; s_top_{t-1}]           H router heads
    read: score_j = sigma q_h.k_j / sqrt(dk) - lambda read_ema_j over the written slots,
          hard top-k (Gumbel top-k in training), softmax over the k chosen,
          r_t = W_r concat_h(sum_i w_hi m_{j_hi})
    tiers: tier k (a GRU cell) updates iff p % tau_k == 0 (p = the row's count of real
          tokens before this one); input [x_t; r_t] for tier 0, [s_{k-1}; r_t] above;
          inactive tiers hold their state
    write: w = normclip(W_w [s0_t; s_top_t]); novelty = 1 - max_j cos(w, m_j);
          gate = sigmoid(beta (novelty - theta)); novel -> first empty slot, else the
          least used / most stale slot gets gate * w; not novel -> the most similar slot
          m <- (1 - eta) m + eta w; every slot decays by gamma per token
    out:  y_t = W_o RMSNorm([s0_t; ...; s_{K-1,t}]) -> tied LM head

The whole state is fixed-size (see `state_nbytes`): K tier states, the bank S (J x d),
one cached key per slot (J x dk, keys are shared by the heads; queries are per head),
per-slot norms and read/write metadata, the row's clock and the local window.

Cost per token (B = 1): router scores O(J dk H) (a mat-vec against the cached keys, no
slot is re-projected), top-k O(J H), read O(H k d + H d^2), novelty O(J d) (a mat-vec
against the bank), write O(d dk) (one slot's key is projected), metadata O(J) (usage
EMAs), decay O(1): the bank is stored as S with M = S gamma^(p mod N) and gamma^N is
folded into S every N ~ 13.9k tokens (O(J d) then). Tiers: sum over active tiers of
9 d^2; with tau_k = 2^k about 1.9 tiers run per token. So a token costs
O((J + d) d + H k d), not O(k d): the O(J d) terms are mat-vecs against fixed-size state.
The public reference instead re-projects every slot at every step, O(J d dk H).

Gradients: the discrete choices (top-k set, novelty, targets) carry none; gradients flow
through the read values and weights into the bank slots written earlier in the same
truncated-BPTT chunk (the writer learns), the keys of the chosen slots (re-projected in
training), the queries and every tier. Without gradients all state updates are in place
(O(d) per written slot); in training the bank also updates in place and its backward
costs O(J d) per token.

Left padding: where the attention mask is 0 the whole state (tiers, bank, keys,
metadata, clock, window) is held, and clocks count real tokens only, so a padded row
computes exactly what it computes alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from strata.configuration.configuration_thl import THLConfig
from strata.modeling.cache_recurrent import RecurrentCache
from strata.modeling.generation_blocks import BlockGenerationMixin
from strata.modeling.layers_common import RMSNorm
from strata.modeling.modeling_common import StrataPreTrainedModel

# PEFT LoRA targets: every Linear of the model (the LM head is tied to the embeddings).
LORA_TARGET_MODULES = [
    "q_proj", "k_proj", "v_proj", "o_proj",  # local attention
    "query_proj", "state_query_proj", "key_proj", "read_proj",  # router
    "x_proj", "r_proj", "h_proj",  # GRU tiers
    "write_proj",  # novelty writer
    "out_proj",  # output projection
]

# Names of the shared state tensors (RecurrentCache layer 0); layer k also holds "tier".
STATE_NAMES = (
    "bank", "keys", "norms", "read_ema", "write_ema", "last_read", "last_write", "written", "clock", "win_k", "win_v",
)
EMPTY_SCORE = -1e9  # router score of a slot that has never been written
_LOCAL_QUERY_CHUNK = 256  # local attention processes queries in chunks of this many tokens


# ----------------------------------------------------------------------------- state
def init_state(config: THLConfig, batch: int, device, dtype=torch.float32) -> dict:
    """The empty state of ``batch`` rows: zero tiers, an empty bank, clock 0."""
    d, J, dk, W = config.hidden_size, config.memory_slots, config.router_head_dim, config.local_window
    f = dict(device=device, dtype=dtype)
    return {
        "tiers": [torch.zeros(batch, d, **f) for _ in range(config.num_hidden_layers)],
        "bank": torch.zeros(batch, J, d, **f),
        "keys": torch.zeros(batch, J, dk, **f),
        "norms": torch.zeros(batch, J, **f),
        "read_ema": torch.zeros(batch, J, **f),
        "write_ema": torch.zeros(batch, J, **f),
        "last_read": torch.full((batch, J), -1, device=device, dtype=torch.long),
        "last_write": torch.full((batch, J), -1, device=device, dtype=torch.long),
        "written": torch.zeros(batch, J, device=device, dtype=torch.bool),
        "clock": torch.zeros(batch, device=device, dtype=torch.long),
        "win_k": torch.zeros(batch, W, d, **f),
        "win_v": torch.zeros(batch, W, d, **f),
    }


def flatten_state(state: dict) -> list[torch.Tensor]:
    return list(state["tiers"]) + [state[name] for name in STATE_NAMES]


def unflatten_state(tensors, num_tiers: int) -> dict:
    tensors = list(tensors)
    state = dict(zip(STATE_NAMES, tensors[num_tiers:]))
    state["tiers"] = tensors[:num_tiers]
    return state


def state_from_cache(cache: RecurrentCache, num_tiers: int) -> dict | None:
    layer0 = cache.layer(0)
    if layer0.get("bank") is None:
        return None
    state = {name: layer0.get(name) for name in STATE_NAMES}
    state["tiers"] = [cache.layer(k).get("tier") for k in range(num_tiers)]
    return state


def state_to_cache(cache: RecurrentCache, state: dict) -> None:
    cache.set(0, tier=state["tiers"][0], **{name: state[name] for name in STATE_NAMES})
    for k in range(1, len(state["tiers"])):
        cache.set(k, tier=state["tiers"][k])


def state_nbytes(state_or_cache) -> int:
    """Bytes held by a THL state (a dict from `init_state` or a RecurrentCache)."""
    if isinstance(state_or_cache, dict):
        tensors = flatten_state(state_or_cache)
    else:
        tensors = [t for layer in state_or_cache.layers for t in layer.tensors.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


def effective_bank(state: dict, config: THLConfig) -> torch.Tensor:
    """The memory bank M = S * gamma^(p mod N) (B, J, d) as the model sees it now."""
    n = config.decay_fold_period
    expo = (state["clock"].double() % n) if n < 2**62 else state["clock"].double()
    scale = torch.pow(torch.tensor(config.memory_decay, dtype=torch.float64), expo)
    return state["bank"] * scale.to(state["bank"].dtype)[:, None, None]


# ----------------------------------------------------------------------------- schedule
@dataclass
class StepPlan:
    """Host-side schedule of a chunk of T steps (computed once per chunk from the clocks).

    Python lists decide, without device syncs, what runs at each step; the tensors
    (device, time first) give the per-row values.
    """

    T: int
    all_real: list  # [t] every row holds a real token at step t
    tier_mode: list  # [t][k]: 0 no row updates tier k, 1 every row does, 2 some rows do
    fold_any: list  # [t] some row folds gamma^N into its bank at step t
    real: torch.Tensor | None  # (T, B, 1) bool, None when no token is padding
    active: torch.Tensor | None  # (T, B, K) bool tier updates, None when tier_mode has no 2
    pos: torch.Tensor  # (T, B) position of the token among the row's real tokens
    sigma_prev: torch.Tensor  # (T, B, 1) bank scale before the step's decay
    sigma_cur: torch.Tensor  # (T, B, 1) bank scale after the step's decay (and fold)
    fold: torch.Tensor | None  # (T, B, 1) factor multiplied into S (gamma^N or 1)
    n_real: torch.Tensor | None  # (B,) real tokens of the chunk per row (None: all T)
    order: torch.Tensor | None  # (B, T) real tokens first, for the local attention
    next_clock: torch.Tensor  # (B,) host clock after the chunk


def decay_scales(config: THLConfig, counts: torch.Tensor) -> torch.Tensor:
    """gamma^(count mod N) in float64 for integer token counts."""
    n = config.decay_fold_period
    return torch.pow(torch.tensor(config.memory_decay, dtype=torch.float64), (counts % n).double())


def make_plan(config: THLConfig, clock: torch.Tensor, token_mask: torch.Tensor | None, T: int, device,
              dtype=torch.float32) -> StepPlan:
    """Schedule of T steps for rows whose clocks (host, (B,)) are ``clock``; ``token_mask``
    (host (B, T) bool) marks real tokens (None: all real)."""
    B = clock.shape[0]
    has_pad = token_mask is not None and not bool(token_mask.all())
    n = config.decay_fold_period
    taus = torch.tensor(config.timescales)
    if not has_pad:  # fast path (decoding): every token is real
        mask = torch.ones(B, T, dtype=torch.bool)
        pos = clock[:, None] + torch.arange(T)
        after = pos + 1
        sigma_prev = decay_scales(config, pos)
        sigma_cur = decay_scales(config, after)
        active = pos[:, :, None] % taus == 0
    else:
        mask = token_mask.bool()
        pos = clock[:, None] + mask.long().cumsum(1) - 1  # real tokens: their position; pads: the last real one
        after = pos + 1  # real tokens seen once this step is done
        sigma_prev = torch.where(mask, decay_scales(config, pos.clamp(min=0)), decay_scales(config, after))
        sigma_cur = decay_scales(config, after)
        active = mask[:, :, None] & (pos[:, :, None] % taus == 0)  # (B, T, K)
    fold_mask = mask & (after % n == 0)
    any_a, all_a = active.any(0), active.all(0)
    tier_mode = (all_a.long() + (any_a & ~all_a).long() * 2).tolist()
    partial_tiers = any(2 in row for row in tier_mode)
    fold_any = fold_mask.any(0).tolist()
    to = dict(device=device)
    n_real = mask.sum(1)
    return StepPlan(
        T=T,
        all_real=mask.all(0).tolist(),
        tier_mode=tier_mode,
        fold_any=fold_any,
        real=mask.t()[:, :, None].to(**to) if has_pad else None,
        active=active.transpose(0, 1).to(**to) if partial_tiers else None,
        pos=pos.t().contiguous().to(**to),
        sigma_prev=sigma_prev.t()[:, :, None].to(device=device, dtype=dtype),
        sigma_cur=sigma_cur.t()[:, :, None].to(device=device, dtype=dtype),
        fold=(torch.where(fold_mask, config.memory_decay ** n, 1.0).t()[:, :, None].to(device=device, dtype=dtype)
              if any(fold_any) else None),
        n_real=n_real.to(**to) if has_pad else None,
        order=torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices.to(**to) if has_pad else None,
        next_clock=clock + n_real,
    )


# ----------------------------------------------------------------------------- router
_RAMPS: dict = {}


def _ramp(J: int, device) -> torch.Tensor:
    key = (J, str(device))
    if key not in _RAMPS:
        _RAMPS[key] = torch.arange(J - 1, -1, -1, device=device, dtype=torch.int64)
    return _RAMPS[key]


def topk_lowest_index(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores along the last dim; equal scores go to the lowest index.

    torch.topk leaves the order of ties unspecified; here the float32 scores are mapped to
    order-preserving integers (flip the magnitude bits of negatives; -0.0 becomes +0.0) and
    combined with the reversed index into one int64 key.
    """
    J = scores.shape[-1]
    bits = (scores.float() + 0.0).view(torch.int32)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (key.to(torch.int64) * J + _ramp(J, scores.device)).topk(k, dim=-1).indices


def slot_bias(state: dict, load_penalty: float) -> torch.Tensor:
    """Per-slot additive router score (B, J): -lambda * read_ema, or EMPTY_SCORE for a slot
    that has never been written."""
    return torch.where(state["written"], state["read_ema"] * -load_penalty, EMPTY_SCORE)


class THLRouter(nn.Module):
    """Multi-head sparse top-k read of the memory bank.

    Queries per head from the token (``query_proj``, applied to all tokens in parallel) and
    the previous step's first and top tier states (``state_query_proj``); one key per slot
    (``key_proj``, shared by the heads), cached in the state and updated only for the slot
    written at each step.
    """

    def __init__(self, config: THLConfig):
        super().__init__()
        d, H, dk = config.hidden_size, config.router_heads, config.router_head_dim
        self.heads, self.head_dim, self.top_k = H, dk, config.router_top_k
        self.scale = 1.0 / math.sqrt(dk)
        self.load_penalty = config.load_penalty
        self.gumbel_scale = config.gumbel_scale
        self.query_proj = nn.Linear(d, H * dk, bias=False)
        self.state_query_proj = nn.Linear(2 * d, H * dk, bias=True)
        self.key_proj = nn.Linear(d, dk, bias=False)
        self.read_proj = nn.Linear(H * d, d, bias=False)

    def select(self, q_scaled: torch.Tensor, keys, bias, noise=None, exact_ties: bool = True):
        """Chosen slots (B, H, k) for scaled queries (B, H, dk) (q * sigma / sqrt(dk)) and slot
        biases (B, J). No gradient: the choice is discrete. ``noise``: None (hard top-k) or a
        torch.Generator for Gumbel top-k."""
        with torch.no_grad():
            q = q_scaled.detach()
            if q.dtype != keys.dtype:
                q = q.to(keys.dtype)
            scores = torch.baddbmm(bias[:, None, :], q, keys.transpose(1, 2))  # (B, H, J)
            if noise is not None and self.gumbel_scale > 0:
                gumbel = -torch.empty_like(scores).exponential_(generator=noise).log()
                return (scores + self.gumbel_scale * gumbel).topk(self.top_k, dim=-1).indices
            if exact_ties:
                return topk_lowest_index(scores, self.top_k)
            return scores.topk(self.top_k, dim=-1).indices

    def read(self, q, state: dict, sigma_prev, noise=None, exact_ties: bool = True, bias=None, rows=None):
        """Read the bank for queries q (B, H*dk) at bank scale ``sigma_prev`` (B, 1).

        Returns (read (B, d), flat slot ids (B, H*k), weights (B, H, k), chosen-slot-written
        mask (B, H, k)). ``bias`` (`slot_bias`) and ``rows`` (arange(B)[:, None]) may be passed
        precomputed."""
        B = q.shape[0]
        H, dk, k = self.heads, self.head_dim, self.top_k
        bank, keys = state["bank"], state["keys"]
        if bias is None:
            bias = slot_bias(state, self.load_penalty)
        if rows is None:
            rows = torch.arange(B, device=q.device)[:, None]
        sigma = sigma_prev[:, :, None]  # (B, 1, 1)
        q_scaled = q.view(B, H, dk) * (sigma * self.scale)
        flat = self.select(q_scaled, keys, bias, noise, exact_ties).reshape(B, H * k)
        with torch.no_grad():
            chosen_bias = bias.gather(1, flat).view(B, H, k)
            chosen_keys = keys[rows, flat].view(B, H, k, dk)
        slots = bank[rows, flat].view(B, H, k, -1)  # (B, H, k, d), differentiable in training
        if torch.is_grad_enabled():
            # Same values as the cached keys, with gradients to key_proj and the slots.
            projected = self.key_proj(slots).to(chosen_keys.dtype)
            chosen_keys = chosen_keys + (projected - projected.detach())
        logits = torch.matmul(chosen_keys, q_scaled.to(chosen_keys.dtype)[..., None]).squeeze(-1) + chosen_bias
        weights = torch.softmax(logits.float(), dim=-1)
        heads = torch.matmul(weights[:, :, None, :].to(slots.dtype), slots).squeeze(2) * sigma
        return self.read_proj(heads.reshape(B, -1)), flat, weights, chosen_bias > EMPTY_SCORE / 2


# ----------------------------------------------------------------------------- tiers
class THLTierCell(nn.Module):
    """One tier: a GRU cell whose input is [lower tier (or token); memory read]."""

    def __init__(self, config: THLConfig):
        super().__init__()
        d = config.hidden_size
        self.x_proj = nn.Linear(d, 3 * d, bias=True)  # lower tier state (tier 0: the token)
        self.r_proj = nn.Linear(d, 3 * d, bias=False)  # memory read
        self.h_proj = nn.Linear(d, 3 * d, bias=True)  # own state
        for linear in (self.x_proj, self.r_proj, self.h_proj):
            linear.thl_init_std = 1.0 / math.sqrt(d)
        self.split = [2 * d, d]

    def forward(self, x_gates: torch.Tensor, read: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        i_rz, i_n = (x_gates + self.r_proj(read)).split(self.split, dim=-1)
        h_rz, h_n = self.h_proj(h).split(self.split, dim=-1)
        r, z = torch.sigmoid(i_rz + h_rz).chunk(2, dim=-1)
        n = torch.tanh(torch.addcmul(i_n, r, h_n))
        return torch.lerp(n, h.to(n.dtype), z)  # (1 - z) n + z h


# ----------------------------------------------------------------------------- writer
def novelty_and_gate(w, bank, norms, written, theta: float, beta: float):
    """novelty = 1 - max_j cos(w, m_j) over written slots (1 if none), gate =
    sigmoid(beta (novelty - theta)), and the most similar slot. No gradient."""
    with torch.no_grad():
        wd = w.detach()
        if wd.dtype != bank.dtype:
            wd = wd.to(bank.dtype)
        dots = torch.bmm(bank.detach(), wd[:, :, None]).squeeze(-1)  # (B, J); cos is scale-free
        cos = dots / (norms * torch.linalg.vector_norm(wd, dim=-1, keepdim=True)).clamp_min(1e-12)
        best, similar = torch.where(written, cos, -3.0).max(dim=-1)  # first index among ties
        novelty = torch.where(best > -2.0, 1.0 - best, 1.0)
        gate = torch.sigmoid((novelty - theta) * beta)
    return novelty, gate, similar


def choose_target(novel, similar, state: dict, policy: str):
    """Slot each row writes: novel -> the first empty slot, else the eviction policy's slot;
    not novel -> the most similar slot. Ties go to the lowest index."""
    with torch.no_grad():
        written = state["written"]
        first_empty = written.to(torch.uint8).argmin(dim=-1)
        if policy == "least_used":
            evict = (state["read_ema"] + state["write_ema"]).argmin(dim=-1)
        else:  # "stale": the slot read or written longest ago
            evict = torch.maximum(state["last_read"], state["last_write"]).argmin(dim=-1)
        return torch.where(novel, torch.where(written.all(dim=-1), evict, first_empty), similar)


class THLWriter(nn.Module):
    """Novelty-gated write of one candidate vector per row into the bank."""

    def __init__(self, config: THLConfig):
        super().__init__()
        d = config.hidden_size
        self.write_proj = nn.Linear(2 * d, d, bias=True)
        self.max_norm = config.write_max_norm
        self.theta, self.beta = config.novelty_threshold, config.novelty_beta
        self.eta = config.reinforce_rate
        self.rho = config.usage_ema_decay
        self.policy = config.eviction_policy

    def candidate(self, s_first, s_top):
        """w = normclip(W_w [s0; s_top]): rescaled to length ``write_max_norm`` when longer."""
        w = self.write_proj(torch.cat([s_first, s_top], dim=-1))
        norm = torch.linalg.vector_norm(w, dim=-1, keepdim=True)
        return w * (self.max_norm / norm.clamp_min(1e-12)).clamp(max=1.0)

    def write(self, w, state: dict, key_proj, sigma_cur, pos, real, inplace: bool = True, rows=None):
        """Write candidates w (B, d) at positions pos (B,) with bank scale ``sigma_cur`` (B, 1)
        after this token's decay. ``real``: None (every row holds a real token) or (B, 1) bool;
        padded rows keep their state. Returns (target, novel, gate)."""
        B = w.shape[0]
        bank = state["bank"]
        if rows is None:
            rows = torch.arange(B, device=w.device)
        novelty, gate, similar = novelty_and_gate(w, bank, state["norms"], state["written"], self.theta, self.beta)
        novel = novelty > self.theta
        target = choose_target(novel, similar, state, self.policy)
        index = (rows, target)
        old = bank[index]  # stored value (B, d)
        w_stored = w.to(bank.dtype) / sigma_cur  # the stored form of an effective value w
        # novel: m = gate w;  not novel: m = (1 - eta) m + eta w  (both in stored form)
        new = torch.where(novel[:, None], gate[:, None] * w_stored, torch.lerp(old, w_stored, self.eta))
        if real is not None:
            new = torch.where(real, new, old)
        put = _put_ if inplace else _put
        state["bank"] = put(bank, index, new)
        with torch.no_grad():
            stored = new.detach()
            key = key_proj(stored)
            if key.dtype != state["keys"].dtype:
                key = key.to(state["keys"].dtype)
            norm = torch.linalg.vector_norm(stored, dim=-1)
            ema = state["write_ema"]
            if real is None:
                written_new = torch.ones(B, dtype=torch.bool, device=w.device)
                bump = torch.full((B,), 1.0 - self.rho, dtype=ema.dtype, device=w.device)
                last = pos
                ema = ema.mul_(self.rho) if inplace else ema * self.rho
            else:  # padded rows keep everything bit for bit
                realv = real[:, 0]
                key = torch.where(real, key, state["keys"][index])
                norm = torch.where(realv, norm, state["norms"][index])
                written_new = state["written"][index] | realv
                bump = (1.0 - self.rho) * realv.to(ema.dtype)
                last = torch.where(realv, pos, state["last_write"][index])
                rho = torch.where(real, self.rho, 1.0).to(ema.dtype)
                ema = ema.mul_(rho) if inplace else ema * rho
            state["keys"] = put(state["keys"], index, key)
            state["norms"] = put(state["norms"], index, norm.to(state["norms"].dtype))
            state["written"] = put(state["written"], index, written_new)
            state["write_ema"] = ema.index_put_(index, bump, accumulate=True) if inplace else ema.index_put(
                index, bump, accumulate=True)
            state["last_write"] = put(state["last_write"], index, last)
        return target, novel, gate


def _put_(tensor, index, values):
    return tensor.index_put_(index, values)


def _put(tensor, index, values):
    return tensor.index_put(index, values)


def update_read_usage(state: dict, flat, weights, chosen_written, pos, real, rho: float, inplace: bool = True):
    """Read EMA and last-read time of the slots read at this step (padded rows unchanged)."""
    with torch.no_grad():
        B, H, k = weights.shape
        usage = weights * chosen_written
        cond = chosen_written
        if real is not None:
            usage = usage * real[:, :, None]
            cond = cond & real[:, :, None]
            rho_t = torch.where(real, rho, 1.0).to(state["read_ema"].dtype)
        else:
            rho_t = rho
        src = (usage * ((1.0 - rho) / H)).view(B, H * k).to(state["read_ema"].dtype)
        if inplace:
            state["read_ema"].mul_(rho_t).scatter_add_(1, flat, src)
        else:
            state["read_ema"] = (state["read_ema"] * rho_t).scatter_add(1, flat, src)
        last = state["last_read"]
        new_last = torch.where(cond.view(B, H * k), pos[:, None], last.gather(1, flat))
        state["last_read"] = last.scatter_(1, flat, new_last) if inplace else last.scatter(1, flat, new_last)


# ----------------------------------------------------------------------------- local attention
class THLLocalAttention(nn.Module):
    """Sliding-window attention of every token over the last W real token embeddings
    (itself included), with a learned bias per head and distance instead of positions.
    The state keeps the projected keys and values of the last W real tokens."""

    def __init__(self, config: THLConfig):
        super().__init__()
        d = config.hidden_size
        self.window, self.heads = config.local_window, config.local_heads
        self.head_dim = d // self.heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(self.heads, self.window))  # [head, distance]

    def forward(self, e, win_k, win_v, num_valid, n_real=None):
        """e (B, T, d) with each row's real tokens first; n_real (B,) real tokens per row (None:
        all); win_k/win_v (B, W, d) oldest first, the last ``num_valid`` (B,) of them real.
        Returns the attention output (B, T, d) (zero at padding) and the new window."""
        B, T, d = e.shape
        W, h, dh = self.window, self.heads, self.head_dim
        q = self.q_proj(e).view(B, T, h, dh)
        keys = torch.cat([win_k, self.k_proj(e).to(win_k.dtype)], dim=1)  # (B, W + T, d)
        values = torch.cat([win_v, self.v_proj(e).to(win_v.dtype)], dim=1)
        bias = self.position_bias.flip(-1)  # window position w holds distance W - 1 - w
        first_valid = (W - num_valid)[:, None, None]
        outs = []
        for s in range(0, T, _LOCAL_QUERY_CHUNK):
            n = min(T, s + _LOCAL_QUERY_CHUNK) - s
            ku = keys[:, s + 1 : s + n + W].unfold(1, W, 1).reshape(B, n, h, dh, W)
            vu = values[:, s + 1 : s + n + W].unfold(1, W, 1).reshape(B, n, h, dh, W)
            scores = torch.einsum("bnhe,bnhew->bnhw", q[:, s : s + n], ku.to(q.dtype)) / math.sqrt(dh) + bias
            key_index = torch.arange(s + 1, s + 1 + n, device=e.device)[:, None] + torch.arange(W, device=e.device)
            valid = key_index[None] >= first_valid  # (B, n, W)
            scores = scores.float().masked_fill(~valid[:, :, None, :], float("-inf"))
            probs = torch.softmax(scores, dim=-1).to(q.dtype)
            outs.append(torch.einsum("bnhw,bnhew->bnhe", probs, vu.to(q.dtype)).reshape(B, n, d))
        out = self.o_proj(torch.cat(outs, dim=1))
        if n_real is None:
            new_k, new_v = keys[:, T:].clone(), values[:, T:].clone()
        else:
            out = out * (torch.arange(T, device=e.device)[None, :] < n_real[:, None])[..., None].to(out.dtype)
            index = (n_real[:, None] + torch.arange(W, device=e.device))[:, :, None].expand(-1, -1, d)
            new_k, new_v = keys.gather(1, index), values.gather(1, index)
        return out, new_k, new_v


# ----------------------------------------------------------------------------- the recurrence
@dataclass
class StepFlags:
    """What one step needs besides the state (see `StepPlan`)."""

    real: torch.Tensor | None  # (B, 1) bool or None (all real)
    tier_mode: list  # per tier: 0 skip, 1 update every row, 2 update rows where active
    active: torch.Tensor | None  # (B, K) bool when some tier_mode is 2
    fold: torch.Tensor | None  # (B, 1) factor or None
    sigma_prev: torch.Tensor  # (B, 1)
    sigma_cur: torch.Tensor  # (B, 1)
    pos: torch.Tensor  # (B,)
    rows: torch.Tensor | None = None  # arange(B)[:, None]


class THLRecurrentCore(GradientCheckpointingLayer):
    """Local attention, router, tiers and writer: runs the per-token recurrence over a chunk.

    One call processes one chunk (a truncated-BPTT chunk in training, the unit of gradient
    checkpointing); the state goes in and comes out as flat tensors.
    """

    def __init__(self, config: THLConfig):
        super().__init__()
        self.config = config
        self.num_tiers = config.num_hidden_layers
        self.local_attention = THLLocalAttention(config) if config.local_window else None
        self.router = THLRouter(config)
        self.tiers = nn.ModuleList(THLTierCell(config) for _ in range(config.num_hidden_layers))
        self.writer = THLWriter(config)

    def forward(self, x, *state_tensors, plan: StepPlan, store_from: int = 0, noise_seed: int | None = None,
                exact_ties: bool = True):
        """``noise_seed``: seed of the Gumbel noise of the router (training), None for hard top-k."""
        state = unflatten_state(state_tensors, self.num_tiers)
        if torch.is_grad_enabled():  # never modify tensors autograd or a checkpoint may hold
            state = {k: (v if k == "tiers" else v.clone()) for k, v in state.items()}
        if self.local_attention is not None:
            num_valid = state["clock"].clamp(max=self.config.local_window)
            if plan.order is None:
                out, state["win_k"], state["win_v"] = self.local_attention(x, state["win_k"], state["win_v"], num_valid)
            else:
                index = plan.order[:, :, None].expand(-1, -1, x.shape[-1])
                out, state["win_k"], state["win_v"] = self.local_attention(
                    x.gather(1, index), state["win_k"], state["win_v"], num_valid, plan.n_real
                )
                out = torch.zeros_like(out).scatter(1, index, out)
            x = x + out.to(x.dtype)
        query_x = self.router.query_proj(x).transpose(0, 1).contiguous()  # (T, B, H*dk)
        gates_x = self.tiers[0].x_proj(x).transpose(0, 1).contiguous()  # (T, B, 3d)
        noise = None
        if noise_seed is not None:  # a fixed seed: checkpoint recomputation draws the same noise
            noise = torch.Generator(device=x.device).manual_seed(noise_seed)
        outputs = []
        rows = torch.arange(x.shape[0], device=x.device)[:, None]
        for t in range(plan.T):
            flags = StepFlags(
                real=None if plan.all_real[t] else plan.real[t],
                tier_mode=plan.tier_mode[t],
                active=plan.active[t] if plan.active is not None else None,
                fold=plan.fold[t] if plan.fold_any[t] else None,
                sigma_prev=plan.sigma_prev[t],
                sigma_cur=plan.sigma_cur[t],
                pos=plan.pos[t],
                rows=rows,
            )
            self.step(query_x[t], gates_x[t], state, flags, noise=noise, exact_ties=exact_ties, inplace=True)
            if t >= store_from:
                outputs.append(torch.cat(state["tiers"], dim=-1))
        clock = state["clock"] + (plan.n_real if plan.n_real is not None else plan.T)
        state["clock"] = clock
        out = torch.stack(outputs, dim=1) if outputs else x.new_zeros(x.shape[0], 0, x.shape[-1] * self.num_tiers)
        return (out, *flatten_state(state))

    def step(self, query_x, gates_x, state: dict, flags: StepFlags, noise, exact_ties: bool, inplace: bool):
        """One token for every row: read, tiers, write. Updates ``state`` (a dict)."""
        tiers = state["tiers"]
        router = self.router
        q = query_x + router.state_query_proj(torch.cat([tiers[0], tiers[-1]], dim=-1))
        read, flat, weights, chosen_written = router.read(
            q, state, flags.sigma_prev, noise, exact_ties, slot_bias(state, router.load_penalty), flags.rows)
        update_read_usage(state, flat, weights, chosen_written, flags.pos, flags.real, self.writer.rho, inplace)
        tiers = list(tiers)
        for k, cell in enumerate(self.tiers):
            mode = flags.tier_mode[k]
            if mode == 0:
                continue
            new = cell(gates_x if k == 0 else cell.x_proj(tiers[k - 1]), read, tiers[k])
            tiers[k] = new.to(tiers[k].dtype) if mode == 1 else torch.where(flags.active[:, k : k + 1], new, tiers[k])
        state["tiers"] = tiers
        if flags.fold is not None:  # fold gamma^N into S (rows whose count hits a multiple of N)
            if inplace:
                state["bank"].mul_(flags.fold[:, :, None])
                state["keys"].mul_(flags.fold[:, :, None])
                state["norms"].mul_(flags.fold)
            else:
                state["bank"] = state["bank"] * flags.fold[:, :, None]
                state["keys"] = state["keys"] * flags.fold[:, :, None]
                state["norms"] = state["norms"] * flags.fold
        w = self.writer.candidate(tiers[0], tiers[-1])
        self.writer.write(w, state, router.key_proj, flags.sigma_cur, flags.pos, flags.real, inplace,
                          flags.rows[:, 0] if flags.rows is not None else None)


# ----------------------------------------------------------------------------- models
class THLPreTrainedModel(StrataPreTrainedModel):
    config_class = THLConfig
    config: THLConfig
    base_model_prefix = "model"
    _no_split_modules = ["THLRecurrentCore"]
    _auto_map_classes = {"AutoModel": "THLModel", "AutoModelForCausalLM": "THLForCausalLM"}

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, nn.Linear) and hasattr(module, "thl_init_std"):
            init.normal_(module.weight, mean=0.0, std=module.thl_init_std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, THLLocalAttention):
            init.zeros_(module.position_bias)
        else:
            super()._init_weights(module)


class THLModel(THLPreTrainedModel):
    def __init__(self, config: THLConfig):
        super().__init__(config)
        d, K = config.hidden_size, config.num_hidden_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id)
        self.core = THLRecurrentCore(config)
        self.norm = RMSNorm(K * d, config.rms_norm_eps)
        self.out_proj = nn.Linear(K * d, d, bias=False)
        self.gradient_checkpointing = False
        self.post_init()

    def initial_state(self, batch: int, device=None) -> dict:
        weight = self.embed_tokens.weight
        return init_state(self.config, batch, device or weight.device, weight.dtype)

    @staticmethod
    def _noise_seed(input_ids, inputs_embeds, clock) -> int:
        """Seed of the training-time Gumbel noise: a hash of the batch, the rows' clocks and
        ``torch.initial_seed()``. A training forward is thus a deterministic function of the
        weights and the batch (equal gradients with and without checkpointing), while
        different batches, stream positions or global seeds draw different noise."""
        if input_ids is not None:
            flat = input_ids.detach().reshape(-1).cpu().long()
        else:
            flat = inputs_embeds.detach().float().reshape(-1).cpu().view(torch.int32).long()
        mult = torch.arange(1, 2 * flat.numel() + 1, 2, dtype=torch.long) * 0x9E3779B1
        h = int(((flat + 7) * mult).sum()) ^ int((clock * 0x85EBCA77).sum()) ^ torch.initial_seed()
        return h % 2**63

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
        logits_to_keep: int = 0,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """As any decoder; ``position_ids`` are ignored (each row's clock lives in its state and
        counts its real tokens). ``logits_to_keep`` > 0 returns only the last hidden states."""
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        cache = self.resolve_cache(past_key_values, use_cache)
        B, T = self.check_inputs(input_ids, inputs_embeds, attention_mask, cache)
        state = state_from_cache(cache, self.config.num_hidden_layers) if cache is not None else None
        if state is not None and state["clock"].shape[0] != B:
            raise ValueError(
                f"the cache holds the state of {state['clock'].shape[0]} sequences but the input has batch size {B}"
            )
        past = cache.get_seq_length() if cache is not None else 0
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        _, _, token_mask = self.positions_and_masks(attention_mask, past, T, x.device)
        if state is None:
            state = self.initial_state(B, x.device)
        tensors = flatten_state(state)

        grad = torch.is_grad_enabled()
        chunk = self.config.tbptt_length if grad else self.config.inference_chunk_size
        keep_from = T - logits_to_keep if logits_to_keep else 0
        clock = state["clock"].cpu()
        host_mask = token_mask.bool().cpu() if token_mask is not None else None
        sigma_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        base_seed = self._noise_seed(input_ids, inputs_embeds, clock) if self.training else None
        outputs = []
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            plan = make_plan(self.config, clock, None if host_mask is None else host_mask[:, s:e], e - s, x.device,
                             sigma_dtype)
            if grad and s > 0:  # truncated BPTT: the state crosses the chunk edge, its gradient does not
                tensors = [t.detach() for t in tensors]
            seed = None if base_seed is None else (base_seed + 1_000_003 * s) % 2**63
            out, *tensors = self.core(x[:, s:e], *tensors, plan=plan, store_from=max(0, keep_from - s),
                                      noise_seed=seed)
            outputs.append(out)
            clock = plan.next_clock
        h = self.out_proj(self.norm(torch.cat(outputs, dim=1)))
        if cache is not None:
            new_state = unflatten_state([t.detach().clone() if grad else t for t in tensors],
                                        self.config.num_hidden_layers)
            state_to_cache(cache, new_state)
            cache.advance(T)
        hidden = (x, h) if output_hidden_states else None
        return BaseModelOutputWithPast(last_hidden_state=h, past_key_values=cache, hidden_states=hidden)


class THLForCausalLM(THLPreTrainedModel, BlockGenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: THLConfig):
        super().__init__(config)
        self.model = THLModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def streaming_units(self) -> list[tuple[str, nn.Module]]:
        """The modules, in execution order, that the layered inference engine moves to the
        device one at a time (the recurrent core runs every token, so it is one unit)."""
        m = self.model
        return [("embed_tokens", m.embed_tokens), ("core", m.core), ("norm", m.norm), ("out_proj", m.out_proj),
                ("lm_head", self.lm_head)]

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
            output_hidden_states=output_hidden_states, logits_to_keep=logits_to_keep if labels is None else 0,
        )
        return self.causal_lm_output(out, labels, logits_to_keep, **kwargs)


class TBPTTStream:
    """Train on long token streams with truncated BPTT: the state (memory bank included) is
    carried from chunk to chunk of the same streams and detached at every chunk edge.

    ``input_ids`` (B, N): B independent streams (e.g. a corpus cut into B contiguous parts).
    Iterating yields, per chunk of ``chunk_length`` (default ``config.tbptt_length``) tokens,
    the mean next-token cross-entropy of the chunk, the first token of the chunk predicted
    from the state the previous chunk left::

        for loss in TBPTTStream(model, ids, reset_every=2048):
            loss.backward(); optimizer.step(); optimizer.zero_grad()

    ``reset_every`` (tokens, a multiple of the chunk length) restarts the state from empty
    periodically. Without it a model trained for long only ever sees states that older
    weights built over thousands of tokens, never a fresh one, and evaluates badly from an
    empty state (the start of every prompt).
    """

    def __init__(self, model: THLForCausalLM, input_ids: torch.LongTensor, chunk_length: int | None = None,
                 cache: RecurrentCache | None = None, reset_every: int | None = None):
        if input_ids.dim() != 2 or input_ids.shape[1] < 2:
            raise ValueError(f"`input_ids` must have shape (streams, length >= 2), got {tuple(input_ids.shape)}")
        self.model, self.input_ids = model, input_ids
        self.chunk_length = chunk_length or model.config.tbptt_length
        if reset_every is not None and (reset_every <= 0 or reset_every % self.chunk_length):
            raise ValueError(f"`reset_every` ({reset_every}) must be a positive multiple of the chunk length "
                             f"({self.chunk_length})")
        self.reset_every = reset_every
        self.cache = cache if cache is not None else RecurrentCache(model.config.num_hidden_layers)

    def __len__(self) -> int:
        return math.ceil((self.input_ids.shape[1] - 1) / self.chunk_length)

    def __iter__(self):
        ids, L = self.input_ids, self.chunk_length
        for s in range(0, ids.shape[1] - 1, L):
            if self.reset_every and s and s % self.reset_every == 0:
                self.cache = RecurrentCache(self.model.config.num_hidden_layers)
            inputs, targets = ids[:, s : s + L], ids[:, s + 1 : s + L + 1]
            logits = self.model(inputs, past_key_values=self.cache, use_cache=True).logits
            logits = logits[:, : targets.shape[1]]
            yield F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
