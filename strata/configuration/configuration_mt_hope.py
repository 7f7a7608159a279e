"""Configuration of MT-HOPE, the Möbius-twistor nested-learning recurrent LM (seed 001).

Every token is a twistor Z = (omega, pi): two complex vectors of ``dim // 2`` channels
each, stored as real and imaginary parts side by side, so the residual stream is
``hidden_size = 2 * dim`` real numbers laid out ``[omega_re | omega_im | pi_re | pi_im]``.

The stack (see ``strata/modeling/modeling_mt_hope.py``):

- ``layer_pattern``: one character per sequence-mixing block, ``R`` a
  ``TwistorTitansRecurrent`` (complex diagonal gated recurrence) or ``I`` an
  ``IncidenceAttention`` block; every block ends with an ``AdaptiveMobiusLayer``
  coupling. The default presets are attention-free (``"RR"`` ...), as the seed says.
- ``use_neural_memory``: the ``TwistorSelfModifyingRecurrent`` layer (Titans neural
  memory trained at test time; HOPE's self-modifying part).
- ``use_memory_system``: the ``TwistorMemorySystem`` slot memory.
- ``cms_periods``: the continuum memory system, one MLP level per entry; entry l is
  the number of tokens between two updates of level l during ``continual_update``.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from strata.configuration.configuration_common import (
    StrataConfigMixin,
    check_choice,
    check_float,
    check_int,
)

LAYER_TYPES = {"R": "twistor_titans_recurrent", "I": "incidence_attention"}

_TINY = dict(
    vocab_size=512, dim=32, layer_pattern="RR", num_nested_levels=3, num_memories=2, memory_heads=2,
    memory_hidden_size=16, cms_periods=[1, 4], cms_hidden_size=64, num_attention_heads=2, chunk_size=8,
)
# The seed's table: dim / recurrent layers / nested levels / memories / bidirectional.
_SEED = {
    "small": dict(dim=128, layer_pattern="RR", num_nested_levels=5, num_memories=3, bidirectional=False),
    "medium": dict(dim=192, layer_pattern="RR", num_nested_levels=5, num_memories=4, bidirectional=False),
    "recommended": dict(dim=256, layer_pattern="RRR", num_nested_levels=6, num_memories=5, bidirectional=True),
    "large": dict(dim=512, layer_pattern="RRRR", num_nested_levels=8, num_memories=8, bidirectional=True),
}


def _presets() -> dict[str, dict]:
    presets = {"tiny": dict(_TINY)}
    presets["tiny-attn"] = dict(_TINY, layer_pattern="RI")
    presets["tiny-plain"] = dict(_TINY, phase_compression=False, mobius_chirality_flip=False, mobius_conjugate=False)
    for name, fields in _SEED.items():
        presets[name] = dict(fields)
    # The causal-LM forms of the two bidirectional (encoder) presets.
    presets["recommended-causal"] = dict(_SEED["recommended"], bidirectional=False)
    presets["large-causal"] = dict(_SEED["large"], bidirectional=False)
    return presets


class MTHopeConfig(StrataConfigMixin, PretrainedConfig):
    r"""Configuration of [`MTHopeModel`] / [`MTHopeForCausalLM`].

    Args:
        vocab_size: number of token ids.
        dim: width of each twistor component (omega, pi) in real numbers; each holds
            ``dim // 2`` complex channels. The residual stream is ``2 * dim`` wide.
        layer_pattern: sequence-mixing blocks, from ``"RI"`` (module docstring).
        bidirectional: run the recurrent blocks in both directions. Only for
            ``MTHopeModel`` used as an encoder; refused by the causal LM and by caching.
        num_mobius_cycles: repeated Möbius maps in every ``AdaptiveMobiusLayer``.
        mobius_chirality_flip: swap omega and pi between two Möbius cycles.
        mobius_conjugate: complex-conjugate the twistor before every odd cycle
            (an anti-Möbius map on those cycles).
        mobius_max_shift: bound on the input-conditioned deviation of the Möbius
            coefficients from the identity map (keeps ad - bc away from 0).
        use_mobius: ablation switch for all Möbius couplings.
        num_nested_levels: levels of ``TwistorNestedLearning`` (optimizer grouping).
        nested_level_factor: learning rate of level l is ``lr * factor ** l``.
        use_neural_memory: the Titans test-time memory layer (ablation switch).
        memory_heads: heads of the neural memory; keys/values are ``hidden/heads`` wide.
        memory_hidden_size: hidden width of each head's 2-layer MLP memory.
        memory_chunk_size: tokens per chunk of test-time gradient descent: gradients of
            a chunk are taken at the memory of its first token (Titans' chunk-parallel
            form; 1 = plain online gradient descent).
        use_memory_system: the ``TwistorMemorySystem`` slot memory (ablation switch).
        num_memories: slots of the memory system.
        num_memory_cycles: repeated updates M <- (1 - a) M + a u per token.
        phase_compression: store written memory values as magnitude + compressed phase.
        phase_rank: width of the compressed phase (``None``: a quarter of the channels).
        cms_periods: tokens between updates of each continuum-memory level.
        cms_hidden_size: hidden width of every continuum-memory MLP.
        num_attention_heads: heads of ``IncidenceAttention`` blocks.
        chunk_size: chunk length of the chunked scans (at most 32, see modeling).
        constraint_target: the constant |omega . pi| is kept near by the constraint loss.
        block_size: K, tokens the generation loop emits per block.
    """

    model_type = "mt_hope"
    keys_to_ignore_at_inference = ["past_key_values"]
    PRESETS = _presets()

    def __init__(
        self,
        vocab_size: int = 8000,
        dim: int = 128,
        layer_pattern: str = "RR",
        bidirectional: bool = False,
        num_mobius_cycles: int = 3,
        mobius_chirality_flip: bool = True,
        mobius_conjugate: bool = True,
        mobius_max_shift: float = 0.25,
        use_mobius: bool = True,
        num_nested_levels: int = 5,
        nested_level_factor: float = 0.8,
        use_neural_memory: bool = True,
        memory_heads: int = 4,
        memory_hidden_size: int | None = None,
        memory_chunk_size: int | None = None,
        use_memory_system: bool = True,
        num_memories: int = 3,
        num_memory_cycles: int = 2,
        phase_compression: bool = True,
        phase_rank: int | None = None,
        cms_periods: list[int] | None = None,
        cms_hidden_size: int | None = None,
        num_attention_heads: int = 4,
        chunk_size: int = 16,
        constraint_target: float = 1.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        num_hidden_layers: int | None = None,
        hidden_size: int | None = None,
        block_size: int = 8,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        **kwargs,
    ):
        check_int("vocab_size", vocab_size, 2)
        if hidden_size is not None:
            check_int("hidden_size", hidden_size, 4)
            if hidden_size != 2 * dim:
                raise ValueError(f"`hidden_size` must be 2 * dim = {2 * dim} (omega and pi), got {hidden_size}")
        check_int("dim", dim, 2)
        if dim % 2:
            raise ValueError(f"`dim` ({dim}) must be even: real and imaginary parts of dim // 2 complex channels")
        if not isinstance(layer_pattern, str) or not layer_pattern or set(layer_pattern) - set(LAYER_TYPES):
            raise ValueError(
                f"`layer_pattern` must be a non-empty string over {sorted(LAYER_TYPES)} "
                f"({', '.join(f'{k}={v}' for k, v in LAYER_TYPES.items())}), got {layer_pattern!r}"
            )
        check_choice("bidirectional", bidirectional, (True, False))
        check_int("num_mobius_cycles", num_mobius_cycles, 1, 16)
        check_choice("mobius_chirality_flip", mobius_chirality_flip, (True, False))
        check_choice("mobius_conjugate", mobius_conjugate, (True, False))
        check_float("mobius_max_shift", mobius_max_shift, 0.0, 0.35)
        check_choice("use_mobius", use_mobius, (True, False))
        check_int("num_nested_levels", num_nested_levels, 1, 64)
        check_float("nested_level_factor", nested_level_factor, 0.0, 1.0, low_inclusive=False)
        check_choice("use_neural_memory", use_neural_memory, (True, False))
        check_int("memory_heads", memory_heads, 1)
        if (2 * dim) % memory_heads:
            raise ValueError(f"`memory_heads` ({memory_heads}) must divide the stream width 2 * dim = {2 * dim}")
        if memory_hidden_size is None:
            memory_hidden_size = 2 * dim // memory_heads
        check_int("memory_hidden_size", memory_hidden_size, 1)
        check_int("chunk_size", chunk_size, 1, 32)
        if memory_chunk_size is None:
            memory_chunk_size = chunk_size
        check_int("memory_chunk_size", memory_chunk_size, 1, 256)
        check_choice("use_memory_system", use_memory_system, (True, False))
        check_int("num_memories", num_memories, 1, 256)
        check_int("num_memory_cycles", num_memory_cycles, 1, 64)
        check_choice("phase_compression", phase_compression, (True, False))
        if phase_rank is None:
            phase_rank = max(1, dim // 8)
        check_int("phase_rank", phase_rank, 1, dim)
        if cms_periods is None:
            cms_periods = [1, 16, 256]
        if not isinstance(cms_periods, (list, tuple)):
            raise ValueError(f"`cms_periods` must be a list of positive integers, got {cms_periods!r}")
        for i, p in enumerate(cms_periods):
            check_int(f"cms_periods[{i}]", p, 1)
        cms_periods = [int(p) for p in cms_periods]
        if cms_hidden_size is None:
            cms_hidden_size = 4 * dim
        check_int("cms_hidden_size", cms_hidden_size, 1)
        check_int("num_attention_heads", num_attention_heads, 1)
        if "I" in layer_pattern and (dim // 2) % num_attention_heads:
            raise ValueError(
                f"`num_attention_heads` ({num_attention_heads}) must divide the complex channels dim // 2 = {dim // 2}"
            )
        check_float("constraint_target", constraint_target, 0.0)
        check_float("rms_norm_eps", rms_norm_eps, 0.0, 1.0, low_inclusive=False)
        check_float("initializer_range", initializer_range, 0.0, 10.0)
        check_int("block_size", block_size, 1, 4096)
        layers = len(layer_pattern) + int(use_neural_memory) + int(use_memory_system)
        if num_hidden_layers is not None and num_hidden_layers != layers:
            raise ValueError(
                f"`num_hidden_layers` is derived (blocks + memory layers = {layers}); got {num_hidden_layers}"
            )

        self.vocab_size = vocab_size
        self.dim = dim
        self.hidden_size = 2 * dim
        self.layer_pattern = layer_pattern
        self.bidirectional = bidirectional
        self.num_mobius_cycles = num_mobius_cycles
        self.mobius_chirality_flip = mobius_chirality_flip
        self.mobius_conjugate = mobius_conjugate
        self.mobius_max_shift = float(mobius_max_shift)
        self.use_mobius = use_mobius
        self.num_nested_levels = num_nested_levels
        self.nested_level_factor = float(nested_level_factor)
        self.use_neural_memory = use_neural_memory
        self.memory_heads = memory_heads
        self.memory_hidden_size = memory_hidden_size
        self.memory_chunk_size = memory_chunk_size
        self.use_memory_system = use_memory_system
        self.num_memories = num_memories
        self.num_memory_cycles = num_memory_cycles
        self.phase_compression = phase_compression
        self.phase_rank = phase_rank
        self.cms_periods = cms_periods
        self.cms_hidden_size = cms_hidden_size
        self.num_attention_heads = num_attention_heads
        self.chunk_size = chunk_size
        self.constraint_target = float(constraint_target)
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.num_hidden_layers = layers
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
    def mixer_types(self) -> list[str]:
        return [LAYER_TYPES[c] for c in self.layer_pattern]
