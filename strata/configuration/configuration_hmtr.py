"""Configuration of H-M-T-R, the hierarchical Mamba-Transformer-RNN language model (seed 000).

Three networks in series, the text cut into blocks of ``block_size`` = K tokens:

- **encoder** ("速记员"): causal Mamba blocks over the token embeddings; the output at the
  last position of every block, through ``capsule_proj``, is that block's *capsule* C_t
  (it summarises every token up to the end of block t);
- **reasoner** ("大脑"): a GPT-style causal Transformer over ``[start, C_0, C_1, ...]``
  whose output at slot t is the predicted capsule P_t of block t (P_0 from the learned
  start capsule alone); key/value cache over capsules;
- **decoder** ("嘴巴"): a small GRU (or LSTM) whose initial state is ``tanh(init_proj(P_t))``;
  it reads a learned block-start vector, then the tokens of block t, and predicts each
  next token of the block.

``num_hidden_layers`` is derived: ``encoder_layers + reasoner_layers + decoder_layers``, the
number of `RecurrentCache` layers the model uses (encoder conv/SSM states, then reasoner
keys/values over capsules, then decoder states).
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

CAPSULE_KINDS = ("deterministic", "variational")
LATENT_LOSSES = ("mse", "energy")
DECODER_CELLS = ("gru", "lstm")
DECODER_FIRST_INPUTS = ("start", "previous_token")

_TINY = dict(
    vocab_size=512, hidden_size=64, encoder_layers=1, state_size=8, scan_chunk_size=16, reasoner_layers=2,
    num_attention_heads=2, intermediate_size=128, decoder_layers=1, decoder_hidden_size=64,
)
# The encoder only has to summarise recent text (the reasoner carries the long context):
# expansion 1 and state 8 make it 4x cheaper than a Mamba LM block of the same width.
_SMALL = dict(
    hidden_size=256, encoder_layers=2, state_size=8, expand=1, reasoner_layers=4, num_attention_heads=4,
    intermediate_size=704, decoder_layers=1, decoder_hidden_size=256,
)
_BASE = dict(
    hidden_size=768, encoder_layers=4, state_size=16, reasoner_layers=12, num_attention_heads=12,
    intermediate_size=2048, decoder_layers=2, decoder_hidden_size=768,
)
# The published lessons (CALM): a Gaussian capsule with KL and dropout on tokens and capsule.
_VARIATIONAL = dict(capsule="variational", capsule_kl_weight=1e-3, capsule_kl_clamp=0.5, token_dropout=0.15,
                    capsule_dropout=0.15)


def _presets() -> dict[str, dict]:
    return {
        "tiny": _TINY,
        # Second conformance case: LSTM decoder of 2 layers, variational capsule, energy head, K = 4.
        "tiny-lstm": dict(_TINY, decoder_cell="lstm", decoder_layers=2, decoder_hidden_size=48, block_size=4,
                          loss="energy", energy_hidden_size=64, **_VARIATIONAL),
        "small": _SMALL,
        "small-variational": dict(_SMALL, **_VARIATIONAL),
        "small-energy": dict(_SMALL, loss="energy", **_VARIATIONAL),
        "base": _BASE,
    }


class HMTRConfig(StrataConfigMixin, PretrainedConfig):
    r"""Configuration of [`HMTRForCausalLM`].

    Args:
        vocab_size: number of token ids.
        hidden_size: D, the width of token embeddings, encoder, capsules and reasoner.
        block_size: K, tokens per block (one capsule per block, one reasoner step per block).
        encoder_layers: Mamba blocks of the encoder (RMSNorm -> Mamba mixer -> residual).
        state_size, conv_kernel, expand, time_step_rank, time_step_min, time_step_max,
        time_step_floor, use_conv_bias, kernel_backend: the encoder's Mamba mixers (as in
            `RetMambaConfig`).
        scan_chunk_size: chunk length of the encoder's chunked selective scan (as in
            `RetMambaConfig`: a speed knob only).
        capsule: ``"deterministic"`` (C = capsule_proj(h)) or ``"variational"`` (a Gaussian
            capsule: capsule_proj gives mean and log-variance; the autoencoder stage samples it
            and adds a KL term; the language model always uses the mean).
        capsule_kl_weight: weight of the KL term of the variational capsule (stage 1).
        capsule_kl_clamp: free bits: the KL of each capsule dimension counts only above this
            many nats (CALM's clamp, which keeps the capsule informative).
        token_dropout: stage 1: probability that an encoder input token is replaced by zeros.
        capsule_dropout: stage 1: dropout on the capsule before the decoder.
        reasoner_layers: Transformer blocks of the reasoner.
        num_attention_heads, num_key_value_heads, intermediate_size, rope_theta: the reasoner's
            attention (rotary positions over capsule slots) and SwiGLU MLP.
        max_position_embeddings: longest text in tokens the model is meant for (informational).
        loss: the reasoner's latent objective in stage 2: ``"mse"`` (mean squared error plus
            ``cosine_weight`` x (1 - cosine)) or ``"energy"`` (an energy-score head, as in CALM:
            the prediction is ``head(h, noise)``; training draws ``energy_samples`` noises per
            capsule, inference uses noise 0, which keeps the language model deterministic).
        cosine_weight: weight of the cosine term of ``loss="mse"``.
        energy_samples: samples per capsule of the energy score (>= 2).
        energy_noise_size: width of the energy head's noise input (default hidden_size).
        energy_hidden_size: width of the energy head's MLP (default 2 * hidden_size).
        decoder_layers: stacked recurrent cells of the decoder (1 or 2 in the seed).
        decoder_hidden_size: width of the decoder's cells (default hidden_size).
        decoder_cell: ``"gru"`` (default) or ``"lstm"``.
        decoder_capsule_input: when True (default) the predicted capsule also enters the input
            gates of the decoder's first cell at every step of its block, not only its
            initial state.
        decoder_first_input: what step 0 of a block reads: ``"start"`` (default, the seed: a
            learned block-start vector, so a block's tokens are predicted from the capsule and the
            block's own earlier tokens only) or ``"previous_token"`` (the last token of the
            previous block; block 0 reads the start vector). Both keep the model an exact LM.
        num_hidden_layers: derived (encoder + reasoner + decoder layers); a different value is
            refused.
    """

    model_type = "hmtr"
    keys_to_ignore_at_inference = ["past_key_values"]
    PRESETS = _presets()

    def __init__(
        self,
        vocab_size: int = 8000,
        hidden_size: int = 256,
        block_size: int = 8,
        encoder_layers: int = 2,
        state_size: int = 16,
        conv_kernel: int = 4,
        expand: int = 2,
        time_step_rank: int | str = "auto",
        time_step_min: float = 0.001,
        time_step_max: float = 0.1,
        time_step_floor: float = 1e-4,
        use_conv_bias: bool = True,
        scan_chunk_size: int = 16,
        kernel_backend: str | None = None,
        capsule: str = "deterministic",
        capsule_kl_weight: float = 1e-3,
        capsule_kl_clamp: float = 0.5,
        token_dropout: float = 0.0,
        capsule_dropout: float = 0.0,
        reasoner_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        intermediate_size: int | None = None,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 16384,
        loss: str = "mse",
        cosine_weight: float = 0.1,
        energy_samples: int = 4,
        energy_noise_size: int | None = None,
        energy_hidden_size: int | None = None,
        decoder_layers: int = 1,
        decoder_hidden_size: int | None = None,
        decoder_cell: str = "gru",
        decoder_capsule_input: bool = True,
        decoder_first_input: str = "start",
        num_hidden_layers: int | None = None,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        **kwargs,
    ):
        check_int("vocab_size", vocab_size, 2)
        check_int("hidden_size", hidden_size, 2)
        check_int("block_size", block_size, 1, 4096)
        check_int("encoder_layers", encoder_layers, 1, 256)
        check_int("state_size", state_size, 1, 1024)
        check_int("conv_kernel", conv_kernel, 1, 64)
        check_int("expand", expand, 1, 16)
        if time_step_rank == "auto":
            time_step_rank = math.ceil(hidden_size / 16)
        check_int("time_step_rank", time_step_rank, 1)
        check_float("time_step_min", time_step_min, 0.0, 1.0, low_inclusive=False)
        check_float("time_step_max", time_step_max, time_step_min, 10.0)
        check_float("time_step_floor", time_step_floor, 0.0, 1.0, low_inclusive=False)
        check_choice("use_conv_bias", use_conv_bias, (True, False))
        check_int("scan_chunk_size", scan_chunk_size, 1, 4096)
        self.check_kernel_backend(kernel_backend)
        check_choice("capsule", capsule, CAPSULE_KINDS)
        check_float("capsule_kl_weight", capsule_kl_weight, 0.0)
        check_float("capsule_kl_clamp", capsule_kl_clamp, 0.0)
        check_float("token_dropout", token_dropout, 0.0, 1.0)
        if token_dropout >= 1.0:
            raise ValueError(f"`token_dropout` must be in [0, 1), got {token_dropout}")
        check_float("capsule_dropout", capsule_dropout, 0.0, 1.0)
        if capsule_dropout >= 1.0:
            raise ValueError(f"`capsule_dropout` must be in [0, 1), got {capsule_dropout}")
        check_int("reasoner_layers", reasoner_layers, 1, 256)
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
        check_int("intermediate_size", intermediate_size, 1)
        check_float("rope_theta", rope_theta, 0.0, low_inclusive=False)
        check_int("max_position_embeddings", max_position_embeddings, 1)
        check_choice("loss", loss, LATENT_LOSSES)
        check_float("cosine_weight", cosine_weight, 0.0)
        check_int("energy_samples", energy_samples, 2, 1024)
        if energy_noise_size is None:
            energy_noise_size = hidden_size
        check_int("energy_noise_size", energy_noise_size, 1)
        if energy_hidden_size is None:
            energy_hidden_size = 2 * hidden_size
        check_int("energy_hidden_size", energy_hidden_size, 1)
        check_int("decoder_layers", decoder_layers, 1, 16)
        if decoder_hidden_size is None:
            decoder_hidden_size = hidden_size
        check_int("decoder_hidden_size", decoder_hidden_size, 1)
        check_choice("decoder_cell", decoder_cell, DECODER_CELLS)
        check_choice("decoder_capsule_input", decoder_capsule_input, (True, False))
        check_choice("decoder_first_input", decoder_first_input, DECODER_FIRST_INPUTS)
        derived = encoder_layers + reasoner_layers + decoder_layers
        if num_hidden_layers is not None and num_hidden_layers != derived:
            raise ValueError(
                f"`num_hidden_layers` is derived for H-M-T-R: encoder_layers + reasoner_layers + decoder_layers = "
                f"{encoder_layers} + {reasoner_layers} + {decoder_layers} = {derived}, got {num_hidden_layers}"
            )
        check_float("rms_norm_eps", rms_norm_eps, 0.0, 1.0, low_inclusive=False)
        check_float("initializer_range", initializer_range, 0.0, 10.0)

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.block_size = block_size
        self.encoder_layers = encoder_layers
        self.state_size = state_size
        self.conv_kernel = conv_kernel
        self.expand = expand
        self.intermediate_ssm_size = expand * hidden_size
        self.time_step_rank = time_step_rank
        self.time_step_min = time_step_min
        self.time_step_max = time_step_max
        self.time_step_floor = time_step_floor
        self.use_conv_bias = use_conv_bias
        self.scan_chunk_size = scan_chunk_size
        self.kernel_backend = kernel_backend
        self.capsule = capsule
        self.capsule_kl_weight = float(capsule_kl_weight)
        self.capsule_kl_clamp = float(capsule_kl_clamp)
        self.token_dropout = float(token_dropout)
        self.capsule_dropout = float(capsule_dropout)
        self.reasoner_layers = reasoner_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.rope_theta = float(rope_theta)
        self.max_position_embeddings = max_position_embeddings
        self.loss = loss
        self.cosine_weight = float(cosine_weight)
        self.energy_samples = energy_samples
        self.energy_noise_size = energy_noise_size
        self.energy_hidden_size = energy_hidden_size
        self.decoder_layers = decoder_layers
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_cell = decoder_cell
        self.decoder_capsule_input = decoder_capsule_input
        self.decoder_first_input = decoder_first_input
        self.num_hidden_layers = derived
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )

    # Layout of the RecurrentCache layers.
    @property
    def reasoner_cache_offset(self) -> int:
        return self.encoder_layers

    @property
    def decoder_cache_offset(self) -> int:
        return self.encoder_layers + self.reasoner_layers
