"""Row-chunked GEMMs shared by the ops that never hold a whole ``(N, M)`` score matrix.

The linear cross-entropy (scores = logits ``hidden @ weight.T``) and the backward pass of the
contrastive loss (scores = similarities ``anchors @ candidates.T``) walk their rows in chunks of
``C`` rows: the chunk's scores go into one reusable ``(C, M)`` buffer (:func:`scores_into`), a
Triton row kernel turns them into their gradient ``G``, and :func:`gradient_products` forms
``grad_rows = G @ table`` and ``grad_table += G.T @ rows``.

Chunk size rule (:func:`rows_per_chunk`): ``C = ⌊budget / (M · element size)⌋``, rounded down to
a multiple of 128 when at least 128 (GEMM tiles), clamped to ``[1, N]``, so the buffer never
exceeds ``budget`` (except for a single row wider than it).

Half-precision inputs: the scores are float32 (rounding them to bfloat16 before ``/ τ`` would
move ``u`` by up to ``|s| · 2⁻⁸ / τ``) and ``grad_table`` is accumulated in a float32 buffer. On a
GPU, ``torch.mm(..., out_dtype=float32)`` writes the scores straight into the float32 buffer,
``G`` is rounded once to the input dtype (the GEMM operand), and
``torch.addmm(grad_table, G.T, rows, out_dtype=float32)`` accumulates in the GEMM's epilogue.
On the CPU (the Triton interpreter) the operands are upcast to float32 instead.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 256 * 2**20
GPU_CHUNK_BYTES = 2**30
HALF = (torch.float16, torch.bfloat16)
# ``torch.mm`` / ``torch.addmm`` with both ``out_dtype`` and ``out=`` (CUDA). Builds that only have
# the allocating ``out_dtype`` form get the product in a temporary, then copied or added.
_DTYPE_OUT = all("dtype_out" in op.overloads() for op in (torch.ops.aten.mm, torch.ops.aten.addmm))


def rows_per_chunk(n_rows: int, width: int, element_size: int, budget: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that a ``(rows, width)`` buffer of ``element_size`` bytes fits ``budget``."""
    rows = budget // (width * element_size)
    if rows >= 128:
        rows -= rows % 128
    return max(1, min(n_rows, rows))


def gradient_dtype(inputs: torch.Tensor, acc: torch.dtype) -> torch.dtype:
    """dtype of the chunk gradient ``G`` the row kernels write: the inputs' on a GPU (the GEMM
    operand, rounded once), the accumulation dtype on the CPU (upcast products)."""
    return inputs.dtype if inputs.is_cuda else acc


def scores_into(out: torch.Tensor, rows: torch.Tensor, table: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``out (C, M) = rows (C, D) @ table.T (+ bias)``, ``out`` in the accumulation dtype."""
    if out.dtype != rows.dtype:
        if rows.is_cuda and _DTYPE_OUT:
            torch.mm(rows, table.t(), out_dtype=out.dtype, out=out)
        elif rows.is_cuda:
            out.copy_(torch.mm(rows, table.t(), out_dtype=out.dtype))
        else:
            torch.mm(rows.to(out.dtype), table.t().to(out.dtype), out=out)
        return out if bias is None else out.add_(bias.to(out.dtype))
    if bias is None:
        return torch.mm(rows, table.t(), out=out)
    return torch.addmm(bias, rows, table.t(), out=out)


def gradient_products(grad_scores: torch.Tensor, rows: torch.Tensor, table: torch.Tensor,
                      grad_rows: torch.Tensor | None, grad_table: torch.Tensor | None) -> None:
    """``grad_rows = G @ table`` and ``grad_table += G.T @ rows`` for one chunk ``G (C, M)``.

    ``grad_rows`` has the inputs' dtype; ``grad_table`` is a float32 accumulator for
    half-precision inputs. ``G`` is in :func:`gradient_dtype`.
    """
    if grad_scores.dtype == table.dtype:
        if grad_rows is not None:
            torch.mm(grad_scores, table, out=grad_rows)
        if grad_table is not None and grad_table.dtype == table.dtype:
            grad_table.addmm_(grad_scores.t(), rows)
        elif grad_table is not None and _DTYPE_OUT:
            torch.addmm(grad_table, grad_scores.t(), rows, out_dtype=grad_table.dtype, out=grad_table)
        elif grad_table is not None:
            grad_table += torch.mm(grad_scores.t(), rows, out_dtype=grad_table.dtype)
        return
    if grad_rows is not None:
        grad_rows.copy_(torch.mm(grad_scores, table.to(grad_scores.dtype)))
    if grad_table is not None:
        # float32 products by M-slices, so the temporary stays within the chunk budget.
        width, dim = grad_table.shape
        step = max(1, CHUNK_BYTES // (dim * grad_scores.element_size()))
        rows_acc = rows.to(grad_scores.dtype)
        for start in range(0, width, step):
            grad_table[start:start + step].addmm_(grad_scores[:, start:start + step].t(), rows_acc)
