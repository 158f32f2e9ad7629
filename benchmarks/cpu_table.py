"""CPU benchmark of the C++ cross-entropy backend against eager PyTorch and torch.compile.

Prints a markdown table: median time of forward + backward over ``--repeats`` runs, the ratio to
the eager baseline, and the peak memory above the inputs. Every case runs in a fresh subprocess,
one case after the other in a single invocation of this script:

    python benchmarks/cpu_table.py [--repeats 3] [--skip-linear]

Peak memory: the resident set size of that subprocess, sampled every 0.5 ms from
``/proc/self/statm`` by a background thread during one forward + backward (after a warm-up call),
minus the RSS just before the call (inputs allocated, gradients cleared). ``(N, V)`` float32 at
the default shape is 500 MiB. Value checks (SPEC §5) stay on, as by default.

Shapes: cross-entropy N=4096, V=32000, float32, DRO mode (ρ=8), a temperature per row; linear
op N=4096, D=1024, V=32000.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import tempnet

N_ROWS, VOCAB, DIM, RHO = 4096, 32000, 1024, 8.0
ALL_OPTIONS = {"softcap": 30.0, "label_smoothing": 0.1, "z_loss": 1e-4}


def eager_dro_loss(logits: torch.Tensor, target: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The baseline: ``z / τ``, F.cross_entropy per row, the DRO term of SPEC §1, mean."""
    rows = F.cross_entropy(logits / tau[:, None], target, reduction="none")
    return (tau * rows + tau * (RHO - math.log(logits.shape[-1]))).mean()


_compiled_dro_loss = torch.compile(eager_dro_loss)


def make_inputs(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Leaf inputs (requiring grad) of a cross-entropy (``"ce"``) or linear (``"linear"``) case."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {"target": torch.randint(0, VOCAB, (N_ROWS,), generator=generator),
              "tau": (torch.rand(N_ROWS, generator=generator) + 0.5).requires_grad_(),
              "class_weight": torch.rand(VOCAB, generator=generator) + 0.5}
    if kind == "ce":
        inputs["logits"] = (torch.randn(N_ROWS, VOCAB, generator=generator) * 2).requires_grad_()
    else:
        inputs["hidden"] = torch.randn(N_ROWS, DIM, generator=generator).requires_grad_()
        inputs["weight"] = (torch.randn(VOCAB, DIM, generator=generator) / math.sqrt(DIM)).requires_grad_()
    return inputs


def _ce(backend: str, **options) -> Callable[[dict], None]:
    def run(x: dict) -> None:
        tempnet.tempered_cross_entropy(x["logits"], x["target"], x["tau"], rho=RHO, backend=backend,
                                       **options).backward()
    return run


def _all_options(backend: str) -> Callable[[dict], None]:
    def run(x: dict) -> None:
        tempnet.tempered_cross_entropy(x["logits"], x["target"], x["tau"], rho=RHO, backend=backend,
                                       weight=x["class_weight"], **ALL_OPTIONS).backward()
    return run


def _linear_cpp(x: dict) -> None:
    tempnet.tempered_linear_cross_entropy(x["hidden"], x["weight"], x["target"], x["tau"], rho=RHO,
                                          backend="cpp").backward()


def _linear_eager(x: dict) -> None:
    eager_dro_loss(x["hidden"] @ x["weight"].T, x["target"], x["tau"]).backward()


# name -> (input kind, function running forward + backward, baseline name for the ratio)
CASES: dict[str, tuple[str, Callable[[dict], None], str]] = {
    "ce eager (F.cross_entropy)": ("ce", lambda x: eager_dro_loss(x["logits"], x["target"], x["tau"]).backward(),
                                   "ce eager (F.cross_entropy)"),
    "ce torch.compile": ("ce", lambda x: _compiled_dro_loss(x["logits"], x["target"], x["tau"]).backward(),
                         "ce eager (F.cross_entropy)"),
    "ce cpp": ("ce", _ce("cpp"), "ce eager (F.cross_entropy)"),
    "ce cpp inplace_backward": ("ce", _ce("cpp", inplace_backward=True), "ce eager (F.cross_entropy)"),
    "ce cpp all options": ("ce", _all_options("cpp"), "ce cpp"),
    "linear eager (hidden @ W.T + CE)": ("linear", _linear_eager, "linear eager (hidden @ W.T + CE)"),
    "linear cpp": ("linear", _linear_cpp, "linear eager (hidden @ W.T + CE)"),
}


def _clear_grads(inputs: dict[str, torch.Tensor]) -> None:
    for tensor in inputs.values():
        tensor.grad = None
    gc.collect()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_extra_bytes(run: Callable[[], None]) -> int:
    """Peak RSS above the current RSS while ``run()`` executes (sampled, see module docstring)."""
    baseline = _rss_bytes()
    peak, done = [baseline], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss_bytes()) - baseline


def measure(name: str, repeats: int) -> dict[str, object]:
    """Run one case in this process: warm-up, ``repeats`` timed calls, one memory-sampled call."""
    kind, function, _ = CASES[name]
    inputs = make_inputs(kind)
    function(inputs)
    times = []
    for _ in range(repeats):
        _clear_grads(inputs)
        start = time.perf_counter()
        function(inputs)
        times.append(time.perf_counter() - start)
    _clear_grads(inputs)
    extra = _peak_extra_bytes(lambda: function(inputs))
    return {"times": times, "peak_extra_bytes": extra}


def _run_child(name: str, repeats: int) -> dict[str, object]:
    command = [sys.executable, __file__, "--child", name, "--repeats", str(repeats)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"case {name!r} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-linear", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.repeats)))
        return
    names = [name for name in CASES if not (args.skip_linear and CASES[name][0] == "linear")]
    results = {}
    for name in names:
        results[name] = _run_child(name, args.repeats if CASES[name][0] == "ce" else 1)
        print(f"measured {name}", file=sys.stderr)
    buffer_mib = N_ROWS * VOCAB * 4 / 2**20
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; (N, V) float32 buffer = "
          f"{buffer_mib:.0f} MiB\n")
    print("| case | median time (s) | runs | speed-up vs | × | × vs torch.compile | peak extra memory (MiB) "
          "| in (N, V) buffers |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    compiled = results.get("ce torch.compile")
    for name in names:
        times = results[name]["times"]
        median = statistics.median(times)
        baseline = CASES[name][2]
        ratio = statistics.median(results[baseline]["times"]) / median if baseline in results else float("nan")
        versus_compiled = (f"{statistics.median(compiled['times']) / median:.2f}"
                           if compiled is not None and CASES[name][0] == "ce" else "")
        extra = results[name]["peak_extra_bytes"] / 2**20
        print(f"| {name} | {median:.3f} | {len(times)} | {baseline} | {ratio:.2f} | {versus_compiled} | "
              f"{extra:.0f} | {extra / buffer_mib:.2f} |")


if __name__ == "__main__":
    main()
