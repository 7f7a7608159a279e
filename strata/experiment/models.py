"""Building the models of an experiment from ``strata.ARCHITECTURES``, and matching parameter counts.

A model is ``(model_type, preset, overrides)``: the config class registered under
``model_type`` builds ``preset`` with ``overrides`` and the task's vocabulary, and the causal
LM class registered beside it is initialised from it. Nothing here names an architecture, so
one registered later is picked up by its ``model_type`` alone.

Parameter matching (``match_params``) sets one integer config field (by default the MLP width
``intermediate_size``) to the multiple of ``multiple`` whose **non-embedding** parameter count
is closest to the reference model's. Non-embedding: the token embedding and the LM head
depend on the task's vocabulary, not on the architecture, so they are left out of the match.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

MATCH_VOCAB = 256  # vocabulary of the models built to count parameters (irrelevant to the non-embedding count)


class UnknownArchitecture(LookupError):
    """The ``model_type`` is not registered in ``strata.ARCHITECTURES``."""


def architecture(model_type: str):
    import strata

    if model_type not in strata.ARCHITECTURES:
        raise UnknownArchitecture(
            f"model_type {model_type!r} is not registered in strata.ARCHITECTURES "
            f"(registered: {sorted(strata.ARCHITECTURES)})")
    config_cls, _, lm_cls, _ = strata.ARCHITECTURES[model_type]
    return config_cls, lm_cls


def check_preset(model_type: str, preset: str) -> None:
    config_cls, _ = architecture(model_type)
    presets = getattr(config_cls, "PRESETS", None)
    if presets is None or not hasattr(config_cls, "from_preset"):
        raise ValueError(f"{config_cls.__name__} ({model_type}) has no named presets")
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r} for model_type {model_type!r}; available: {sorted(presets)}")


def build_config(model_type: str, preset: str, overrides: dict[str, Any], vocab_size: int,
                 special_ids: dict[str, int] | None = None):
    config_cls, _ = architecture(model_type)
    ids = special_ids or {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    return config_cls.from_preset(preset, **{"vocab_size": vocab_size, **ids, **overrides})


def build_model(model_type: str, preset: str, overrides: dict[str, Any], vocab_size: int,
                special_ids: dict[str, int] | None = None, seed: int = 0):
    """A freshly initialised causal LM; the weights depend on ``seed`` only."""
    from transformers import set_seed

    _, lm_cls = architecture(model_type)
    config = build_config(model_type, preset, overrides, vocab_size, special_ids)
    set_seed(seed)
    return lm_cls(config).float()


def _embedding_params(model) -> set[int]:
    ids = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            module = None
        if module is not None:
            ids |= {id(p) for p in module.parameters()}
    return ids


def count_parameters(model) -> dict[str, int]:
    """Unique parameters (tied weights once), and those outside the embedding and LM head."""
    unique = {id(p): p for p in model.parameters()}
    embedding = _embedding_params(model)
    return {"parameters": sum(p.numel() for p in unique.values()),
            "non_embedding_parameters": sum(p.numel() for k, p in unique.items() if k not in embedding)}


@functools.lru_cache(maxsize=256)
def _non_embedding_count(model_type: str, preset: str, overrides_key: str) -> int:
    import json

    overrides = json.loads(overrides_key)
    config = build_config(model_type, preset, overrides, MATCH_VOCAB)
    _, lm_cls = architecture(model_type)
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            model = lm_cls(config)
    except Exception:  # an architecture whose init needs real tensors
        model = lm_cls(config)
    return count_parameters(model)["non_embedding_parameters"]


def non_embedding_count(model_type: str, preset: str, overrides: dict[str, Any]) -> int:
    import json

    return _non_embedding_count(model_type, preset, json.dumps(overrides, sort_keys=True))


def match_parameters(spec, reference) -> tuple[dict[str, Any], dict[str, Any]]:
    """Overrides of ``spec`` with its ``match_params`` field set so that its non-embedding parameter
    count is closest to ``reference``'s; returns (overrides, a record of the match)."""
    m = spec.match_params
    field, multiple = m["field"], m["multiple"]
    target = non_embedding_count(reference.model_type, reference.preset, reference.overrides)
    config_cls, _ = architecture(spec.model_type)
    base = build_config(spec.model_type, spec.preset, spec.overrides, MATCH_VOCAB)
    if not isinstance(getattr(base, field, None), int):
        raise ValueError(f"match_params.field {field!r} is not an integer field of {config_cls.__name__}")
    low = m.get("low", multiple)
    high = m.get("high", max(64 * multiple, 8 * getattr(base, field)))
    best = None
    for value in range(low - low % multiple or multiple, high + 1, multiple):
        try:
            count = non_embedding_count(spec.model_type, spec.preset, {**spec.overrides, field: value})
        except ValueError:
            continue  # a value the config refuses (e.g. not divisible by the heads)
        gap = abs(count - target)
        if best is None or gap < best[0]:
            best = (gap, value, count)
        if count > target and best[1] != value:
            break  # counts grow with the field: nothing further is closer
    if best is None:
        raise ValueError(f"match_params: no value of {field!r} in [{low}, {high}] builds a valid config")
    _, value, count = best
    record = {"field": field, "value": value, "reference": reference.name, "target_non_embedding": target,
              "non_embedding": count, "relative_gap": (count - target) / target}
    return {**spec.overrides, field: value}, record
