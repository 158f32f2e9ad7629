#!/usr/bin/env bash
# One GPU session, in order of value (each step has its own time limit, so a late one can be cut
# without losing the earlier ones): the Triton kernels compiled for the GPU against the float64
# reference (pytest), the GPU benchmark (tempnet bench --device cuda), the launch-parameter
# sweep (benchmarks/gpu_tune.py). Everything lands in $OUT (default ./gpu-out).
#
# Optional: baseline wheels (liger-kernel, cut-cross-entropy, inf-cl, open_clip_torch + ftfy,
# wcwidth) in ./.whl are installed first. Limits in seconds: TEST_S, BENCH_S, TUNE_S.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)
print('mm', torch.ops.aten.mm.overloads(), 'addmm', torch.ops.aten.addmm.overloads())"; } \
  >"$out/env.txt" 2>&1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
"$python" -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$out/env.txt" 2>&1 || exit 1
"$python" -m pip list 2>/dev/null | grep -i -E "^(torch|triton|liger|cut|inf|open.clip|transformers) " >>"$out/env.txt"

timeout "${TEST_S:-150}" "$python" -m pytest -q -n 4 -p no:cacheprovider tests/test_cuda_parity.py \
  tests/test_triton_contrastive.py tests/test_triton_cross_entropy.py::test_cuda_large_vocab \
  tests/test_triton_linear_cross_entropy.py::test_cuda_matches_reference 2>&1 | tee "$out/pytest.log" | tail -40

timeout "${BENCH_S:-240}" "$python" -m tempnet.bench --device cuda --out "$out" --repeats 5 --warmup 2 \
  2>&1 | tee "$out/bench.log" | grep -v "^\[bench\]"
timeout "${TUNE_S:-90}" "$python" benchmarks/gpu_tune.py --out "$out" 2>&1 | tee "$out/tune.log" | tail -4
