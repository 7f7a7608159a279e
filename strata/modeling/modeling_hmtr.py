"""H-M-T-R (seed 000): the hierarchical Mamba-Transformer-RNN language model.

The text is cut into blocks of K = ``config.block_size`` tokens, counted from each row's
first real token. Per block t:

    encoder  (速记员)  causal Mamba over token embeddings; the output at the last
                      position of block t -> capsule_proj -> capsule C_t    [B, L] -> [B, L/K, D]
    reasoner (大脑)    GPT-style causal Transformer over [start, C_0, C_1, ...]; slot t
                      outputs the predicted capsule P_t of block t           [B, L/K, D] -> [B, L/K, D]
    decoder  (嘴巴)    GRU/LSTM cells, initial state tanh(init_proj(P_t)); reads a learned
                      block-start vector, then the tokens of block t; step s predicts token s

So the logits at position i (predicting token i + 1, which is token s = (i + 1) mod K of
block b = (i + 1) // K) are the decoder's distribution given P_b and the tokens of block
b before it: p(x_{i+1} | P_b, x_{bK .. i}). P_b depends only on tokens 0 .. bK - 1, so
with a deterministic reasoner the model is an exact autoregressive LM: ``forward``
returns per-token logits [B, L, V] and ``labels`` give the usual shifted cross-entropy
(stage 3 of the curriculum). Stage 1 (`HMTRForCausalLM.autoencoder_loss`) decodes block t
from its own capsule C_t; stage 2 (`HMTRForCausalLM.latent_loss`) trains the reasoner to
predict C_t (MSE + cosine, or an energy score).

Cache (one `RecurrentCache`), all batch first:

    layers [0, E)                  encoder: Mamba conv and SSM states
    layers [E, E + R)              reasoner: keys/values over capsule slots
    layers [E + R, E + R + Ld)     decoder: cell state "h" (and "c" for LSTM) per layer;
                                   the first also holds "count" (real tokens seen), "p"
                                   (the current block's predicted capsule), "capsule_mask"
                                   (which reasoner slots are real) and the pending tokens

The encoder is lazy: tokens go into "pending" (embeddings + mask) until some row of the
batch completes a block; then the encoder consumes all pending tokens at once. So
generation runs the decoder alone inside a block and the encoder (K tokens) and the
reasoner (one capsule) once per block, and every forward, whatever its chunking, computes
exactly what one full forward computes.

Left padding: blocks and reasoner positions count each row's real tokens, so rows of a
left-padded batch complete blocks at different steps; a row that completes no capsule in
a call gets a masked reasoner slot, which attention never sees.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from strata.configuration.configuration_hmtr import HMTRConfig
from strata.modeling.cache_recurrent import RecurrentCache
from strata.modeling.generation_blocks import BlockGenerationMixin
from strata.modeling.layers_common import CausalSelfAttention, RMSNorm, RotaryEmbedding, SwiGLUMLP
from strata.modeling.layers_mamba import MambaMixer
from strata.modeling.modeling_common import StrataPreTrainedModel

# PEFT LoRA targets: every Linear of encoder, reasoner and decoder (the LM head is tied).
LORA_TARGET_MODULES = [
    "in_proj", "x_proj", "out_proj",  # encoder (Mamba)
    "capsule_proj",  # capsule head
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",  # reasoner
    "predict_proj", "energy_in", "energy_noise", "energy_mid", "energy_out",  # reasoner heads
    "init_proj", "capsule_gates", "input_gates", "hidden_gates", "decoder_out",  # decoder
]

# Names of the state tensors in the first decoder cache layer.
COUNT, PROMPT_P, CAPSULE_MASK, PENDING, PENDING_MASK = "count", "p", "capsule_mask", "pending", "pending_mask"
DEC_H, DEC_C = "h", "c"


# ----------------------------------------------------------------------------- encoder
class HMTREncoderBlock(GradientCheckpointingLayer):
    """RMSNorm -> Mamba mixer -> residual."""

    def __init__(self, config: HMTRConfig, layer_idx: int):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = MambaMixer(config, layer_idx)

    def forward(self, hidden_states, token_mask=None, cache=None):
        return hidden_states + self.mixer(self.norm(hidden_states), None, None, token_mask, cache)


class HMTREncoder(nn.Module):
    """The streaming compressor: Mamba blocks, a final norm, and the capsule head."""

    def __init__(self, config: HMTRConfig):
        super().__init__()
        d = config.hidden_size
        self.layers = nn.ModuleList(HMTREncoderBlock(config, i) for i in range(config.encoder_layers))
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.variational = config.capsule == "variational"
        self.capsule_proj = nn.Linear(d, 2 * d if self.variational else d, bias=True)

    def forward(self, x, token_mask=None, cache=None):
        """Normalised encoder outputs (B, T, D) at every position."""
        for layer in self.layers:
            x = layer(x, token_mask, cache)
        return self.norm(x)

    def capsule_stats(self, y):
        """Capsule head on encoder outputs: (mean, log-variance or None)."""
        c = self.capsule_proj(y)
        if not self.variational:
            return c, None
        mu, logvar = c.chunk(2, dim=-1)
        return mu, logvar.clamp(-12.0, 6.0)


# ----------------------------------------------------------------------------- reasoner
class HMTRReasonerBlock(GradientCheckpointingLayer):
    """Pre-norm GPT block: RMSNorm -> causal attention (keys/values cached) -> RMSNorm -> SwiGLU."""

    def __init__(self, config: HMTRConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = CausalSelfAttention(config, config.reasoner_cache_offset + layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states, position_embeddings, key_mask=None, cache=None):
        h = hidden_states + self.attn(self.attn_norm(hidden_states), position_embeddings, key_mask, None, cache)
        return h + self.mlp(self.mlp_norm(h))


class HMTREnergyHead(nn.Module):
    """Generative capsule head trained with the energy score (CALM): P = head(h, noise).

    With noise 0 (inference) the head is a deterministic residual MLP of h."""

    def __init__(self, config: HMTRConfig):
        super().__init__()
        d, m = config.hidden_size, config.energy_hidden_size
        self.noise_size = config.energy_noise_size
        self.energy_in = nn.Linear(d, m, bias=True)
        self.energy_noise = nn.Linear(self.noise_size, m, bias=False)
        self.energy_mid = nn.Linear(m, m, bias=True)
        self.energy_out = nn.Linear(m, d, bias=True)

    def forward(self, h, noise=None):
        a = self.energy_in(h)
        if noise is not None:
            a = a + self.energy_noise(noise.to(a.dtype))
        a = F.silu(a)
        a = a + F.silu(self.energy_mid(a))
        return self.energy_out(a)


class HMTRReasoner(nn.Module):
    """The latent planner: a causal Transformer over capsule slots [start, C_0, C_1, ...]."""

    def __init__(self, config: HMTRConfig):
        super().__init__()
        d = config.hidden_size
        self.start_capsule = nn.Parameter(torch.zeros(d))
        self.layers = nn.ModuleList(HMTRReasonerBlock(config, i) for i in range(config.reasoner_layers))
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.energy = config.loss == "energy"
        if self.energy:
            self.head = HMTREnergyHead(config)
        else:
            self.predict_proj = nn.Linear(d, d, bias=True)

    def hidden(self, slots, positions, key_mask=None, cache=None):
        """Normalised outputs (B, S, D) of capsule slots (B, S, D) at positions (B or 1, S)."""
        rope = self.rotary(positions, slots.dtype)
        h = slots
        for layer in self.layers:
            h = layer(h, rope, key_mask, cache)
        return self.norm(h)

    def predict(self, hidden, noise=None):
        """Predicted capsules from reasoner outputs; ``noise`` only for the energy head."""
        if self.energy:
            return self.head(hidden, noise)
        return self.predict_proj(hidden)


# ----------------------------------------------------------------------------- decoder
class HMTRDecoderCell(nn.Module):
    """A GRU or LSTM cell whose input gates are computed outside (for a whole block at once)."""

    def __init__(self, input_size: int, hidden_size: int, kind: str):
        super().__init__()
        self.kind, self.hidden_size = kind, hidden_size
        n = 3 if kind == "gru" else 4
        self.input_gates = nn.Linear(input_size, n * hidden_size, bias=True)
        self.hidden_gates = nn.Linear(hidden_size, n * hidden_size, bias=True)
        self.input_gates.hmtr_init_std = 1.0 / math.sqrt(input_size)
        self.hidden_gates.hmtr_init_std = 1.0 / math.sqrt(hidden_size)

    def forward(self, gates_x, h, c=None):
        H = self.hidden_size
        gates_h = self.hidden_gates(h)
        if self.kind == "gru":
            i_rz, i_n = gates_x.split([2 * H, H], dim=-1)
            h_rz, h_n = gates_h.split([2 * H, H], dim=-1)
            r, z = torch.sigmoid(i_rz + h_rz).chunk(2, dim=-1)
            n = torch.tanh(i_n + r * h_n)
            return n + z * (h.to(n.dtype) - n), None  # (1 - z) n + z h
        i, f, g, o = (gates_x + gates_h).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c.to(f.dtype) + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class HMTRDecoder(nn.Module):
    """The elastic expander: stacked cells started from a (predicted) capsule; one block at a time."""

    def __init__(self, config: HMTRConfig):
        super().__init__()
        d, hd, L = config.hidden_size, config.decoder_hidden_size, config.decoder_layers
        self.num_layers, self.hidden_size = L, hd
        self.lstm = config.decoder_cell == "lstm"
        self.start_input = nn.Parameter(torch.zeros(d))  # the input of step 0 of every block (of block 0)
        self.first_input_is_previous_token = config.decoder_first_input == "previous_token"
        self.cells = nn.ModuleList(
            HMTRDecoderCell(d if l == 0 else hd, hd, config.decoder_cell) for l in range(L)
        )
        self.init_proj = nn.Linear(d, (2 if self.lstm else 1) * L * hd, bias=True)
        n = 3 if config.decoder_cell == "gru" else 4
        self.capsule_gates = nn.Linear(d, n * hd, bias=False) if config.decoder_capsule_input else None
        self.decoder_out = nn.Linear(hd, d, bias=False)
        self.norm = RMSNorm(d, config.rms_norm_eps)

    def initial_state(self, p):
        """Cell states (lists of L tensors (N, hd)) of blocks whose capsule is p (N, D)."""
        s = torch.tanh(self.init_proj(p)).unflatten(-1, (-1, self.hidden_size))
        h = list(s[:, : self.num_layers].unbind(1))
        c = list(s[:, self.num_layers :].unbind(1)) if self.lstm else None
        return h, c

    def input_gates(self, inputs):
        """Input gates of the first cell for decoder inputs (..., D)."""
        return self.cells[0].input_gates(inputs)

    def capsule_bias(self, p):
        return self.capsule_gates(p) if self.capsule_gates is not None else None

    def step(self, gates_x, cap_bias, h, c):
        """One step of every layer; returns the new (h, c) lists."""
        x = gates_x if cap_bias is None else gates_x + cap_bias
        new_h, new_c = [], [] if self.lstm else None
        for l, cell in enumerate(self.cells):
            if l > 0:
                x = cell.input_gates(new_h[-1])
            hl, cl = cell(x, h[l], c[l] if self.lstm else None)
            new_h.append(hl)
            if self.lstm:
                new_c.append(cl)
        return new_h, new_c

    def run(self, gates_x, cap_bias, h, c, valid=None, steps=None):
        """Run blocks: gates_x (N, K, G), cap_bias (N, G) or None, states from ``initial_state``.

        ``valid`` (N, K) bool marks the steps each block really takes (None: all); a block holds
        its state at the other steps. ``steps``: the range of steps to run (default all K).
        Returns the top cell's output (N, K, hd) (zeros at steps not run) and the final states.
        """
        N, K, _ = gates_x.shape
        steps = range(K) if steps is None else steps
        outs = [None] * K
        for s in steps:
            new_h, new_c = self.step(gates_x[:, s], cap_bias, h, c)
            if valid is None:
                h, c = new_h, new_c
            else:
                keep = valid[:, s : s + 1]
                h = [torch.where(keep, a, b.to(a.dtype)) for a, b in zip(new_h, h)]
                if self.lstm:
                    c = [torch.where(keep, a, b.to(a.dtype)) for a, b in zip(new_c, c)]
            outs[s] = new_h[-1]
        zero = None
        for s in range(K):
            if outs[s] is None:
                if zero is None:
                    ref = next(o for o in outs if o is not None)
                    zero = ref.new_zeros(ref.shape)
                outs[s] = zero
        return torch.stack(outs, dim=1), h, c

    def output(self, hidden):
        """Decoder outputs (..., hd) -> normalised vectors (..., D) for the tied LM head."""
        return self.norm(self.decoder_out(hidden))


# ----------------------------------------------------------------------------- models
class HMTRPreTrainedModel(StrataPreTrainedModel):
    config_class = HMTRConfig
    config: HMTRConfig
    base_model_prefix = "model"
    # The FSDP / device-map units. Not HMTRDecoder: it is driven through its methods (step, run,
    # initial_state), which FSDP2 does not unshard for, so its (small) weights stay in the root unit.
    _no_split_modules = ["HMTREncoderBlock", "HMTRReasonerBlock"]
    _auto_map_classes = {"AutoModel": "HMTRModel", "AutoModelForCausalLM": "HMTRForCausalLM"}

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, nn.Linear) and hasattr(module, "hmtr_init_std"):
            init.normal_(module.weight, mean=0.0, std=module.hmtr_init_std)
            if module.bias is not None:
                init.zeros_(module.bias)
            return
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MambaMixer):
            module.init_mamba_weights(init)
        elif isinstance(module, HMTRReasoner):
            init.normal_(module.start_capsule, mean=0.0, std=std)
        elif isinstance(module, HMTRDecoder):
            init.normal_(module.start_input, mean=0.0, std=std)


def _state_layer(cache: RecurrentCache, config: HMTRConfig):
    return cache.layer(config.decoder_cache_offset)


class HMTRModel(HMTRPreTrainedModel):
    """Encoder + reasoner + decoder; returns the decoder's normalised outputs (B, T, D)."""

    def __init__(self, config: HMTRConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.encoder = HMTREncoder(config)
        self.reasoner = HMTRReasoner(config)
        self.decoder = HMTRDecoder(config)
        self.gradient_checkpointing = False
        self.post_init()

    # ------------------------------------------------------------------ state
    def read_state(self, cache: RecurrentCache | None, batch: int) -> dict | None:
        """The decoder/bookkeeping state held by ``cache`` (None when it is empty)."""
        if cache is None:
            return None
        layer = _state_layer(cache, self.config)
        count = layer.get(COUNT)
        if count is None:
            return None
        if count.shape[0] != batch:
            raise ValueError(
                f"the cache holds the state of {count.shape[0]} sequences but the input has batch size {batch}"
            )
        off = self.config.decoder_cache_offset
        L = self.config.decoder_layers
        return {
            COUNT: count,
            PROMPT_P: layer.get(PROMPT_P),
            CAPSULE_MASK: layer.get(CAPSULE_MASK),
            PENDING: layer.get(PENDING),
            PENDING_MASK: layer.get(PENDING_MASK),
            DEC_H: [cache.layer(off + l).get(DEC_H) for l in range(L)],
            DEC_C: [cache.layer(off + l).get(DEC_C) for l in range(L)] if self.decoder.lstm else None,
        }

    def write_state(self, cache: RecurrentCache, state: dict) -> None:
        off = self.config.decoder_cache_offset
        cache.set(off, **{k: state[k] for k in (COUNT, PROMPT_P, CAPSULE_MASK, PENDING, PENDING_MASK)})
        for l in range(self.config.decoder_layers):
            cache.set(off + l, **{DEC_H: state[DEC_H][l]})
            if self.decoder.lstm:
                cache.set(off + l, **{DEC_C: state[DEC_C][l]})

    def reasoner_cache_nbytes(self, cache: RecurrentCache) -> int:
        """Bytes of the reasoner's key/value cache over capsules."""
        c = self.config
        layers = range(c.reasoner_cache_offset, c.reasoner_cache_offset + c.reasoner_layers)
        return sum(t.numel() * t.element_size() for i in layers for t in cache.layer(i).tensors.values())

    # ------------------------------------------------------------------ capsules
    def encode_capsules(self, input_ids=None, inputs_embeds=None):
        """Capsules (B, L // K, D) of complete blocks of texts that start at a block boundary:
        the capsule head's mean at positions K - 1, 2K - 1, ... (no padding, no cache)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        K = self.config.block_size
        n = x.shape[1] // K
        if n == 0:
            raise ValueError(f"a text of {x.shape[1]} tokens holds no complete block of block_size={K} tokens")
        y = self.encoder(x[:, : n * K])
        return self.encoder.capsule_stats(y[:, K - 1 :: K])[0]

    # ------------------------------------------------------------------ forward
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
        """As any decoder; ``position_ids`` are ignored (block positions count each row's real tokens)."""
        config = self.config
        use_cache = use_cache if use_cache is not None else (config.use_cache and not self.training)
        cache = self.resolve_cache(past_key_values, use_cache)
        B, T = self.check_inputs(input_ids, inputs_embeds, attention_mask, cache)
        state = self.read_state(cache, B)
        past = cache.get_seq_length() if cache is not None else 0
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        device = x.device
        _, _, token_mask = self.positions_and_masks(attention_mask, past, T, device)
        K = config.block_size
        D = config.hidden_size

        if (T == 1 and state is not None and (token_mask is None or bool(token_mask.all()))
                and not bool(((state[COUNT] + 1) % K == 0).any())):
            hidden = self._decoder_step(x, state, cache)  # inside a block: the decoder alone
            return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache,
                                           hidden_states=(x, hidden) if output_hidden_states else None)
        real = torch.ones(B, T, dtype=torch.bool, device=device) if token_mask is None else token_mask.bool()
        fresh = state is None
        count = torch.zeros(B, dtype=torch.long, device=device) if fresh else state[COUNT]
        csum = real.long().cumsum(1)
        v = count[:, None] + csum - 1  # position of each real token among its row's real tokens
        step = (v + 1) % K  # decoder step that predicts the next token
        is_cap = real & (step == 0)  # the token ends a block: its encoder output is a capsule
        n_real = csum[:, -1]
        n_cap = is_cap.long().sum(1)
        M = int(n_cap.max())

        # ---------------------------------------------------------- encoder (lazy)
        pend = state[PENDING] if not fresh else x.new_zeros(B, 0, D)
        pend_m = state[PENDING_MASK] if not fresh else torch.zeros(B, 0, dtype=torch.bool, device=device)
        P0 = pend.shape[1]
        caps = cap_mask = None
        if M > 0:
            enc_x = torch.cat([pend.to(x.dtype), x], dim=1) if P0 else x
            enc_m = torch.cat([pend_m, real], dim=1) if P0 else real
            if cache is None:  # nothing after the last capsule is needed
                last = int(is_cap.nonzero()[:, 1].max()) + 1
                enc_x, enc_m = enc_x[:, :last], enc_m[:, :last]
            y = self.encoder(enc_x, None if bool(enc_m.all()) else enc_m, cache)
            order = torch.sort((~is_cap).to(torch.int8), dim=1, stable=True).indices[:, :M] + P0  # capsule positions first
            y_cap = y.gather(1, order[:, :, None].expand(-1, -1, D))
            caps = self.encoder.capsule_stats(y_cap)[0]  # (B, M, D): the mean for a variational capsule
            cap_mask = torch.arange(M, device=device)[None] < n_cap[:, None]
            new_pend, new_pend_m = x.new_zeros(B, 0, D), torch.zeros(B, 0, dtype=torch.bool, device=device)
        else:
            new_pend = torch.cat([pend, x.detach()], dim=1) if cache is not None else pend
            new_pend_m = torch.cat([pend_m, real], dim=1) if cache is not None else pend_m

        # ---------------------------------------------------------- reasoner
        prev_mask = state[CAPSULE_MASK] if not fresh else torch.zeros(B, 0, dtype=torch.bool, device=device)
        slots, slot_mask = caps, cap_mask
        if fresh:
            start = self.reasoner.start_capsule.to(x.dtype).expand(B, 1, D).contiguous()
            ones = torch.ones(B, 1, dtype=torch.bool, device=device)
            slots = start if caps is None else torch.cat([start, caps.to(x.dtype)], dim=1)
            slot_mask = ones if cap_mask is None else torch.cat([ones, cap_mask], dim=1)
        predicted = None
        new_capsule_mask = prev_mask
        if slots is not None:
            positions = prev_mask.long().sum(1, keepdim=True) + slot_mask.long().cumsum(1) - 1
            full_mask = torch.cat([prev_mask, slot_mask], dim=1)
            key_mask = None if bool(full_mask.all()) else full_mask.long()
            h = self.reasoner.hidden(slots, positions.clamp(min=0), key_mask, cache)
            predicted = self.reasoner.predict(h)
            new_capsule_mask = full_mask

        # ---------------------------------------------------------- decoder state entering this call
        dec = self.decoder
        if fresh:  # the state before the first token: block 0, step 0 (block-start input) from P_0
            p_prev = predicted[:, 0]
            h_prev, c_prev = dec.initial_state(p_prev)
            # (a fresh copy: parameters loaded from a checkpoint may sit at addresses for which
            # the vectorised kernels sum in another order)
            g0 = dec.input_gates(dec.start_input.to(x.dtype).expand(B, -1).contiguous())
            h_prev, c_prev = dec.step(g0, dec.capsule_bias(p_prev), h_prev, c_prev)
            p_caps = predicted[:, 1:]
        else:
            p_prev, h_prev, c_prev = state[PROMPT_P], state[DEC_H], state[DEC_C]
            p_caps = predicted

        # ---------------------------------------------------------- decoder canvas: (row, segment, step)
        s0 = (count + 1) % K  # step of the row's first token in this call
        b0 = (count + 1) // K
        seg = torch.where(real, (v + 1) // K - b0[:, None], 0)  # (B, T)
        n_seg = int(seg.max()) + 1
        offset = (s0 != 0).long()  # segment 0 continues the row's open block unless it starts a new one
        g_idx = torch.arange(n_seg, device=device)[None]  # (1, G)
        cap_rank = g_idx - offset[:, None]  # which of this call's capsules starts segment g
        resets = (cap_rank >= 0) & (cap_rank < n_cap[:, None])  # (B, G)
        if M > 0:
            p_from = p_caps.gather(1, cap_rank.clamp(0, M - 1)[:, :, None].expand(-1, -1, D))
            p_seg = torch.where(resets[:, :, None], p_from, p_prev[:, None].to(p_from.dtype))
        else:
            p_seg = p_prev[:, None].expand(B, n_seg, D)
        N = B * n_seg
        p_flat = p_seg.reshape(N, D)
        h_init, c_init = dec.initial_state(p_flat) if M > 0 else (None, None)
        reset_flat = resets.reshape(N, 1)

        def entering(prev, fresh_init):  # segment 0: the row's state; a resetting segment: from its capsule
            rep = prev.repeat_interleave(n_seg, dim=0) if n_seg > 1 else prev
            if fresh_init is None:
                return rep
            return torch.where(reset_flat, fresh_init, rep.to(fresh_init.dtype))

        h_seg = [entering(h_prev[l], h_init[l] if h_init is not None else None) for l in range(dec.num_layers)]
        c_seg = [entering(c_prev[l], c_init[l] if c_init is not None else None) for l in range(dec.num_layers)] \
            if dec.lstm else None

        flat = (torch.arange(B, device=device)[:, None] * n_seg + seg) * K + step  # canvas cell of each token
        flat = torch.where(real, flat, N * K)  # padding goes to a scratch cell
        if dec.first_input_is_previous_token:  # step 0 reads the last token of the previous block
            inputs = x
        else:  # step 0 reads the block-start vector
            inputs = torch.where((step == 0)[:, :, None], dec.start_input.to(x.dtype), x)
        gates = dec.input_gates(inputs)  # (B, T, G)
        G = gates.shape[-1]
        canvas = gates.new_zeros(N * K + 1, G).index_put((flat.reshape(-1),), gates.reshape(-1, G))
        valid = torch.zeros(N * K + 1, dtype=torch.bool, device=device).index_put(
            (flat.reshape(-1),), torch.ones(B * T, dtype=torch.bool, device=device))
        canvas, valid = canvas[:-1].view(N, K, G), valid[:-1].view(N, K)
        steps_used = valid.any(0).nonzero()[:, 0]
        if steps_used.numel():
            steps = range(int(steps_used.min()), int(steps_used.max()) + 1)
            outs, h_seg, c_seg = dec.run(canvas, dec.capsule_bias(p_flat), h_seg, c_seg, valid, steps)
            out_flat = torch.cat([outs.reshape(N * K, -1), outs.new_zeros(1, outs.shape[-1])], dim=0)
            out_tok = out_flat[flat.reshape(-1)].view(B, T, -1)
        else:  # no real token in this call
            out_tok = x.new_zeros(B, T, dec.hidden_size)
        hidden = dec.output(out_tok)

        # ---------------------------------------------------------- state leaving this call
        if cache is not None:
            last_seg = torch.where(n_real > 0, seg.max(dim=1).values, 0)
            pick = torch.arange(B, device=device) * n_seg + last_seg
            grad = torch.is_grad_enabled()

            def keep(t):
                return t.detach() if grad else t

            new_state = {
                COUNT: count + n_real,
                PROMPT_P: keep(p_flat[pick]),
                CAPSULE_MASK: new_capsule_mask,
                PENDING: new_pend.detach(),
                PENDING_MASK: new_pend_m,
                DEC_H: [keep(t[pick]) for t in h_seg],
                DEC_C: [keep(t[pick]) for t in c_seg] if dec.lstm else None,
            }
            if grad:  # the reasoner's keys/values were appended with their graph
                r0 = config.reasoner_cache_offset
                for i in range(r0, r0 + config.reasoner_layers):
                    cache.layer(i).map_(lambda t: t.detach())
                for i in range(config.encoder_layers):
                    cache.layer(i).map_(lambda t: t.detach())
            self.write_state(cache, new_state)
            cache.advance(T)
        hidden_states = (x, hidden) if output_hidden_states else None
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache, hidden_states=hidden_states)


    def _decoder_step(self, x, state: dict, cache: RecurrentCache):
        """One real token per row that completes no block (the common decoding step): the
        token waits in ``pending`` for the encoder; the decoder takes one step. Computes what
        the general path computes for such a token, without building the block canvas."""
        dec = self.decoder
        gates = dec.input_gates(x[:, 0])
        h, c = dec.step(gates, dec.capsule_bias(state[PROMPT_P]), state[DEC_H], state[DEC_C])
        hidden = dec.output(h[-1])[:, None]
        grad = torch.is_grad_enabled()
        new_state = dict(state)
        new_state.update({
            COUNT: state[COUNT] + 1,
            PENDING: torch.cat([state[PENDING], x.detach()], dim=1),
            PENDING_MASK: torch.cat([state[PENDING_MASK], state[PENDING_MASK].new_ones(x.shape[0], 1)], dim=1),
            DEC_H: [t.detach() if grad else t for t in h],
            DEC_C: [t.detach() if grad else t for t in c] if dec.lstm else None,
        })
        self.write_state(cache, new_state)
        cache.advance(1)
        return hidden


class HMTRForCausalLM(HMTRPreTrainedModel, BlockGenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HMTRConfig):
        super().__init__(config)
        self.model = HMTRModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

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

    # ------------------------------------------------------------------ stage 1: autoencoder
    def autoencoder_loss(self, input_ids: torch.LongTensor, labels: torch.LongTensor | None = None,
                         sample: bool | None = None) -> dict[str, torch.Tensor]:
        """Stage 1: rebuild every block of ``input_ids`` (B, L), L a multiple of K, from its own capsule.

        ``labels`` (default ``input_ids`` with padding ignored) mark the tokens scored (-100:
        not scored). A variational capsule is sampled (``sample``, default: in training) and its
        KL to N(0, I), counted per dimension above ``capsule_kl_clamp`` nats, is added with
        weight ``capsule_kl_weight``. In training, encoder input tokens are zeroed with
        probability ``token_dropout`` and the capsule gets dropout ``capsule_dropout``.
        Returns loss, ce, kl, accuracy (of the scored tokens), correct and scored counts.
        """
        config, m = self.config, self.model
        K = config.block_size
        if input_ids.dim() != 2 or input_ids.shape[1] % K or input_ids.shape[1] == 0:
            raise ValueError(
                f"`input_ids` must have shape (batch, n * block_size) with block_size={K}, got {tuple(input_ids.shape)}"
            )
        if labels is None:
            labels = input_ids.masked_fill(input_ids == config.pad_token_id, -100) \
                if config.pad_token_id is not None else input_ids
        B, L = input_ids.shape
        nb = L // K
        x = m.embed_tokens(input_ids)
        enc_in = x
        if self.training and config.token_dropout > 0:
            keep = torch.rand(B, L, 1, device=x.device) >= config.token_dropout
            enc_in = x * keep.to(x.dtype)
        y = m.encoder(enc_in)
        mu, logvar = m.encoder.capsule_stats(y[:, K - 1 :: K])  # (B, nb, D)
        sample = self.training if sample is None else sample
        kl = mu.new_zeros(())
        z = mu
        if logvar is not None:
            if sample:
                z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            kl_dim = 0.5 * (mu.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float())  # (B, nb, D)
            kl = kl_dim.clamp(min=config.capsule_kl_clamp).sum(-1).mean()
        if self.training and config.capsule_dropout > 0:
            z = F.dropout(z, config.capsule_dropout, training=True)
        previous = None
        if m.decoder.first_input_is_previous_token:  # block b's step 0 reads token bK - 1 (block 0: the start)
            previous = torch.cat([m.decoder.start_input.to(x.dtype).expand(B, 1, -1), x[:, K - 1 : -1 : K]], 1)
            previous = previous.reshape(B * nb, -1)
        logits = self.decode_blocks(z.reshape(B * nb, -1), x.view(B * nb, K, -1), previous)
        targets = labels.view(B * nb, K)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)
        scored = targets != -100
        correct = ((logits.argmax(-1) == targets) & scored).sum()
        n = scored.sum()
        loss = ce + config.capsule_kl_weight * kl if logvar is not None else ce
        return {"loss": loss, "ce": ce.detach(), "kl": kl.detach(), "accuracy": correct.float() / n.clamp(min=1),
                "correct": correct, "scored": n}

    def decode_blocks(self, capsules: torch.Tensor, block_embeds: torch.Tensor,
                      previous: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits (N, K, V) of blocks whose token embeddings are ``block_embeds``
        (N, K, D), each decoded from a capsule (N, D): step s reads token s - 1 and predicts token
        s; step 0 reads the block-start vector, or with ``decoder_first_input="previous_token"``
        ``previous`` (N, D), the embedding of the token before the block."""
        dec = self.model.decoder
        N, K, D = block_embeds.shape
        first = dec.start_input.to(block_embeds.dtype).expand(N, 1, D) if previous is None else previous[:, None]
        inputs = torch.cat([first, block_embeds[:, :-1]], dim=1)
        h, c = dec.initial_state(capsules)
        outs, _, _ = dec.run(dec.input_gates(inputs), dec.capsule_bias(capsules), h, c)
        return self.lm_head(dec.output(outs))

    # ------------------------------------------------------------------ stage 2: latent prediction
    def latent_loss(self, capsules: torch.Tensor, capsule_mask: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Stage 2: the reasoner predicts every capsule of ``capsules`` (B, n, D) from the start
        capsule and the capsules before it. ``capsule_mask`` (B, n) marks real capsules (the
        rest, at the end of a row, is not scored).

        ``loss="mse"``: mean squared error per dimension + ``cosine_weight`` x (1 - cosine).
        ``loss="energy"``: the energy score with ``energy_samples`` draws per capsule,
        2/N sum_i |z_i - y| - 1/(N(N-1)) sum_{i != j} |z_i - z_j| (a strictly proper score).
        Returns loss, mse and cosine (of the deterministic prediction, noise 0).
        """
        config, r = self.config, self.model.reasoner
        if capsules.dim() != 3 or capsules.shape[-1] != config.hidden_size or capsules.shape[1] == 0:
            raise ValueError(f"`capsules` must have shape (batch, n >= 1, {config.hidden_size}), "
                             f"got {tuple(capsules.shape)}")
        B, n, D = capsules.shape
        target = capsules
        start = r.start_capsule.to(capsules.dtype).expand(B, 1, D)
        slots = torch.cat([start, capsules[:, :-1]], dim=1)
        positions = torch.arange(n, device=capsules.device)[None]
        h = r.hidden(slots, positions)
        mask = torch.ones(B, n, dtype=torch.bool, device=capsules.device) if capsule_mask is None \
            else capsule_mask.bool()
        w = mask.float()
        denom = w.sum().clamp(min=1)
        point = r.predict(h)
        mse = (((point.float() - target.float()) ** 2).mean(-1) * w).sum() / denom
        cos = (F.cosine_similarity(point.float(), target.float(), dim=-1) * w).sum() / denom
        if not r.energy:
            loss = mse + config.cosine_weight * (1.0 - cos)
        else:
            S = config.energy_samples
            noise = torch.randn(B, n, S, config.energy_noise_size, device=h.device, generator=generator)
            draws = r.predict(h[:, :, None].expand(-1, -1, S, -1), noise).float()  # (B, n, S, D)
            eps = 1e-8
            to_target = ((draws - target.float()[:, :, None]) ** 2).sum(-1).add(eps).sqrt().mean(-1)
            pair = ((draws[:, :, :, None] - draws[:, :, None]) ** 2).sum(-1).add(eps).sqrt()
            between = (pair.sum((-1, -2)) - S * math.sqrt(eps)) / (S * (S - 1))
            score = 2 * to_target - between
            loss = (score * w).sum() / denom
        return {"loss": loss, "mse": mse.detach(), "cosine": cos.detach()}

    # ------------------------------------------------------------------ exact likelihood
    @torch.no_grad()
    def sequence_log_prob(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """log p(x_1 .. x_{L-1} | x_0) per row (B,), from one full forward (the exact LM)."""
        logits = self(input_ids, use_cache=False).logits[:, :-1].float()
        return logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1).sum(-1)
