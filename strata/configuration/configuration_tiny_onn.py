"""Configuration of Tiny-ONN (seed 004): a dynamic-expert language model.

- Text enters as ``char_embed[input_ids] + word_embed[word_token_ids]`` (hierarchical
  embedding injection); the 1D sequence position is rotary (RoPE, optionally YaRN-scaled
  through the standard ``rope_scaling`` / ``rope_parameters`` dict of Transformers).
- Image / spectrogram patches enter the same sequence through ``patch_embed`` with a 2D
  rotary encoding of the patch's (x, y) inside its embedding.
- Every block: DynSIHA attention (a pool of heads, each token picks a variable number by
  threshold gating) and MoIE feed-forward (many small experts, same gating).
- Training adds the surprise-based routing loss and reports the PI score.
"""

from __future__ import annotations

import copy

from transformers import PretrainedConfig

from strata.configuration.configuration_common import (
    StrataConfigMixin,
    check_choice,
    check_float,
    check_int,
)

_TINY = dict(
    vocab_size=512, word_vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_experts=8, expert_size=32, max_position_embeddings=1024, patch_size=4, num_channels=3,
)
# The seed's "bonsai" model (~0.1B parameters), 20k character vocabulary, 32k native context.
_BONSAI = dict(
    vocab_size=20000, word_vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    num_experts=32, expert_size=96, max_position_embeddings=32768, patch_size=16, num_channels=3,
)
# A larger documented preset (~1.1B parameters) for the omni direction of the seed.
_OMNI_1B = dict(
    vocab_size=20000, word_vocab_size=64000, hidden_size=2048, num_hidden_layers=20, num_attention_heads=16,
    num_experts=64, expert_size=96, max_position_embeddings=32768, patch_size=16, num_channels=3,
)


