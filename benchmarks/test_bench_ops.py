"""pytest-benchmark microbenchmarks of every case and implementation of ``tempnet bench``.

    .venv/bin/pytest benchmarks --benchmark-only [-k "ce and tempnet"]

The cases (shapes, dtypes, modes) and the implementations (tempnet, eager PyTorch,
torch.compile, and Liger-Kernel / Cut Cross-Entropy / Inf-CL / open_clip where installed) are
those of :mod:`tempnet.bench`, defined once there; for ratios measured side by side, achieved
bandwidth and peak memory, run ``tempnet bench`` instead. Value checks are off while timing.
"""

from __future__ import annotations

import pytest
import torch

import tempnet
from tempnet import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = bench.default_cases(DEVICE, quick=False)
PARAMS = [pytest.param(case, name, id=f"{case.label}-{name}".replace(" ", "_"))
          for case in CASES for name in bench.implementations(case, DEVICE)]
_inputs: dict[str, bench.Inputs] = {}


def _case_inputs(case: bench.Case) -> bench.Inputs:
    if case.label not in _inputs:
        _inputs.clear()  # one case's inputs alive at a time
        _inputs[case.label] = bench.make_inputs(case, DEVICE)
    return _inputs[case.label]


@pytest.mark.parametrize(("case", "impl"), PARAMS)
def test_forward_backward(benchmark, case: bench.Case, impl: str) -> None:
    inputs = _case_inputs(case)
    function = bench.implementations(case, DEVICE)[impl]
    leaves = [tensor for tensor in inputs.values() if tensor.requires_grad]

    def step() -> None:
        for tensor in leaves:
            tensor.grad = None
        function(inputs).backward()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    with tempnet.value_checks(False):
        step()  # warm-up: builds the C++ extension, compiles the graph or the Triton kernels
        benchmark.pedantic(step, rounds=3, iterations=1)
    assert all(tensor.grad is not None for tensor in leaves)
