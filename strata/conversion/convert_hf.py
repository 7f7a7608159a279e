"""Bring Transformers checkpoints into strata, weight for weight.

- ``MambaForCausalLM`` -> a RetMamba model of Mamba blocks (``layer_pattern="M"``,
  ``intermediate_size=0``: the original Mamba has no MLP). Mixer parameter names are
  the same in both, so the mapping is a rename of the block prefixes.
- ``LlamaForCausalLM`` -> a RetMamba model of attention blocks (``layer_pattern="A"``):
  same RoPE convention (rotate-half), RMSNorm and SwiGLU, so logits match exactly.

Everything else is refused with an error naming the feature (biases, rope scaling,
head_dim != hidden/heads, ...): a conversion that silently changes the function is
worse than none. Weights are read from safetensors only.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from transformers import AutoModelForCausalLM

from strata.configuration.configuration_retmamba import RetMambaConfig
from strata.modeling.modeling_retmamba import RetMambaForCausalLM


def _refuse(source: str, what: str) -> None:
    raise ValueError(f"cannot convert this {source} checkpoint exactly: {what}")


def mamba_config_to_retmamba(hf) -> RetMambaConfig:
    if getattr(hf, "use_bias", False):
        _refuse("Mamba", "`use_bias=True` (in/out projections with bias) has no RetMamba counterpart")
    if getattr(hf, "hidden_act", "silu") != "silu":
        _refuse("Mamba", f"activation {hf.hidden_act!r} (RetMamba's Mamba mixer uses silu)")
    return RetMambaConfig(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, layer_pattern="M",
        num_hidden_layers=hf.num_hidden_layers, intermediate_size=0, state_size=hf.state_size,
        conv_kernel=hf.conv_kernel, expand=hf.expand, time_step_rank=hf.time_step_rank,
        time_step_min=hf.time_step_min, time_step_max=hf.time_step_max, time_step_floor=hf.time_step_floor,
        use_conv_bias=hf.use_conv_bias, rms_norm_eps=hf.layer_norm_epsilon,
        tie_word_embeddings=hf.tie_word_embeddings, pad_token_id=hf.pad_token_id,
        bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id,
    )


def mamba_key(key: str) -> str:
    key = key.replace("backbone.embeddings.", "model.embed_tokens.").replace("backbone.norm_f.", "model.norm.")
    key = key.replace("backbone.layers.", "model.layers.")
    return key.replace(".norm.weight", ".mixer_norm.weight") if ".layers." in key else key


def llama_config_to_retmamba(hf) -> RetMambaConfig:
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        _refuse("Llama", f"rope scaling {rope.get('rope_type')!r} is not implemented in RetMamba attention")
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
        _refuse("Llama", "attention or MLP biases")
    if getattr(hf, "head_dim", hf.hidden_size // hf.num_attention_heads) != hf.hidden_size // hf.num_attention_heads:
        _refuse("Llama", f"head_dim {hf.head_dim} != hidden_size / num_attention_heads")
    if hf.hidden_act != "silu":
        _refuse("Llama", f"activation {hf.hidden_act!r} (RetMamba's MLP is SwiGLU with silu)")
    return RetMambaConfig(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, layer_pattern="A",
        num_hidden_layers=hf.num_hidden_layers, intermediate_size=hf.intermediate_size,
        num_attention_heads=hf.num_attention_heads, num_key_value_heads=hf.num_key_value_heads,
        rope_theta=rope.get("rope_theta", 10000.0), max_position_embeddings=hf.max_position_embeddings,
        rms_norm_eps=hf.rms_norm_eps, tie_word_embeddings=hf.tie_word_embeddings,
        pad_token_id=hf.pad_token_id, bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id,
    )


_LLAMA_RENAMES = {
    ".self_attn.": ".mixer.",
    ".input_layernorm.": ".mixer_norm.",
    ".post_attention_layernorm.": ".mlp_norm.",
}


def llama_key(key: str) -> str:
    for old, new in _LLAMA_RENAMES.items():
        key = key.replace(old, new)
    return key


CONVERTERS: dict[str, tuple[str, Callable, Callable]] = {
    "hf-mamba": ("mamba", mamba_config_to_retmamba, mamba_key),
    "hf-llama": ("llama", llama_config_to_retmamba, llama_key),
}


def convert_hf_model(source_model, kind: str) -> RetMambaForCausalLM:
    """Convert an in-memory Transformers model (``kind`` in CONVERTERS) to RetMamba."""
    if kind not in CONVERTERS:
        raise ValueError(f"unknown conversion {kind!r}; available: {sorted(CONVERTERS)}")
    model_type, to_config, to_key = CONVERTERS[kind]
    if source_model.config.model_type != model_type:
        raise ValueError(f"--from {kind} expects a {model_type!r} checkpoint, got {source_model.config.model_type!r}")
    config = to_config(source_model.config)
    target = RetMambaForCausalLM(config)
    expected = target.state_dict()
    state = {}
    for key, tensor in source_model.state_dict().items():
        new = to_key(key)
        if new not in expected:
            raise ValueError(f"{kind}: no RetMamba parameter for {key!r} (mapped to {new!r})")
        if expected[new].shape != tensor.shape:
            raise ValueError(f"{kind}: {key} has shape {tuple(tensor.shape)}, RetMamba expects {tuple(expected[new].shape)}")
        state[new] = tensor
    missing = set(expected) - set(state)
    if config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ValueError(f"{kind}: the checkpoint lacks {sorted(missing)}")
    target.load_state_dict(state, strict=False)
    target.tie_weights()
    return target.eval()


def convert_checkpoint(kind: str, src: str | os.PathLike, dst: str | os.PathLike) -> RetMambaForCausalLM:
    """Convert the Transformers checkpoint folder ``src`` into a strata folder ``dst``."""
    source = AutoModelForCausalLM.from_pretrained(src, use_safetensors=True, dtype=torch.float32)
    model = convert_hf_model(source, kind)
    model.save_pretrained(dst)
    return model
