"""Triton backend (``backend="triton"``): fused kernels installed as ``tempnet.kernels``.

Implements the protocol of :mod:`tempnet.backends`. Runs on CUDA tensors, or on CPU tensors
through Triton's interpreter when ``TRITON_INTERPRET=1`` is set before import.
"""

from tempnet.kernels.contrastive import contrastive_side
from tempnet.kernels.cross_entropy import cross_entropy_rows
from tempnet.kernels.linear_cross_entropy import linear_cross_entropy_rows

__all__ = ["contrastive_side", "cross_entropy_rows", "linear_cross_entropy_rows"]
