"""The RetNet x Mamba family (seed 003): one model class, four token mixers.

``config.layer_pattern`` picks the mixer of each pre-norm block (RMSNorm, mixer,
RMSNorm, SwiGLU MLP):

    A  CausalSelfAttention      (layers_common)     Transformer baseline
    R  MultiScaleRetention      (layers_retention)  RetNet baseline
    M  MambaMixer               (layers_mamba)      Mamba baseline
    F  RetMambaFusionMixer      (below)            the fusion

Data flow: input_ids -> embed_tokens -> blocks -> norm -> lm_head -> logits.
All state (keys/values, retention matrices, conv and SSM states) lives in one
RecurrentCache, so decoding token by token equals one full forward pass.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers import initialization as init

from strata.configuration.configuration_retmamba import RetMambaConfig
from strata.modeling.generation_blocks import BlockGenerationMixin
from strata.modeling.layers_common import CausalSelfAttention, RMSNorm, RotaryEmbedding, SwiGLUMLP
from strata.modeling.layers_mamba import MambaMixer
from strata.modeling.layers_retention import MultiScaleRetention
from strata.modeling.modeling_common import StrataPreTrainedModel

# PEFT LoRA targets: every projection of every mixer and MLP.
LORA_TARGET_MODULES = [
    "q_proj", "k_proj", "v_proj", "o_proj", "g_proj",  # attention / retention
    "in_proj", "x_proj", "out_proj",  # mamba
    "gate_proj", "up_proj", "down_proj",  # MLP
    "fusion_gate",  # fusion
]


class RetMambaFusionMixer(nn.Module):
    """Retention and a selective SSM on the same input, mixed per channel by a learned gate.

    out = g * retention(x) + (1 - g) * mamba(x),  g = sigmoid(W x) (per token, per channel);
    ``config.fusion_gate = False`` sums the branches instead (ablation).
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.retention = MultiScaleRetention(config, layer_idx, selective_decay=config.fusion == "selective_decay")
        self.mamba = MambaMixer(config, layer_idx)
        self.fusion_gate = nn.Linear(config.hidden_size, config.hidden_size, bias=True) if config.fusion_gate else None

    def forward(self, x, position_embeddings, attention_mask=None, token_mask=None, cache=None):
        r = self.retention(x, position_embeddings, attention_mask, token_mask, cache)
        m = self.mamba(x, position_embeddings, attention_mask, token_mask, cache)
        if self.fusion_gate is None:
            return r + m
        g = torch.sigmoid(self.fusion_gate(x))
        return g * r + (1 - g) * m


MIXER_CLASSES = {"A": CausalSelfAttention, "R": MultiScaleRetention, "M": MambaMixer, "F": RetMambaFusionMixer}


class RetMambaBlock(GradientCheckpointingLayer):
    def __init__(self, config: RetMambaConfig, layer_idx: int):
        super().__init__()
        self.mixer_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = MIXER_CLASSES[config.layer_pattern[layer_idx]](config, layer_idx)
        if config.intermediate_size:
            self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)
        else:  # mixer-only blocks, as in the original Mamba
            self.mlp_norm = self.mlp = None

    def forward(self, hidden_states, position_embeddings, attention_mask=None, token_mask=None, cache=None):
        h = hidden_states + self.mixer(self.mixer_norm(hidden_states), position_embeddings, attention_mask,
                                       token_mask, cache)
        return h if self.mlp is None else h + self.mlp(self.mlp_norm(h))


class RetMambaPreTrainedModel(StrataPreTrainedModel):
    config_class = RetMambaConfig
    config: RetMambaConfig
    base_model_prefix = "model"
    _no_split_modules = ["RetMambaBlock"]
    _auto_map_classes = {"AutoModel": "RetMambaModel", "AutoModelForCausalLM": "RetMambaForCausalLM"}

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MambaMixer):
            module.init_mamba_weights(init)
        elif isinstance(module, MultiScaleRetention) and module.selective_decay:
            module.init_selective_decay(init)


class RetMambaModel(RetMambaPreTrainedModel):
    def __init__(self, config: RetMambaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(RetMambaBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.gradient_checkpointing = False
        self.post_init()

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
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        cache = self.resolve_cache(past_key_values, use_cache)
        B, T = self.check_inputs(input_ids, inputs_embeds, attention_mask, cache)
        past = cache.get_seq_length() if cache is not None else 0
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        positions, key_mask, token_mask = self.positions_and_masks(attention_mask, past, T, h.device)
        if position_ids is not None and key_mask is None:
            positions = position_ids
        rope = self.rotary(positions, h.dtype)

        all_hidden = (h,) if output_hidden_states else None
        for layer in self.layers:
            h = layer(h, rope, key_mask, token_mask, cache)
            if output_hidden_states:
                all_hidden += (h,)
        h = self.norm(h)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (h,)
        if cache is not None:
            cache.advance(T)
        return BaseModelOutputWithPast(last_hidden_state=h, past_key_values=cache, hidden_states=all_hidden)


class RetMambaForCausalLM(RetMambaPreTrainedModel, BlockGenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RetMambaConfig):
        super().__init__(config)
        self.model = RetMambaModel(config)
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
