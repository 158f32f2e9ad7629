"""pytest-benchmark suite of the C++ cross-entropy backend (not part of the default test run).

    pytest benchmarks/test_bench_cpu_cross_entropy.py --benchmark-only

Each benchmark times forward + backward of one case of :mod:`cpu_table` (same shapes, baselines
and inputs: N=4096, V=32000, float32, DRO, per-row temperatures; linear op with D=1024). For the
side-by-side ratios and the peak memory of every case, run ``python benchmarks/cpu_table.py``.
"""

from __future__ import annotations

import pytest
from cpu_table import CASES, make_inputs

_inputs: dict[str, dict] = {}


def _case_inputs(kind: str) -> dict:
    if kind not in _inputs:
        _inputs.clear()  # keep one set of (N, V)-sized inputs alive at a time
        _inputs[kind] = make_inputs(kind)
    return _inputs[kind]


def _clear_grads(inputs: dict) -> None:
    for tensor in inputs.values():
        tensor.grad = None


@pytest.mark.parametrize("name", list(CASES))
def test_forward_backward(benchmark, name: str) -> None:
    kind, function, _ = CASES[name]
    inputs = _case_inputs(kind)
    function(inputs)  # warm-up: builds the extension or compiles the graph
    rounds = 3 if kind == "ce" else 1
    benchmark.pedantic(function, args=(inputs,), setup=lambda: _clear_grads(inputs), rounds=rounds, iterations=1)
    assert inputs["tau"].grad is not None
