"""Configuration of the RetNet x Mamba family (seed 003).

One class describes the fusion model and all of its baselines: ``layer_pattern`` picks
the token mixer of every block:

- ``A``: causal softmax attention (RoPE, key/value cache)       -> Transformer baseline
- ``R``: multi-scale retention (RetNet)                          -> RetNet baseline
- ``M``: Mamba selective state-space mixer                       -> Mamba baseline
- ``F``: retention and a selective SSM side by side, mixed per channel by a learned,
  data-dependent gate (``fusion="gate"``); with ``fusion="selective_decay"`` the
  retention decay of each head is also modulated by a Mamba-style step size
  (gamma_{h,t} = exp(delta_{h,t} * log gamma_h)).
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

from strata.configuration.configuration_common import (
    StrataConfigMixin,
    check_choice,
    check_divisible,
    check_float,
    check_int,
)

MIXERS = {"A": "attention", "R": "retention", "M": "mamba", "F": "fusion"}

_TINY = dict(vocab_size=512, hidden_size=64, num_attention_heads=2, intermediate_size=128, state_size=8, chunk_size=16)
_SMALL = dict(hidden_size=256, num_attention_heads=4, intermediate_size=768, state_size=16)
_BASE = dict(hidden_size=768, num_attention_heads=12, intermediate_size=2048, state_size=16)
_FAMILY = {"transformer": "A", "retnet": "R", "mamba": "M", "hybrid": "RM", "fusion": "F"}


def _presets() -> dict[str, dict]:
    presets = {}
    for family, unit in _FAMILY.items():
        presets[f"{family}-tiny"] = dict(_TINY, layer_pattern=unit * (2 // len(unit)))
        presets[f"{family}-small"] = dict(_SMALL, layer_pattern=unit * (6 // len(unit)))
        presets[f"{family}-base"] = dict(_BASE, layer_pattern=unit * (12 // len(unit)))
        presets[family] = presets[f"{family}-small"]
    presets["fusion-selective-tiny"] = dict(presets["fusion-tiny"], fusion="selective_decay")
    presets["fusion-selective-small"] = dict(presets["fusion-small"], fusion="selective_decay")
    presets["tiny"] = presets["fusion-tiny"]
    return presets


class RetMambaConfig(StrataConfigMixin, PretrainedConfig):
    r"""Configuration of [`RetMambaForCausalLM`].

    Args:
        vocab_size: number of token ids.
        hidden_size: width of the residual stream.
        layer_pattern: one character per block, from ``"ARMF"`` (see the module docstring).
            A pattern shorter than ``num_hidden_layers`` is repeated to fill it.
        num_hidden_layers: number of blocks (defaults to ``len(layer_pattern)``).
        intermediate_size: width of the SwiGLU MLP of every block; 0 means blocks without
            MLP (the layout of the original Mamba, used when converting its checkpoints).
        num_attention_heads: heads of attention (``A``) and retention (``R``, ``F``) mixers.
        num_key_value_heads: key/value heads of attention (grouped-query attention).
        rope_theta: rotary base of attention and retention.
        retention_mode: form of retention used for full sequences: ``"chunkwise"``
            (O(L), default), ``"parallel"`` (O(L^2), the RetNet training form) or
            ``"recurrent"`` (token by token). All three give the same outputs.
        chunk_size: chunk length of the chunkwise retention.
        scan_chunk_size: chunk length of the chunked selective scan of Mamba mixers. A speed
            knob only (every length gives the same results up to float rounding): its
            [batch, inner, state, chunk] tensors fit CPU caches at 16 (+19 % training
            tokens/s of the ``mamba`` preset over 64, docs/benchmarks.md).
        state_size: SSM state size N of Mamba mixers.
        conv_kernel: width of the causal depthwise convolution of Mamba mixers.
        expand: inner width of Mamba mixers is ``expand * hidden_size``.
        time_step_rank: rank of the step-size projection (``"auto"``: ceil(hidden/16)).
        fusion: ``"gate"`` or ``"selective_decay"`` (see the module docstring).
        fusion_gate: when False, the two branches of ``F`` are summed (ablation).
        block_size: K, the number of tokens the generation loop emits per block.
        kernel_backend: ``None`` (automatic: triton on CUDA, torch on CPU), ``"ref"``, ``"torch"``,
            ``"cpu"`` (the compiled C scan, the fastest on CPU), ``"triton"`` or ``"mamba_ssm"``
            (docs/kernels.md).
    """

    model_type = "retmamba"
    keys_to_ignore_at_inference = ["past_key_values"]
    PRESETS = _presets()

    def __init__(
        self,
        vocab_size: int = 8000,
        hidden_size: int = 256,
        layer_pattern: str = "FFFF",
        num_hidden_layers: int | None = None,
        intermediate_size: int | None = None,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 16384,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        retention_mode: str = "chunkwise",
        chunk_size: int = 64,
        scan_chunk_size: int = 16,
        state_size: int = 16,
        conv_kernel: int = 4,
        expand: int = 2,
        time_step_rank: int | str = "auto",
        time_step_min: float = 0.001,
        time_step_max: float = 0.1,
        time_step_floor: float = 1e-4,
        use_conv_bias: bool = True,
        fusion: str = "gate",
        fusion_gate: bool = True,
        block_size: int = 8,
        kernel_backend: str | None = None,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        **kwargs,
    ):
        if not isinstance(layer_pattern, str) or not layer_pattern or set(layer_pattern) - set(MIXERS):
            raise ValueError(
                f"`layer_pattern` must be a non-empty string over {sorted(MIXERS)} "
                f"({', '.join(f'{k}={v}' for k, v in MIXERS.items())}), got {layer_pattern!r}"
            )
        if num_hidden_layers is None:
            num_hidden_layers = len(layer_pattern)
        check_int("num_hidden_layers", num_hidden_layers, 1, 1024)
        if num_hidden_layers % len(layer_pattern) != 0:
            raise ValueError(
                f"`num_hidden_layers` ({num_hidden_layers}) must be a multiple of len(layer_pattern) "
                f"({len(layer_pattern)}, pattern {layer_pattern!r})"
            )
        layer_pattern = layer_pattern * (num_hidden_layers // len(layer_pattern))

        check_int("vocab_size", vocab_size, 2)
        check_int("hidden_size", hidden_size, 2)
        check_int("num_attention_heads", num_attention_heads, 1)
        check_divisible("hidden_size", hidden_size, "num_attention_heads", num_attention_heads)
        if num_key_value_heads is None:
            num_key_value_heads = num_attention_heads
        check_int("num_key_value_heads", num_key_value_heads, 1, num_attention_heads)
        check_divisible("num_attention_heads", num_attention_heads, "num_key_value_heads", num_key_value_heads)
        if (hidden_size // num_attention_heads) % 2:
            raise ValueError(
                f"head dimension hidden_size/num_attention_heads = {hidden_size // num_attention_heads} must be even "
                "(rotary embeddings rotate pairs of channels)"
            )
        if intermediate_size is None:
            intermediate_size = 64 * math.ceil(8 * hidden_size / 3 / 64)
        check_int("intermediate_size", intermediate_size, 0)
        check_float("rope_theta", rope_theta, 0.0, low_inclusive=False)
        check_int("max_position_embeddings", max_position_embeddings, 1)
        check_float("rms_norm_eps", rms_norm_eps, 0.0, 1.0, low_inclusive=False)
        check_float("initializer_range", initializer_range, 0.0, 10.0)
        check_choice("retention_mode", retention_mode, ("chunkwise", "parallel", "recurrent"))
        check_int("chunk_size", chunk_size, 1, 4096)
        check_int("scan_chunk_size", scan_chunk_size, 1, 4096)
        check_int("state_size", state_size, 1, 1024)
        check_int("conv_kernel", conv_kernel, 1, 64)
        check_int("expand", expand, 1, 16)
        if time_step_rank == "auto":
            time_step_rank = math.ceil(hidden_size / 16)
        check_int("time_step_rank", time_step_rank, 1)
        check_float("time_step_min", time_step_min, 0.0, 1.0, low_inclusive=False)
        check_float("time_step_max", time_step_max, time_step_min, 10.0)
        check_float("time_step_floor", time_step_floor, 0.0, 1.0, low_inclusive=False)
        check_choice("fusion", fusion, ("gate", "selective_decay"))
        check_choice("fusion_gate", fusion_gate, (True, False))
        check_int("block_size", block_size, 1, 4096)
        self.check_kernel_backend(kernel_backend)

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.layer_pattern = layer_pattern
        self.num_hidden_layers = num_hidden_layers
        self.intermediate_size = intermediate_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads
        self.rope_theta = float(rope_theta)
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.retention_mode = retention_mode
        self.chunk_size = chunk_size
        self.scan_chunk_size = scan_chunk_size
        self.state_size = state_size
        self.conv_kernel = conv_kernel
        self.expand = expand
        self.intermediate_ssm_size = expand * hidden_size
        self.time_step_rank = time_step_rank
        self.time_step_min = time_step_min
        self.time_step_max = time_step_max
        self.time_step_floor = time_step_floor
        self.use_conv_bias = use_conv_bias
        self.fusion = fusion
        self.fusion_gate = fusion_gate
        self.block_size = block_size
        self.kernel_backend = kernel_backend
        self.use_cache = use_cache
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )

    @property
    def mixer_types(self) -> list[str]:
        return [MIXERS[c] for c in self.layer_pattern]
