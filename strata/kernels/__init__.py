"""Sequence kernels: each op as a readable sequential reference, a fast PyTorch form and Triton kernels.

One dispatching function per op (``selective_scan``, ``selective_state_update``,
``causal_conv1d``, ``causal_conv1d_update``, ``retention``) picks the form: its
``backend=`` argument (a model config's ``kernel_backend``), else $STRATA_KERNEL_BACKEND,
else the device (triton on CUDA, torch on CPU); see kernels_dispatch.py and
docs/kernels.md. Layouts and state conventions: docs/internals.md ("Kernel conventions").

The Triton forms (kernels_triton_scan.py, kernels_triton_conv1d.py,
kernels_triton_retention.py) and the mamba-ssm adapters (kernels_mamba_ssm.py) are
imported on first use (``gpu_form``), so ``import strata`` never imports triton.
Modules that a saved model needs import from the defining module (``from
strata.kernels.kernels_retention import retention``), not from this package.
"""

from strata.kernels.kernels_conv1d import (
    causal_conv1d,
    causal_conv1d_ref,
    causal_conv1d_torch,
    causal_conv1d_update,
    causal_conv1d_update_torch,
)
from strata.kernels.kernels_dispatch import BACKENDS, ENV_VAR, gpu_form, resolve_backend
from strata.kernels.kernels_retention import (
    retention,
    retention_chunked,
    retention_parallel,
    retention_ref,
    retention_step,
)
from strata.kernels.kernels_selective_scan import (
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
    selective_state_update,
)

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "causal_conv1d",
    "causal_conv1d_ref",
    "causal_conv1d_torch",
    "causal_conv1d_update",
    "causal_conv1d_update_torch",
    "gpu_form",
    "resolve_backend",
    "retention",
    "retention_chunked",
    "retention_parallel",
    "retention_ref",
    "retention_step",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_ref",
    "selective_state_update",
]
