"""What every strata model shares: input checks, positions and masks, saving with code.

`StrataPreTrainedModel` is the base of every architecture's ``XPreTrainedModel``. It
- refuses bad input with a clear error before anything changes (ids outside the
  vocabulary, empty input, attention masks of the wrong shape, foreign caches);
- derives position ids and the per-token padding mask from the 2D attention mask, so
  a left-padded batch computes exactly what each row computes alone;
- puts the LM head and loss over a base model's output (``causal_lm_output``), the same
  for every ``XForCausalLM`` (embedding accessors come from transformers' defaults:
  ``embed_tokens`` on the base model, ``model.embed_tokens`` and ``lm_head`` on the LM);
- writes, on every ``save_pretrained`` (also Trainer checkpoints and ``push_to_hub``),
  the flat code bundle and ``auto_map`` that let the folder load with
  ``trust_remote_code=True`` where strata is not installed.
"""

from __future__ import annotations

import os

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from strata.conversion.code_bundle import write_code_bundle
from strata.modeling.cache_recurrent import RecurrentCache


class StrataPreTrainedModel(PreTrainedModel):
    supports_gradient_checkpointing = True
    _is_stateful = True
    _supports_sdpa = True
    # Subclasses: {"AutoModel": "XModel", "AutoModelForCausalLM": "XForCausalLM"}.
    _auto_map_classes: dict[str, str] = {}

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # `generate` must not build a DynamicCache: the model creates its RecurrentCache.
        return False

    # ------------------------------------------------------------------ LM head
    def causal_lm_output(self, out, labels=None, logits_to_keep: int = 0, **loss_kwargs) -> CausalLMOutputWithPast:
        """Logits of the last ``logits_to_keep`` positions (0: all) and, given labels, the loss."""
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states
        )

    # ------------------------------------------------------------------ inputs
    def check_inputs(self, input_ids, inputs_embeds, attention_mask, cache) -> tuple[int, int]:
        """Validate the inputs of a forward pass; return (batch, new tokens)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of `input_ids` or `inputs_embeds`")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"`input_ids` must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
            if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                raise TypeError(f"`input_ids` must be an integer tensor, got {input_ids.dtype}")
            B, T = input_ids.shape
            if T > 0 and B > 0:
                low, high = int(input_ids.min()), int(input_ids.max())
                if low < 0 or high >= self.config.vocab_size:
                    bad = low if low < 0 else high
                    raise ValueError(
                        f"token id {bad} in `input_ids` is outside the vocabulary [0, {self.config.vocab_size})"
                    )
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(
                    f"`inputs_embeds` must have shape (batch, seq_len, {self.config.hidden_size}), "
                    f"got {tuple(inputs_embeds.shape)}"
                )
            B, T = inputs_embeds.shape[:2]
        if B == 0 or T == 0:
            raise ValueError(f"empty input: got batch {B} x sequence length {T}; at least one token is needed")
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] not in (T, past + T):
                want = f"({B}, {past + T})" if past else f"({B}, {T})"
                raise ValueError(
                    f"`attention_mask` must have shape {want} (batch, past + new tokens), "
                    f"got {tuple(attention_mask.shape)}"
                )
        return B, T

    def resolve_cache(self, past_key_values, use_cache: bool) -> RecurrentCache | None:
        """Return the RecurrentCache to use; an empty foreign cache is replaced by one."""
        if past_key_values is None:
            return RecurrentCache(self.config.num_hidden_layers) if use_cache else None
        if isinstance(past_key_values, RecurrentCache) or type(past_key_values).__name__ == "RecurrentCache":
            return past_key_values
        if isinstance(past_key_values, Cache) and past_key_values.get_seq_length() == 0:
            return RecurrentCache(self.config.num_hidden_layers)
        raise TypeError(
            f"{type(self).__name__} keeps recurrent state and needs a RecurrentCache, got a non-empty "
            f"{type(past_key_values).__name__}"
        )

    @staticmethod
    def positions_and_masks(attention_mask, past: int, T: int, device):
        """position ids (B, T); full 0/1 key mask (B, past+T) or None; token mask (B, T) or None.

        Positions count real tokens only, so a left-padded row sees the positions it
        would see alone.
        """
        if attention_mask is None or bool(attention_mask.all()):
            positions = torch.arange(past, past + T, device=device)[None]
            return positions, None, None
        mask = attention_mask.to(device=device, dtype=torch.long)
        if mask.shape[1] == T and past:  # mask of the new tokens only: past tokens were all real
            mask = torch.cat([mask.new_ones(mask.shape[0], past), mask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -T:]
        return positions, mask, mask[:, -T:]

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As in Transformers, but a checkpoint whose shapes do not fit the config is refused
        with a ValueError that names the tensors (unless ``ignore_mismatched_sizes=True``)."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except RuntimeError as error:
            if "mismatched" not in str(error) and "size mismatch" not in str(error):
                raise
            config = kwargs.get("config") or cls.config_class.from_pretrained(pretrained_model_name_or_path)
            details = "; ".join(_shape_mismatches(cls, config, pretrained_model_name_or_path)) or str(error)
            raise ValueError(
                f"the checkpoint at {pretrained_model_name_or_path} does not fit the config of {cls.__name__}: "
                f"{details}. Pass ignore_mismatched_sizes=True to re-initialise those weights."
            ) from error

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """Save weights (safetensors), config with ``auto_map`` and the flat code bundle."""
        config_module = type(self.config).__module__
        modeling_module = type(self).__module__
        config_file = config_module.rsplit(".", 1)[-1]
        modeling_file = modeling_module.rsplit(".", 1)[-1]
        auto_map = {"AutoConfig": f"{config_file}.{type(self.config).__name__}"}
        auto_map.update({auto: f"{modeling_file}.{cls}" for auto, cls in self._auto_map_classes.items()})
        self.config.auto_map = auto_map
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_code_bundle(save_directory, [config_module, modeling_module])



def _shape_mismatches(cls, config, folder) -> list[str]:
    """'name: checkpoint (a, b) vs model (c, d)' for every tensor of a local checkpoint that does not fit."""
    from pathlib import Path

    from safetensors import safe_open

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
    found = []
    for file in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shape = tuple(f.get_slice(key).get_shape())
                if key in expected and expected[key] != shape:
                    found.append(f"{key}: checkpoint {shape} vs model {expected[key]}")
    return found
