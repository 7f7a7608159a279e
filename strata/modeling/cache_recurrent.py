"""`RecurrentCache`: the one cache of every strata model.

Transformers' default `DynamicCache` assumes key/value layers, and a cache made only of
its recurrent layers raises in `get_seq_length()`, which `generate` calls. strata's
layers keep state of any kind (key/value for attention, a matrix for retention, conv +
SSM states for Mamba, memory banks ...), so the cache stores, per layer, a dict of named
tensors whose first dimension is the batch, and counts the tokens it has seen itself.
"""

from __future__ import annotations

from typing import Iterator

import torch
from transformers.cache_utils import Cache

# State entries that grow along the sequence (dim 2, [B, H, T, D]); all others are fixed size.
KEY, VALUE = "key", "value"


class RecurrentLayerState:
    """The state of one layer: named tensors, batch first."""

    is_sliding = False
    is_compileable = False
    supports_early_init = False
    is_croppable = False

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self.tensors.items()}
        return f"RecurrentLayerState({shapes})"

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)

    def map_(self, fn) -> None:
        self.tensors = {k: fn(v) for k, v in self.tensors.items()}

    def reset(self) -> None:
        self.tensors = {}

    # Hooks that `generate` and beam search call on every layer.
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.map_(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.map_(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.map_(lambda t: t[indices])

    def offload(self) -> None:
        self.map_(lambda t: t.to("cpu", non_blocking=True))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("a recurrent state cannot be rolled back: RecurrentCache does not support crop")


class RecurrentCache(Cache):
    """Per-layer named state tensors plus the number of tokens seen.

    ``layer(i)`` returns the state of layer ``i``; mixers read it with ``.get(name)`` and
    write it with ``set(i, name=tensor, ...)``. Attention layers append keys and values
    with ``update(key, value, i)`` exactly as with a ``DynamicCache``.
    """

    def __init__(self, num_layers: int | None = None, config=None, **kwargs):
        if num_layers is None:
            num_layers = getattr(config, "num_hidden_layers", 0) if config is not None else 0
        super().__init__(layers=[RecurrentLayerState() for _ in range(num_layers)])
        self.seen_tokens = 0

    def layer(self, layer_idx: int) -> RecurrentLayerState:
        while len(self.layers) <= layer_idx:
            self.layers.append(RecurrentLayerState())
        return self.layers[layer_idx]

    def set(self, layer_idx: int, **tensors: torch.Tensor) -> None:
        self.layer(layer_idx).tensors.update(tensors)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Append keys/values [B, H, T, D] of an attention layer and return all of them."""
        state = self.layer(layer_idx)
        if KEY in state.tensors:
            key_states = torch.cat([state.tensors[KEY], key_states], dim=2)
            value_states = torch.cat([state.tensors[VALUE], value_states], dim=2)
        state.tensors[KEY], state.tensors[VALUE] = key_states, value_states
        return key_states, value_states

    def advance(self, num_tokens: int) -> None:
        """Called once per forward by the model after all layers consumed ``num_tokens``."""
        self.seen_tokens += num_tokens

    # --- what `generate` and the masking utilities ask of a cache ---
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.seen_tokens > 0

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("a recurrent state cannot be rolled back: RecurrentCache does not support crop")

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.seen_tokens > 0

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def batch_size(self) -> int:
        for state in self.layers:
            for t in state.tensors.values():
                return t.shape[0]
        return -1

    def __iter__(self) -> Iterator[RecurrentLayerState]:
        return iter(self.layers)

    def __repr__(self) -> str:
        return f"RecurrentCache(seen_tokens={self.seen_tokens}, layers={self.layers})"
