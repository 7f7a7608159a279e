"""Shared pieces of every strata configuration: named presets and value checks.

Every check raises ``ValueError`` naming the field, the value and the allowed range,
so a bad config fails where it is built, not deep inside a forward pass.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable


def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{name}` must be an integer, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"`{name}` must be {bound}, got {value}")


def check_float(name: str, value: Any, low: float, high: float | None = None, low_inclusive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a number, got {value!r} ({type(value).__name__})")
    too_low = value < low if low_inclusive else value <= low
    if too_low or (high is not None and value > high):
        lo = "[" if low_inclusive else "("
        hi = f"{high}]" if high is not None else "inf)"
        raise ValueError(f"`{name}` must be in {lo}{low}, {hi}, got {value}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")


def check_divisible(name: str, value: int, divisor_name: str, divisor: int) -> None:
    if value % divisor != 0:
        raise ValueError(f"`{name}` ({value}) must be divisible by `{divisor_name}` ({divisor})")


class StrataConfigMixin:
    """Adds ``from_preset`` to a ``PreTrainedConfig`` subclass that defines ``PRESETS``.

    ``PRESETS`` maps a preset name to the keyword arguments of the config's ``__init__``.
    """

    PRESETS: dict[str, dict[str, Any]] = {}
    # ``kernel_backend`` of the configs whose layers run strata.kernels: None lets the
    # kernels choose (triton on CUDA, torch on CPU, $STRATA_KERNEL_BACKEND first).
    KERNEL_BACKENDS = (None, "ref", "torch", "cpu", "triton", "mamba_ssm")

    @staticmethod
    def check_kernel_backend(value: Any) -> None:
        check_choice("kernel_backend", value, StrataConfigMixin.KERNEL_BACKENDS)

    @classmethod
    def preset_names(cls) -> list[str]:
        return sorted(cls.PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any):
        """Build the config of a named preset; keyword arguments override its fields."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r} for {cls.__name__}; available: {cls.preset_names()}")
        kwargs = copy.deepcopy(cls.PRESETS[name])
        kwargs.update(overrides)
        return cls(**kwargs)
