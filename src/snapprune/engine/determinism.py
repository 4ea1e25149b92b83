"""Bit-for-bit reproducible pruning, whatever the thread, batch or process count.

Round-off alone moves a pruned model: a different summation order flips near-tied mask entries
(quantised checkpoints are full of exact ties), the next block then sees other activations, and
the flips compound. Two things in the pipeline depend on how the work is split:

- the statistics' sums: batch sizes and the share of windows per rank change their order;
- factorisations of whole matrices (the Hessian's inverse factor, the structured solve):
  LAPACK blocks them differently for a different thread count.

Matrix products, per-token operations and the batched per-row solves do not (checked in
``tests/test_determinism.py`` on the CPU kernels this package runs on). Deterministic mode
removes both sources: statistics are summed one calibration window at a time into float64
(``LayerStats(deterministic=True)``: the sum of float32 products is then exact unless one term
is below 2⁻²⁹ of the running sum, so its order no longer matters), and whole-matrix
factorisations on the CPU run on one thread. It is torch's own switch,
``torch.use_deterministic_algorithms``, so one flag governs torch's kernels and these.
Cost: twice the statistics' memory plus one ``columns²`` product buffer, and slower
factorisations of wide layers on many-core CPUs (11,008² takes ~27 s on one thread against
~13 s on two here).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

CUBLAS_WORKSPACE = "CUBLAS_WORKSPACE_CONFIG"
"""cuBLAS reads its workspace setting from this variable when it first starts."""


def enabled() -> bool:
    """Whether deterministic mode is on (``torch.use_deterministic_algorithms``)."""
    return torch.are_deterministic_algorithms_enabled()


@contextlib.contextmanager
def deterministic(on: bool = True) -> Iterator[None]:
    """Run the body in deterministic mode (or not), restoring torch's previous setting.

    ``warn_only``: CUDA kernels without a deterministic version warn instead of failing a run.
    cuBLAS needs a fixed workspace to be deterministic (PyTorch's reproducibility notes): it is
    set for the body unless the user set one, and read when cuBLAS first starts.
    """
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    workspace = os.environ.get(CUBLAS_WORKSPACE)
    if on and workspace is None:
        os.environ[CUBLAS_WORKSPACE] = ":4096:8"
    torch.use_deterministic_algorithms(on, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        if workspace is None:
            os.environ.pop(CUBLAS_WORKSPACE, None)


@contextlib.contextmanager
def whole_matrix_threads(device: torch.device) -> Iterator[None]:
    """One CPU thread for a whole-matrix factorisation in deterministic mode; no change
    otherwise (GPU factorisations do not depend on a thread count)."""
    if not enabled() or device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
