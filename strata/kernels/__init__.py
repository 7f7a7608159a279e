"""Sequence kernels: a readable sequential reference and a fast PyTorch form of each op.

Layouts and state conventions: docs/internals.md ("Kernel conventions"). Modules that a
saved model needs import from the defining module (``from
strata.kernels.kernels_retention import retention``), not from this package.
"""

from strata.kernels.kernels_conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_update
from strata.kernels.kernels_dispatch import ENV_VAR, resolve_backend
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
    "ENV_VAR",
    "causal_conv1d",
    "causal_conv1d_ref",
    "causal_conv1d_update",
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
