"""Backend choice for the kernels, and the argument checks they share.

A backend is chosen, in this order, by the ``backend=`` argument of a dispatching
function (``selective_scan``, ``retention``), by the environment variable
``STRATA_KERNEL_BACKEND`` (``ref`` | ``torch``), or by default: the chunked PyTorch
form. Each distinct choice is logged once on the ``strata.kernels`` logger.

Backends per operation (``torch`` names the fast PyTorch form of every operation):

    selective_scan   ref | torch
    retention        ref | parallel | chunked   (``torch`` = ``chunked``)

A GPU backend (Triton) is added by listing its name in ``BACKENDS`` and choosing it
in ``_default_backend`` for the devices it supports.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("strata.kernels")

ENV_VAR = "STRATA_KERNEL_BACKEND"
ENV_CHOICES = ("ref", "torch")

BACKENDS = {
    "selective_scan": ("ref", "torch"),
    "retention": ("ref", "parallel", "chunked"),
}
# Names accepted in place of a backend name (the generic ``torch`` of the env var).
ALIASES = {
    "selective_scan": {"chunked": "torch"},
    "retention": {"torch": "chunked"},
}

_logged: set[tuple[str, str, str]] = set()


def _default_backend(op: str, device: torch.device | None) -> str:
    return "torch" if op == "selective_scan" else "chunked"


def resolve_backend(op: str, backend: str | None = None, device: torch.device | None = None) -> str:
    """Name of the backend that runs ``op``: argument, then env var, then default."""
    if op not in BACKENDS:
        raise ValueError(f"unknown kernel operation {op!r}; known: {sorted(BACKENDS)}")
    if backend is not None:
        source = "argument"
    elif os.environ.get(ENV_VAR):
        backend = os.environ[ENV_VAR].strip().lower()
        if backend not in ENV_CHOICES:
            raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected one of {ENV_CHOICES}")
        source = f"env {ENV_VAR}"
    else:
        backend = _default_backend(op, device)
        source = "default"
    name = ALIASES[op].get(backend, backend)
    if name not in BACKENDS[op]:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {BACKENDS[op]}")
    key = (op, name, source)
    if key not in _logged:
        _logged.add(key)
        logger.info("%s: using the %r backend (%s)", op, name, source)
    return name


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp32 accumulation; fp64 when any input is fp64 (used by the float64 tests)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def check_tensor(op: str, name: str, tensor, shape: tuple, dims: str) -> None:
    """Raise ValueError naming ``name`` unless ``tensor`` has ``shape`` (None = any size).

    ``dims`` spells the expected layout for the message, e.g. ``"[B, D, L]"``.
    """
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{op}: `{name}` must be a tensor of shape {dims}, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(f"{op}: `{name}` must be a floating-point tensor, got {tensor.dtype}")
    ok = tensor.dim() == len(shape) and all(s is None or s == n for s, n in zip(shape, tensor.shape))
    if not ok:
        want = ", ".join("?" if s is None else str(s) for s in shape)
        raise ValueError(f"{op}: `{name}` must have shape {dims} = [{want}], got {list(tensor.shape)}")


def check_chunk_size(op: str, chunk_size) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: `chunk_size` must be a positive int, got {chunk_size!r}")
