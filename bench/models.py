"""Models the benchmarks compare, all built locally from a config (no Hub access).

strata presets (``RetMambaConfig.from_preset``) and the Transformers models a user
would otherwise pick, at matched width and depth and the same vocabulary:

- ``llama``:    ``LlamaForCausalLM`` matched to ``transformer-<size>`` (same hidden, MLP,
                heads, layers, tied embeddings, RMSNorm eps, rope theta);
- ``hf-mamba``: ``MambaForCausalLM`` with the width, state size, expansion, conv width
                and depth of ``mamba-<size>`` (HF Mamba blocks have no MLP, so it has
                fewer parameters at equal depth; parameter counts are reported).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402

import strata  # noqa: E402

STRATA_FAMILIES = ("transformer", "retnet", "mamba", "hybrid", "fusion")
RECURRENT_FAMILIES = ("retnet", "mamba", "fusion")
REFERENCES = ("llama", "hf-mamba")
VOCAB_SIZE = 8000


def strata_config(family: str, size: str = "small", vocab_size: int = VOCAB_SIZE, **overrides):
    # max_position_embeddings only bounds generate's length check (rotary tables are computed
    # per position), raised so that a 16k prompt plus new tokens does not warn.
    overrides.setdefault("max_position_embeddings", 32768)
    return strata.RetMambaConfig.from_preset(f"{family}-{size}", vocab_size=vocab_size, **overrides)


def llama_config(size: str = "small", vocab_size: int = VOCAB_SIZE):
    ref = strata_config("transformer", size, vocab_size)
    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=ref.hidden_size,
        intermediate_size=ref.intermediate_size,
        num_hidden_layers=ref.num_hidden_layers,
        num_attention_heads=ref.num_attention_heads,
        num_key_value_heads=ref.num_key_value_heads,
        max_position_embeddings=ref.max_position_embeddings,
        rms_norm_eps=ref.rms_norm_eps,
        rope_theta=ref.rope_theta,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        pad_token_id=ref.pad_token_id,
        bos_token_id=ref.bos_token_id,
        eos_token_id=ref.eos_token_id,
    )


def hf_mamba_config(size: str = "small", vocab_size: int = VOCAB_SIZE):
    ref = strata_config("mamba", size, vocab_size)
    return transformers.MambaConfig(
        vocab_size=vocab_size,
        hidden_size=ref.hidden_size,
        num_hidden_layers=ref.num_hidden_layers,
        state_size=ref.state_size,
        expand=ref.expand,
        conv_kernel=ref.conv_kernel,
        time_step_rank=ref.time_step_rank,
        use_conv_bias=ref.use_conv_bias,
        tie_word_embeddings=True,
        pad_token_id=ref.pad_token_id,
        bos_token_id=ref.bos_token_id,
        eos_token_id=ref.eos_token_id,
    )


def build(name: str, size: str = "small", vocab_size: int = VOCAB_SIZE, seed: int = 0):
    """A freshly initialised model by bench name: a strata family, ``llama`` or ``hf-mamba``."""
    torch.manual_seed(seed)
    if name == "llama":
        model = transformers.LlamaForCausalLM._from_config(llama_config(size, vocab_size), attn_implementation="sdpa")
    elif name == "hf-mamba":
        model = transformers.MambaForCausalLM(hf_mamba_config(size, vocab_size))
    elif name in STRATA_FAMILIES:
        model = strata.RetMambaForCausalLM(strata_config(name, size, vocab_size))
    else:
        raise ValueError(f"unknown bench model {name!r}; expected one of {STRATA_FAMILIES + REFERENCES}")
    return model.float()


def num_parameters(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def describe(model) -> dict:
    c = model.config
    return {
        "class": type(model).__name__,
        "parameters": num_parameters(model),
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "vocab_size": c.vocab_size,
        "layer_pattern": getattr(c, "layer_pattern", None),
    }