class TinyONNConfig(StrataConfigMixin, PretrainedConfig):
    r"""Configuration of [`TinyONNForCausalLM`].

    Args:
        vocab_size: size of the character vocabulary (``char_embed``, ``lm_head``).
        word_vocab_size: size of the word vocabulary (``word_embed``); 0 disables the word term.
        hidden_size: width D of the residual stream.
        num_hidden_layers: number of blocks.
        num_attention_heads: the pool of attention heads (the experts of DynSIHA).
        head_dim: width of every head (default ``hidden_size // num_attention_heads``).
        min_active_heads: top-k_min fallback of the attention gate (tokens whose threshold
            gate opens no head get the k_min heads with the highest gate logits).
        num_experts: number of MoIE feed-forward experts per block.
        expert_size: hidden width of every expert (two matrices, SiLU).
        min_active_experts: top-k_min fallback of the MoIE gate.
        expert_groups: sizes of the generations of experts (``[num_experts]`` at first;
            ``grow_experts(n)`` appends ``n``). Each generation is computed as its own
            einsum and added after the earlier ones, so growing changes no output bit.
        rope_theta: rotary base of the 1D sequence position.
        rope_scaling: standard Transformers RoPE scaling dict, e.g.
            ``{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}``.
        max_position_embeddings: native context length.
        patch_size / num_channels: image patches are ``num_channels x patch_size x patch_size``.
        patch_rope_theta: rotary base of the 2D (x, y) encoding inside a patch embedding.
        gate_loss_weight (w_gate): weight of the surprise routing loss in the training loss.
        gate_ce_weight (w_ce) / gate_kl_weight (w_kl): weights of its CE and KL terms.
        surprise_times_routing_weight: multiply the surprise by the routing weight (as the
            reference code did). Off by default: it makes the surprise of every inactive expert
            zero, so argmin S always points at an inactive expert (see docs/tiny_onn.md).
        pi_alpha / pi_gamma: PI = exp(-alpha((1 - gamma) L / tau + gamma Surprise)).
        grow_threshold: gate threshold logit g of experts added by ``grow_experts`` (their gate
            opens only when cos(h, S) > sigmoid(g), so they start closed).
        model_id: persistent identity of a model (a UUID, set once by perpetual training).
        block_size: K, tokens the generation loop emits per block.
    """

    model_type = "tiny_onn"
    keys_to_ignore_at_inference = [
        "past_key_values", "main_loss", "pi_score", "head_active_fraction", "expert_active_fraction",
        "output_entropy",
    ]
    PRESETS = {"tiny": _TINY, "0.1b": _BONSAI, "bonsai": _BONSAI, "omni-1b": _OMNI_1B}

    def __init__(
        self,
        vocab_size: int = 20000,
        word_vocab_size: int = 32000,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        head_dim: int | None = None,
        min_active_heads: int = 1,
        num_experts: int = 32,
        expert_size: int = 96,
        min_active_experts: int = 1,
        expert_groups: list[int] | None = None,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        max_position_embeddings: int = 32768,
        patch_size: int = 16,
        num_channels: int = 3,
        patch_rope_theta: float = 100.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        gate_loss_weight: float = 0.1,
        gate_ce_weight: float = 1.0,
        gate_kl_weight: float = 1.0,
        surprise_times_routing_weight: bool = False,
        pi_alpha: float = 1.0,
        pi_gamma: float = 0.5,
        grow_threshold: float = 4.0,
        model_id: str | None = None,
        block_size: int = 8,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        **kwargs,
    ):
        check_int("vocab_size", vocab_size, 2)
        check_int("word_vocab_size", word_vocab_size, 0)
        check_int("hidden_size", hidden_size, 2)
        check_int("num_hidden_layers", num_hidden_layers, 1, 1024)
        check_int("num_attention_heads", num_attention_heads, 1)
        if head_dim is None:
            head_dim = hidden_size // num_attention_heads
        check_int("head_dim", head_dim, 2)
        if head_dim % 2:
            raise ValueError(f"`head_dim` must be even (rotary embeddings rotate pairs of channels), got {head_dim}")
        if hidden_size % 4:
            raise ValueError(f"`hidden_size` must be divisible by 4 (2D patch rotary: two axes of pairs), got {hidden_size}")
        check_int("min_active_heads", min_active_heads, 1, num_attention_heads)
        check_int("num_experts", num_experts, 1)
        check_int("expert_size", expert_size, 1)
        check_int("min_active_experts", min_active_experts, 1, num_experts)
        if expert_groups is None:
            expert_groups = [num_experts]
        expert_groups = list(expert_groups)
        if not expert_groups or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in expert_groups) \
                or sum(expert_groups) != num_experts:
            raise ValueError(
                f"`expert_groups` must be positive integers summing to num_experts ({num_experts}), got {expert_groups}"
            )
        check_float("rope_theta", rope_theta, 0.0, low_inclusive=False)
        check_int("max_position_embeddings", max_position_embeddings, 1)
        check_int("patch_size", patch_size, 1)
        check_int("num_channels", num_channels, 1)
        check_float("patch_rope_theta", patch_rope_theta, 0.0, low_inclusive=False)
        check_float("rms_norm_eps", rms_norm_eps, 0.0, 1.0, low_inclusive=False)
        check_float("initializer_range", initializer_range, 0.0, 10.0)
        for name, value in [("gate_loss_weight", gate_loss_weight), ("gate_ce_weight", gate_ce_weight),
                            ("gate_kl_weight", gate_kl_weight), ("pi_alpha", pi_alpha)]:
            check_float(name, value, 0.0)
        check_float("pi_gamma", pi_gamma, 0.0, 1.0)
        check_choice("surprise_times_routing_weight", surprise_times_routing_weight, (True, False))
        check_float("grow_threshold", grow_threshold, -50.0, 50.0)
        check_int("block_size", block_size, 1, 4096)
        if model_id is not None and not isinstance(model_id, str):
            raise ValueError(f"`model_id` must be a string (a UUID) or None, got {model_id!r}")

        rope_scaling = kwargs.pop("rope_parameters", None) or rope_scaling
        if rope_scaling is not None:
            if not isinstance(rope_scaling, dict):
                raise ValueError(f"`rope_scaling` must be a dict like {{'rope_type': 'yarn', 'factor': 4.0}}, got {rope_scaling!r}")
            rope_scaling = copy.deepcopy(rope_scaling)
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            check_choice("rope_scaling['rope_type']", rope_type, ("default", "yarn", "linear"))
            rope_scaling["rope_type"] = rope_type
            rope_scaling.pop("type", None)
            if rope_type != "default":
                check_float("rope_scaling['factor']", rope_scaling.get("factor", 0.0), 1.0)
            if rope_type == "yarn":
                rope_scaling.setdefault("original_max_position_embeddings", max_position_embeddings)
            rope_scaling["rope_theta"] = float(rope_theta)

        self.vocab_size = vocab_size
        self.word_vocab_size = word_vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim
        self.min_active_heads = min_active_heads
        self.num_experts = num_experts
        self.expert_size = expert_size
        self.min_active_experts = min_active_experts
        self.expert_groups = expert_groups
        self.rope_theta = float(rope_theta)
        self.rope_parameters = rope_scaling
        self.max_position_embeddings = max_position_embeddings
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.patch_rope_theta = float(patch_rope_theta)
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.gate_loss_weight = gate_loss_weight
        self.gate_ce_weight = gate_ce_weight
        self.gate_kl_weight = gate_kl_weight
        self.surprise_times_routing_weight = surprise_times_routing_weight
        self.pi_alpha = pi_alpha
        self.pi_gamma = pi_gamma
        self.grow_threshold = grow_threshold
        self.model_id = model_id
        self.block_size = block_size
        self.use_cache = use_cache
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )

    @property
    def rope_type(self) -> str:
        return (self.rope_parameters or {}).get("rope_type", "default")

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size * self.patch_size
