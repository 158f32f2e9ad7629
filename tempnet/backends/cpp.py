"""C++ backend (``backend="cpp"``): fused, multithreaded CPU kernels from ``csrc/``.

Implements the protocol of :mod:`tempnet.backends`; the extension is built just in time by
:func:`load_extension` (see :mod:`tempnet.backends._cpp_build`).
"""

from tempnet.backends._cpp_build import load_extension
from tempnet.backends.cpp_contrastive import contrastive_side
from tempnet.backends.cpp_cross_entropy import cross_entropy_rows, linear_cross_entropy_rows

__all__ = ["contrastive_side", "cross_entropy_rows", "linear_cross_entropy_rows", "load_extension"]
