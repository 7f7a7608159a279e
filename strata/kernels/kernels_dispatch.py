"""Backend choice for the kernels, and the argument checks they share.

Every operation has one dispatching function (``selective_scan``,
``selective_state_update``, ``causal_conv1d``, ``causal_conv1d_update``,
``retention``) with a ``backend=`` argument. The backend is chosen, in this order:

1. the ``backend=`` argument (the model layers pass their config's ``kernel_backend``);
2. the environment variable ``STRATA_KERNEL_BACKEND`` (``ref`` | ``torch`` | ``cpu`` |
   ``triton`` | ``mamba_ssm``);
3. the device: ``triton`` for CUDA tensors when triton is installed, else the fast
   PyTorch form. The compiled C scan (``cpu``) is opt-in: in 2-process torchrun runs it
   made a rank abort at exit ("terminate called without an active exception") now and
   then, not yet explained (docs/kernels.md).

Each distinct choice is logged once on the ``strata.kernels`` logger. Backends per
operation (``torch`` names the fast PyTorch form of every operation; the generic
names of the env var that an operation lacks map to its nearest form, see ALIASES):

    selective_scan           ref | torch | cpu | triton | mamba_ssm
    selective_state_update   torch | triton | mamba_ssm        (the torch step is the reference)
    causal_conv1d            ref | torch | triton | mamba_ssm  (mamba_ssm = the causal-conv1d package)
    causal_conv1d_update     torch | triton | mamba_ssm
    retention                ref | parallel | chunked | triton (torch = chunked, mamba_ssm = triton)

``cpu`` is a C kernel compiled on first use (kernels_cpu_scan.py); the other
operations map it to their PyTorch form. ``triton`` runs on CUDA tensors, or on CPU
tensors under ``TRITON_INTERPRET=1`` (the Triton interpreter: slow, used by the tests). ``mamba_ssm`` needs CUDA tensors and
the mamba-ssm / causal-conv1d packages. The GPU forms live in their own modules and
are imported on first use (``gpu_form``), so nothing here needs triton.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

logger = logging.getLogger("strata.kernels")

ENV_VAR = "STRATA_KERNEL_BACKEND"
ENV_CHOICES = ("ref", "torch", "cpu", "triton", "mamba_ssm")

BACKENDS = {
    "selective_scan": ("ref", "torch", "cpu", "triton", "mamba_ssm"),
    "selective_state_update": ("torch", "triton", "mamba_ssm"),
    "causal_conv1d": ("ref", "torch", "triton", "mamba_ssm"),
    "causal_conv1d_update": ("torch", "triton", "mamba_ssm"),
    "retention": ("ref", "parallel", "chunked", "triton"),
}
# Names accepted in place of a backend name (the generic names of the env var and config).
ALIASES = {
    "selective_scan": {"chunked": "torch"},
    "selective_state_update": {"ref": "torch", "cpu": "torch"},
    "causal_conv1d": {"cpu": "torch"},
    "causal_conv1d_update": {"ref": "torch", "cpu": "torch"},
    "retention": {"torch": "chunked", "cpu": "chunked", "mamba_ssm": "triton"},
}
# The fast PyTorch form of each operation (the default off CUDA).
_TORCH_FORM = {"retention": "chunked"}

_logged: set[tuple[str, str, str]] = set()


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def mamba_ssm_installed() -> bool:
    return importlib.util.find_spec("mamba_ssm") is not None and importlib.util.find_spec("causal_conv1d") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def compiled_cpu_scan_available() -> bool:
    """Whether the compiled C selective scan builds and loads here (built on the first call)."""
    from strata.kernels.kernels_cpu_scan import available

    return available()


def _default_backend(op: str, device: torch.device | None) -> str:
    kind = torch.device(device).type if device is not None else None
    if kind == "cuda" and triton_installed():
        return "triton"
    return _TORCH_FORM.get(op, "torch")


def require_triton(op: str, device: torch.device | None) -> None:
    """Raise a clear error unless a Triton kernel can run on ``device``."""
    if not triton_installed():
        raise RuntimeError(f"{op}: the 'triton' kernel backend needs the triton package (pip install triton)")
    if device is not None and torch.device(device).type != "cuda" and not triton_interpreted():
        raise RuntimeError(
            f"{op}: the 'triton' kernel backend runs on CUDA tensors, got {torch.device(device).type} tensors; "
            "use the 'torch' backend there (or TRITON_INTERPRET=1, the slow Triton interpreter used by the tests)"
        )


def require_mamba_ssm(op: str, device: torch.device | None) -> None:
    """Raise a clear error unless the mamba-ssm / causal-conv1d CUDA kernels can run on ``device``."""
    if not mamba_ssm_installed():
        raise RuntimeError(
            f"{op}: the 'mamba_ssm' kernel backend needs the mamba-ssm and causal-conv1d packages "
            "(pip install mamba-ssm causal-conv1d, on a machine with CUDA)"
        )
    if device is not None and torch.device(device).type != "cuda":
        raise RuntimeError(f"{op}: the 'mamba_ssm' kernel backend runs on CUDA tensors, got {torch.device(device).type}")


def resolve_backend(op: str, backend: str | None = None, device: torch.device | None = None) -> str:
    """Name of the backend that runs ``op``: argument, then env var, then device default."""
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
        source = "default" if device is None else f"default for {torch.device(device).type}"
    name = ALIASES[op].get(backend, backend)
    if name not in BACKENDS[op]:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {BACKENDS[op]}")
    if name == "triton":
        require_triton(op, device)
    elif name == "cpu" and not compiled_cpu_scan_available():
        raise RuntimeError(f"{op}: the 'cpu' kernel backend could not be compiled here (no working C compiler "
                           "with OpenMP, see the warning logged); use the 'torch' backend")
    elif name == "mamba_ssm":
        require_mamba_ssm(op, device)
    key = (op, name, source)
    if key not in _logged:
        _logged.add(key)
        logger.info("%s: using the %r backend (%s)", op, name, source)
    return name


def gpu_form(op: str, name: str):
    """The function of a GPU backend (``triton`` or ``mamba_ssm``) for ``op``, imported on first use."""
    if name == "triton":
        if op in ("selective_scan", "selective_state_update"):
            from strata.kernels.kernels_triton_scan import selective_scan_triton, selective_state_update_triton
            return selective_scan_triton if op == "selective_scan" else selective_state_update_triton
        if op in ("causal_conv1d", "causal_conv1d_update"):
            from strata.kernels.kernels_triton_conv1d import causal_conv1d_triton, causal_conv1d_update_triton
            return causal_conv1d_triton if op == "causal_conv1d" else causal_conv1d_update_triton
        if op == "retention":
            from strata.kernels.kernels_triton_retention import retention_triton
            return retention_triton
    if name == "mamba_ssm" and op in BACKENDS and "mamba_ssm" in BACKENDS[op]:
        from strata.kernels.kernels_mamba_ssm import MAMBA_SSM_FORMS
        return MAMBA_SSM_FORMS[op]
    raise ValueError(f"{op}: no GPU form named {name!r}")


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
