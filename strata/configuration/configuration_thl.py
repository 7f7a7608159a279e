"""Configuration of THL, the hierarchical recurrent LM with a fixed-slot memory bank (seed 002).

Per token: embed -> (optional) sliding-window local attention over recent token embeddings
-> sparse multi-head top-k read of the memory bank -> stacked GRU tiers, tier k updating
every ``timescales[k]`` real tokens -> novelty-gated write into the bank -> norm over the
concatenated tier states -> output projection -> LM head. The whole state (tiers, bank,
slot keys, read/write metadata, clock, local window) has a size independent of the
sequence length.

``num_hidden_layers`` is the number of tiers (the stacked GRU cells): the depth of the
model and the number of `RecurrentCache` layers it uses (layer k holds tier k's state,
layer 0 also the memory bank and its metadata).
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

EVICTION_POLICIES = ("least_used", "stale")

_TINY = dict(
    vocab_size=512, hidden_size=64, num_hidden_layers=3, memory_slots=32, router_heads=2, router_top_k=4,
    local_window=8, local_heads=2, tbptt_length=64,
)
_SMALL = dict(
    hidden_size=256, num_hidden_layers=4, memory_slots=1024, router_heads=4, router_top_k=8, local_window=64,
    local_heads=4,
)
_BASE = dict(
    hidden_size=768, num_hidden_layers=4, memory_slots=1024, router_heads=8, router_top_k=8, local_window=64,
    local_heads=12,
)


def _presets() -> dict[str, dict]:
    return {
        "tiny": _TINY,
        # Second conformance case: no local attention, a bank small enough to fill up within a
        # few tokens (eviction runs), staleness eviction and a non-power-of-two clock.
        "tiny-stale": dict(_TINY, memory_slots=8, local_window=0, eviction_policy="stale", timescales=[1, 3, 5]),
        "small": _SMALL,
        "base": _BASE,
    }


class THLConfig(StrataConfigMixin, PretrainedConfig):
    r"""Configuration of [`THLForCausalLM`].

    Args:
        vocab_size: number of token ids.
        hidden_size: d, the width of token embeddings, tier states and memory slots.
        num_hidden_layers: number of tiers K (stacked GRU cells).
        timescales: update period of every tier: tier k updates at the real tokens whose
            position p satisfies ``p % timescales[k] == 0`` and holds its state otherwise.
            Default ``[2**k for k in range(K)]`` (tau_k = 2^k, as the seed states). Tier 0 must
            have period 1 (it reads every token).
        memory_slots: J, the number of slots of the memory bank (J x d per sequence).
        router_heads: heads of the sparse router; each head picks its own top-k slots.
        router_head_dim: width of the router's per-head queries and slot keys (default d / heads).
        router_top_k: slots read per head and token.
        load_penalty: lambda; a slot's score is ``q.k / sqrt(dk) - lambda * read_ema``.
        usage_ema_decay: rho of the read and write usage EMAs kept per slot.
        gumbel_scale: scale of the Gumbel noise added to the router scores in training
            (Gumbel top-k); 0 disables it. Evaluation always uses the hard top-k (ties go to
            the lowest slot index).
        novelty_threshold: theta; a candidate is novel when ``1 - max cos(w, m_j) > theta``.
        novelty_beta: beta of the write gate ``sigmoid(beta * (novelty - theta))``.
        write_max_norm: candidates are norm-clipped to this length (default 1: unit-scale slots;
            larger slots saturated the GRU tiers in training).
        reinforce_rate: eta; a non-novel candidate moves its most similar slot by
            ``m <- (1 - eta) m + eta w``. Small values keep slots as slowly refined prototypes; a
            large one makes the slot follow the latest candidates, so nothing looks novel and the
            bank stays nearly empty.
        memory_decay: gamma; every slot is multiplied by gamma at every real token.
        eviction_policy: slot replaced by a novel candidate when no slot is empty:
            ``"least_used"`` (lowest read + write usage EMA) or ``"stale"`` (oldest last
            read or write). Ties go to the lowest slot index.
        local_window: W, tokens of sliding-window attention over recent token embeddings
            (0 disables it).
        local_heads: heads of the local attention.
        tbptt_length: truncated backpropagation through time: in training, a sequence is
            processed in chunks of this many tokens with the state carried from chunk to
            chunk and detached at chunk edges (also the unit of gradient checkpointing).
        inference_chunk_size: without gradients, long inputs are processed in chunks of this many
            tokens, so memory stays flat in the prompt length (results do not depend on it).
        block_size: K of block generation, the number of tokens emitted per block.
    """

    model_type = "thl"
    keys_to_ignore_at_inference = ["past_key_values"]
    PRESETS = _presets()

    def __init__(
        self,
        vocab_size: int = 8000,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        timescales: list[int] | None = None,
        memory_slots: int = 1024,
        router_heads: int = 4,
        router_head_dim: int | None = None,
        router_top_k: int = 8,
        load_penalty: float = 0.1,
        usage_ema_decay: float = 0.99,
        gumbel_scale: float = 1.0,
        novelty_threshold: float = 0.3,
        novelty_beta: float = 10.0,
        write_max_norm: float = 1.0,
        reinforce_rate: float = 0.05,
        memory_decay: float = 0.9995,
        eviction_policy: str = "least_used",
        local_window: int = 64,
        local_heads: int = 4,
        tbptt_length: int = 128,
        inference_chunk_size: int = 1024,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        block_size: int = 8,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        **kwargs,
    ):
        check_int("vocab_size", vocab_size, 2)
        check_int("hidden_size", hidden_size, 2)
        check_int("num_hidden_layers", num_hidden_layers, 1, 64)
        if timescales is None:
            timescales = [2**k for k in range(num_hidden_layers)]
        if not isinstance(timescales, (list, tuple)) or len(timescales) != num_hidden_layers:
            raise ValueError(
                f"`timescales` must be a list of one update period per tier ({num_hidden_layers} tiers = "
                f"`num_hidden_layers`), got {timescales!r}"
            )
        timescales = list(timescales)
        for k, tau in enumerate(timescales):
            check_int(f"timescales[{k}]", tau, 1, 2**30)
        if timescales[0] != 1:
            raise ValueError(f"`timescales[0]` must be 1 (tier 0 reads every token), got {timescales[0]}")
        check_int("memory_slots", memory_slots, 1, 2**20)
        check_int("router_heads", router_heads, 1)
        if router_head_dim is None:
            check_divisible("hidden_size", hidden_size, "router_heads", router_heads)
            router_head_dim = hidden_size // router_heads
        check_int("router_head_dim", router_head_dim, 1)
        check_int("router_top_k", router_top_k, 1, memory_slots)
        check_float("load_penalty", load_penalty, 0.0)
        check_float("usage_ema_decay", usage_ema_decay, 0.0, 1.0)
        check_float("gumbel_scale", gumbel_scale, 0.0)
        check_float("novelty_threshold", novelty_threshold, 0.0, 2.0)
        check_float("novelty_beta", novelty_beta, 0.0, low_inclusive=False)
        check_float("write_max_norm", write_max_norm, 0.0, low_inclusive=False)
        check_float("reinforce_rate", reinforce_rate, 0.0, 1.0)
        check_float("memory_decay", memory_decay, 0.0, 1.0, low_inclusive=False)
        check_choice("eviction_policy", eviction_policy, EVICTION_POLICIES)
        check_int("local_window", local_window, 0, 65536)
        check_int("local_heads", local_heads, 1)
        if local_window:
            check_divisible("hidden_size", hidden_size, "local_heads", local_heads)
        check_int("tbptt_length", tbptt_length, 1)
        check_int("inference_chunk_size", inference_chunk_size, 1)
        check_float("rms_norm_eps", rms_norm_eps, 0.0, 1.0, low_inclusive=False)
        check_float("initializer_range", initializer_range, 0.0, 10.0)
        check_int("block_size", block_size, 1, 4096)

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.timescales = timescales
        self.memory_slots = memory_slots
        self.router_heads = router_heads
        self.router_head_dim = router_head_dim
        self.router_top_k = router_top_k
        self.load_penalty = float(load_penalty)
        self.usage_ema_decay = float(usage_ema_decay)
        self.gumbel_scale = float(gumbel_scale)
        self.novelty_threshold = float(novelty_threshold)
        self.novelty_beta = float(novelty_beta)
        self.write_max_norm = float(write_max_norm)
        self.reinforce_rate = float(reinforce_rate)
        self.memory_decay = float(memory_decay)
        self.eviction_policy = eviction_policy
        self.local_window = local_window
        self.local_heads = local_heads
        self.tbptt_length = tbptt_length
        self.inference_chunk_size = inference_chunk_size
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
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
    def num_tiers(self) -> int:
        return self.num_hidden_layers

    @property
    def decay_fold_period(self) -> int:
        """N: the bank is stored as S with M = S * gamma^(p mod N); every N real tokens gamma^N is
        folded into S (an O(J d) multiply once per N tokens instead of at every token)."""
        if self.memory_decay >= 1.0:
            return 2**62
        return max(1, int(math.floor(math.log(2.0**-10) / math.log(self.memory_decay))))
