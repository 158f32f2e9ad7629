"""Triton backend (``backend="triton"``): fused kernels installed as ``tempnet.kernels``.

Implements the protocol of :mod:`tempnet.backends`. Runs on CUDA tensors, or on CPU tensors
through Triton's interpreter when ``TRITON_INTERPRET=1`` is set before import.
"""

# From the repository root this folder is also reachable as a top-level ``kernels``, the name of
# Hugging Face's package that transformers probes (and imports) at start-up; imported under that
# name it stays inert, so it neither poses as that package nor pulls in Triton.
if __name__ == "tempnet.kernels":
    from tempnet.kernels.contrastive import contrastive_side
    from tempnet.kernels.cross_entropy import cross_entropy_rows
    from tempnet.kernels.linear_cross_entropy import linear_cross_entropy_rows

    __all__ = ["contrastive_side", "cross_entropy_rows", "linear_cross_entropy_rows"]
