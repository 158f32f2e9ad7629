"""``tempnet bench``: time and memory of the fused ops against the baselines, side by side.

For each op and shape it measures forward, backward and forward+backward time of every available
implementation in the same process, the ratio of each baseline's time to tempnet's, the
achieved bandwidth (cross-entropy: two reads and one write of the logits) or TFLOP/s
(linear CE, contrastive) against ceilings measured first on the same device (a large copy, a
large matmul), and peak memory over the inputs: ``torch.cuda.max_memory_allocated`` on GPU, the
peak RSS of a fresh subprocess on CPU. Results print as a markdown table and are written as JSON.

The repetitions of a case's implementations are interleaved (round robin, see
:func:`time_interleaved`), so the ratios hold on a shared machine whose speed drifts. Backward
time is ``(forward+backward) − forward`` (medians), so a fused op that computes its gradient
during the forward pass reports that work under forward. Value checks (SPEC §5) are
switched off while timing; the JSON says so.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import tempnet

Inputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Case:
    """One benchmark configuration: an op (``ce``, ``linear``, ``contrastive``), its sizes, a mode."""

    op: str
    sizes: dict[str, int]
    dtype: str
    # "dro": per-row τ, ρ set; "dro_options": the same with every SPEC §1b option on (compared with
    # itself, options off); "plain_tau1": τ = 1, the loss the baselines compute.
    mode: str

    @property
    def label(self) -> str:
        return f"{self.op} " + " ".join(f"{k}={v}" for k, v in self.sizes.items()) + f" {self.dtype} {self.mode}"


@dataclass
class Result:
    case: Case
    impl: str
    forward_ms: float | None = None
    backward_ms: float | None = None
    total_ms: float | None = None
    peak_mb: float | None = None
    throughput: float | None = None  # GB/s (ce) or TFLOP/s (linear, contrastive) of forward+backward
    note: str = ""
    ratio_to_first: float | None = None  # forward+backward time ÷ that of the case's first implementation


RHO = 2.0


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Inputs:
    """Random inputs of ``case``, drawn on ``device``; the differentiable ones require grad."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    s = case.sizes

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    def labels(rows: int) -> torch.Tensor:
        return torch.randint(0, s["V"], (rows,), generator=gen, device=device)

    def leaf(values: torch.Tensor) -> torch.Tensor:
        return values.to(dtype=dtype).requires_grad_()

    def temperatures(rows: int, low: float, high: float) -> torch.Tensor:
        if case.mode == "plain_tau1":
            return torch.ones(rows, device=device)
        return (low + (high - low) * torch.rand(rows, generator=gen, device=device)).requires_grad_()

    if case.op == "ce":
        return {"logits": leaf(2 * randn(s["N"], s["V"])), "target": labels(s["N"]),
                "tau": temperatures(s["N"], 1.0, 2.0)}
    if case.op == "linear":
        return {"hidden": leaf(randn(s["N"], s["D"])), "weight": leaf(randn(s["V"], s["D"]) / math.sqrt(s["D"])),
                "target": labels(s["N"]), "tau": temperatures(s["N"], 1.0, 2.0)}
    return {"image": leaf(F.normalize(randn(s["B"], s["D"]), dim=-1)),
            "text": leaf(F.normalize(randn(s["B"], s["D"]), dim=-1)),
            "tau": temperatures(s["B"], 0.05, 0.1), "tau_text": temperatures(s["B"], 0.05, 0.1)}


def _eager_ce(logits: torch.Tensor, target: torch.Tensor, tau: torch.Tensor, rho: float | None) -> torch.Tensor:
    """The eager formula users write today: ``z/τ`` then ``F.cross_entropy`` (+ the DRO term)."""
    rows = F.cross_entropy(logits.float() / tau[:, None], target, reduction="none")
    if rho is not None:
        rows = tau * rows + tau * (rho - math.log(logits.shape[-1]))
    return rows.mean()


def _eager_contrastive(image: torch.Tensor, text: torch.Tensor, tau: torch.Tensor, tau_text: torch.Tensor,
                       rho: float | None) -> torch.Tensor:
    return tempnet.tempered_contrastive_loss(image, text, tau, tau_text, rho=rho, backend="torch")


def implementations(case: Case, device: torch.device) -> dict[str, Callable[[Inputs], torch.Tensor]]:
    """Every implementation available here for ``case``: tempnet first, then the baselines."""
    rho = None if case.mode == "plain_tau1" else RHO
    impls: dict[str, Callable[[Inputs], torch.Tensor]] = {}
    if case.mode == "dro_options":
        return _options_overhead_implementations(case)
    if case.op == "ce":
        impls["tempnet"] = lambda x: tempnet.tempered_cross_entropy(x["logits"], x["target"], x["tau"], rho=rho)
        impls["eager"] = lambda x: _eager_ce(x["logits"], x["target"], x["tau"], rho)
        compiled = torch.compile(_eager_ce, dynamic=False)
        impls["torch.compile"] = lambda x: compiled(x["logits"], x["target"], x["tau"], rho)
        if case.mode == "plain_tau1" and device.type == "cuda" and _installed("liger_kernel"):
            from liger_kernel.transformers import LigerCrossEntropyLoss

            liger = LigerCrossEntropyLoss()
            impls["liger"] = lambda x: liger(x["logits"], x["target"])
        # Last, and timed after the others (DESTROYS_INPUTS): it overwrites the logits with their gradient.
        impls["tempnet inplace_backward"] = lambda x: tempnet.tempered_cross_entropy(
            x["logits"], x["target"], x["tau"], rho=rho, inplace_backward=True)
    elif case.op == "linear":
        impls["tempnet"] = lambda x: tempnet.tempered_linear_cross_entropy(x["hidden"], x["weight"], x["target"],
                                                                           x["tau"], rho=rho)
        impls["eager"] = lambda x: _eager_ce(x["hidden"] @ x["weight"].T, x["target"], x["tau"], rho)
        compiled_linear = torch.compile(lambda h, w, y, t: _eager_ce(h @ w.T, y, t, rho), dynamic=False)
        impls["torch.compile"] = lambda x: compiled_linear(x["hidden"], x["weight"], x["target"], x["tau"])
        if case.mode == "plain_tau1" and device.type == "cuda" and _installed("liger_kernel"):
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            flce = LigerFusedLinearCrossEntropyLoss()
            impls["liger"] = lambda x: flce(x["weight"], x["hidden"], x["target"])
        if case.mode == "plain_tau1" and device.type == "cuda" and _installed("cut_cross_entropy"):
            from cut_cross_entropy import linear_cross_entropy

            impls["cut-cross-entropy"] = lambda x: linear_cross_entropy(x["hidden"], x["weight"], x["target"])
    else:
        impls["tempnet"] = lambda x: tempnet.tempered_contrastive_loss(x["image"], x["text"], x["tau"], x["tau_text"],
                                                                       rho=rho)
        impls["eager"] = lambda x: _eager_contrastive(x["image"], x["text"], x["tau"], x["tau_text"], rho)
        if case.mode == "plain_tau1" and _installed("open_clip"):
            from open_clip.loss import ClipLoss

            clip = ClipLoss()
            impls["open_clip ClipLoss"] = lambda x: clip(x["image"], x["text"], torch.ones((), device=device))
        if case.mode == "plain_tau1" and device.type == "cuda" and _installed("inf_cl"):
            from inf_cl import cal_inf_loss

            labels = torch.arange(case.sizes["B"], device=device)
            impls["inf-cl"] = lambda x: 0.5 * (cal_inf_loss(x["image"], x["text"], labels=labels)
                                               + cal_inf_loss(x["text"], x["image"], labels=labels)).mean()
    return impls


def _options_overhead_implementations(case: Case) -> dict[str, Callable[[Inputs], torch.Tensor]]:
    """tempnet with every SPEC §1b option on, against itself with the options off (issue: ≤ 10%)."""
    vocab = case.sizes["V"]
    class_weight = 0.5 + torch.rand(vocab, generator=torch.Generator().manual_seed(1))
    options = {"softcap": 30.0, "label_smoothing": 0.1, "z_loss": 1e-4}

    def weight_on(x: Inputs) -> torch.Tensor:
        return class_weight.to(next(iter(x.values())).device)

    if case.op == "ce":
        return {
            "tempnet options off": lambda x: tempnet.tempered_cross_entropy(
                x["logits"], x["target"], x["tau"], rho=RHO),
            "tempnet all options": lambda x: tempnet.tempered_cross_entropy(
                x["logits"], x["target"], x["tau"], rho=RHO, weight=weight_on(x), **options),
        }
    return {
        "tempnet options off": lambda x: tempnet.tempered_linear_cross_entropy(
            x["hidden"], x["weight"], x["target"], x["tau"], rho=RHO),
        "tempnet all options": lambda x: tempnet.tempered_linear_cross_entropy(
            x["hidden"], x["weight"], x["target"], x["tau"], rho=RHO, class_weight=weight_on(x), **options),
    }


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _elapsed_ms(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(_elapsed_ms(fn, device) for _ in range(repeats))


def _differentiable(inputs: Inputs) -> list[torch.Tensor]:
    return [v for v in inputs.values() if v.requires_grad]


def _passes(fn: Callable[[Inputs], torch.Tensor], inputs: Inputs) -> tuple[Callable[[], object], Callable[[], None]]:
    """``(forward, forward_backward)`` closures of ``fn`` on ``inputs``."""
    grads = _differentiable(inputs)

    def forward() -> torch.Tensor:
        return fn(inputs)

    def forward_backward() -> None:
        for tensor in grads:
            tensor.grad = None
        forward().backward()

    return forward, forward_backward


def time_interleaved(fns: dict[str, Callable[[Inputs], torch.Tensor]], inputs: Inputs, device: torch.device,
                     repeats: int, warmup: int) -> dict[str, tuple[float, float, float]]:
    """Median forward, backward and forward+backward milliseconds of each implementation.

    After ``warmup`` passes of each, the ``repeats`` repetitions go round robin over the
    implementations, so slow drifts of a shared machine (other load, clock changes) fall on all
    of them alike and their ratios hold even where absolute times wander. Backward is
    ``(forward+backward) − forward`` of the medians.
    """
    passes = {name: _passes(fn, inputs) for name, fn in fns.items()}
    for forward, forward_backward in passes.values():
        for _ in range(warmup):
            forward_backward()
            forward()
    samples: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in fns}
    for _ in range(repeats):
        for name, (forward, forward_backward) in passes.items():
            samples[name][1].append(_elapsed_ms(forward_backward, device))
            samples[name][0].append(_elapsed_ms(forward, device))
    medians = {}
    for name, (fwd_times, total_times) in samples.items():
        fwd, total = statistics.median(fwd_times), statistics.median(total_times)
        medians[name] = (fwd, max(total - fwd, 0.0), total)
    return medians


def gpu_peak_mb(fn: Callable[[Inputs], torch.Tensor], inputs: Inputs, device: torch.device) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn(inputs).backward()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _rss_mb(field: str) -> float:
    """``VmRSS`` (current) or ``VmHWM`` (peak) of this process, from /proc, in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_mb(case: Case, impl: str) -> float:
    """Peak RSS over the inputs of one forward+backward, in a fresh Python process.

    The child runs one warm-up pass (lazy library loading is not the op's memory), resets the
    kernel's peak-RSS counter (``/proc/self/clear_refs``), runs the measured pass and reports
    ``VmHWM − VmRSS(before)``. glibc is told to ``mmap`` every large block so freed memory leaves
    the RSS and the warm-up pass cannot hide the measured one's allocations.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    child = subprocess.run(
        [sys.executable, "-m", "tempnet.bench", "--child", json.dumps({"case": asdict(case), "impl": impl})],
        capture_output=True, text=True, check=True, env=env,
    )
    return float(child.stdout.strip().splitlines()[-1])


def _child_main(spec: str) -> None:
    payload = json.loads(spec)
    case = Case(**payload["case"])
    device = torch.device("cpu")
    tempnet.set_value_checks(False)
    inputs = make_inputs(case, device)
    fn = implementations(case, device)[payload["impl"]]
    fn(inputs).backward()
    for tensor in _differentiable(inputs):
        tensor.grad = None
    gc.collect()
    before = _rss_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    fn(inputs).backward()
    print(max(_rss_mb("VmHWM") - before, 0.0))


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """Device ceilings measured here: copy bandwidth (GB/s) and matmul TFLOP/s (bf16 GPU, fp32 CPU)."""
    n_bytes = 2**30 if device.type == "cuda" else 2**28
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), device, repeats=10, warmup=3)
    size, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    mm_ms = _median_ms(lambda: a @ b, device, repeats=10, warmup=3)
    return {"copy_GBps": 2 * n_bytes / copy_ms / 1e6, "matmul_TFLOPs": 2 * size**3 / mm_ms / 1e9,
            "matmul_dtype": str(dtype).replace("torch.", "")}


def _work(case: Case) -> tuple[str, float]:
    """(unit, amount) of forward+backward work: bytes for CE, FLOPs for matmul-bound ops."""
    s = case.sizes
    if case.op == "ce":
        element = torch.tensor([], dtype=getattr(torch, case.dtype)).element_size()
        return "GB/s", 3.0 * s["N"] * s["V"] * element
    if case.op == "linear":
        return "TFLOP/s", 2.0 * 3 * s["N"] * s["V"] * s["D"]
    return "TFLOP/s", 2.0 * 2 * 3 * s["B"] * s["B"] * s["D"]


def default_cases(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        return [Case("ce", {"N": 64, "V": 1000}, "float32", "dro"),
                Case("linear", {"N": 64, "D": 32, "V": 1000}, "float32", "dro"),
                Case("contrastive", {"B": 64, "D": 32}, "float32", "dro")]
    if device.type == "cuda":
        # Most telling first (a run cut short by a device-time limit keeps what it finished).
        ce, linear, contrastive = {"N": 16384, "V": 128256}, {"N": 8192, "D": 4096, "V": 128256}, {"B": 16384, "D": 768}
        return [Case("ce", ce, "bfloat16", "plain_tau1"), Case("ce", ce, "bfloat16", "dro"),
                Case("linear", linear, "bfloat16", "plain_tau1"), Case("linear", linear, "bfloat16", "dro"),
                Case("contrastive", contrastive, "bfloat16", "plain_tau1"),
                Case("contrastive", contrastive, "bfloat16", "dro"),
                Case("ce", ce, "bfloat16", "dro_options"),
                Case("ce", {"N": 16384, "V": 256000}, "bfloat16", "dro"),
                Case("ce", {"N": 16384, "V": 32000}, "bfloat16", "dro"),
                Case("contrastive", {"B": 65536, "D": 768}, "bfloat16", "plain_tau1")]
    return [Case("ce", {"N": 4096, "V": 32000}, "float32", "dro"),
            Case("ce", {"N": 4096, "V": 32000}, "float32", "dro_options"),
            Case("ce", {"N": 4096, "V": 32000}, "float32", "plain_tau1"),
            Case("linear", {"N": 4096, "D": 1024, "V": 32000}, "float32", "dro"),
            Case("contrastive", {"B": 4096, "D": 768}, "float32", "dro")]


# Implementations that overwrite their inputs (the logits become their gradient): timed after the others.
DESTROYS_INPUTS = frozenset({"tempnet inplace_backward"})


def _failure_note(name: str, error: Exception) -> str:
    """The note of a failed implementation; tempnet's own failures are errors, not notes."""
    if isinstance(error, torch.OutOfMemoryError):
        return "out of memory"
    if name.startswith("tempnet"):
        raise error
    # a third-party baseline that fails here must not end the run
    return f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"


def _run_case(case: Case, device: torch.device, ceilings: dict[str, float], repeats: int, warmup: int,
              measure_memory: bool, progress: Callable[[str], None]) -> list[Result]:
    inputs = make_inputs(case, device)
    unit, work = _work(case)
    ceiling = ceilings["copy_GBps"] if unit == "GB/s" else ceilings["matmul_TFLOPs"]
    impls = implementations(case, device)
    results = {name: Result(case, name) for name in impls}
    runnable = {}
    for name, fn in impls.items():  # one trial pass each: a baseline that fails is noted and left out
        if name in DESTROYS_INPUTS:  # tempnet's own, timed last: a failure raises there
            runnable[name] = fn
            continue
        try:
            _passes(fn, inputs)[1]()
            runnable[name] = fn
        except Exception as error:
            results[name].note = _failure_note(name, error)
    groups = [{n: f for n, f in runnable.items() if n not in DESTROYS_INPUTS},
              {n: f for n, f in runnable.items() if n in DESTROYS_INPUTS}]
    for group in groups:
        if not group:
            continue
        progress(f"{case.label}: {', '.join(group)}")
        for name, (fwd, bwd, total) in time_interleaved(group, inputs, device, repeats, warmup).items():
            result = results[name]
            result.forward_ms, result.backward_ms, result.total_ms = fwd, bwd, total
            result.throughput = work / total / (1e6 if unit == "GB/s" else 1e9)
            result.note = f"{100 * result.throughput / ceiling:.0f}% of measured {unit} ceiling"
    if measure_memory:
        for name, fn in runnable.items():
            try:
                on_gpu = device.type == "cuda"
                results[name].peak_mb = gpu_peak_mb(fn, inputs, device) if on_gpu else cpu_peak_mb(case, name)
            except Exception as error:
                results[name].note = _failure_note(name, error)
    case_results = list(results.values())
    first = case_results[0]
    for other in case_results[1:]:
        if first.total_ms and other.total_ms:
            other.ratio_to_first = other.total_ms / first.total_ms
    return case_results


def run(cases: list[Case], device: torch.device, repeats: int, warmup: int, measure_memory: bool,
        progress: Callable[[str], None] = print,
        after_case: Callable[[dict, list[Result]], None] | None = None) -> tuple[dict, list[Result]]:
    """Measure every implementation of every case (value checks off while timing); return (meta, results).

    ``after_case(meta, results_so_far)`` runs after each case (the CLI writes partial results).
    """
    with tempnet.value_checks(False):
        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "triton": _version("triton"), "tempnet": tempnet.__version__,
            "tempnet_backend": tempnet.choose_backend("auto", device).name,
            "cuda_driver": _cuda_driver() if device.type == "cuda" else None,
            "value_checks": False, "repeats": repeats, "warmup": warmup, "ceilings": measure_ceilings(device),
            "timing": ("median wall time, repetitions interleaved across implementations; "
                       "backward = (forward+backward) - forward"),
        }
        results: list[Result] = []
        for case in cases:
            results += _run_case(case, device, meta["ceilings"], repeats, warmup, measure_memory, progress)
            if after_case is not None:
                after_case(meta, results)
    return meta, results


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _cuda_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def markdown_table(results: list[Result]) -> str:
    lines = ["| case | impl | fwd ms | bwd ms | fwd+bwd ms | time ÷ first row | throughput | peak MB over inputs |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |"]

    def fmt(value: float | None, digits: int = 2) -> str:
        return "—" if value is None else f"{value:.{digits}f}"

    for r in results:
        unit = "GB/s" if r.case.op == "ce" else "TFLOP/s"
        ratio = fmt(r.ratio_to_first) if r.ratio_to_first is not None else "1.00 (first)"
        throughput = "—" if r.throughput is None else f"{r.throughput:.3g} {unit} ({r.note})"
        lines.append(f"| {r.case.label} | {r.impl} | {fmt(r.forward_ms)} | {fmt(r.backward_ms)} | {fmt(r.total_ms)} "
                     f"| {ratio} | {throughput if r.throughput is not None else r.note or '—'} | {fmt(r.peak_mb, 1)} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", default="ce,linear,contrastive", help="comma-separated subset of the ops")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test of the runner)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                        help="folder for the JSON and markdown results")


def write_results(meta: dict, results: list[Result], out: Path, stem: str) -> Path:
    """Write ``{stem}.json`` (meta and every result) and ``{stem}.md`` (the markdown table) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    rows = [{**asdict(r), "case": asdict(r.case)} for r in results]
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    (out / f"{stem}.md").write_text(f"Measured {meta['date']} on {meta['device']} "
                                    f"(torch {meta['torch']}, triton {meta['triton']}).\n\n"
                                    f"{markdown_table(results)}\n")
    return path


def main_from_args(args: argparse.Namespace) -> Path:
    device = torch.device(args.device)
    ops = set(args.ops.split(","))
    unknown = ops - {"ce", "linear", "contrastive"}
    if unknown:
        raise SystemExit(f"--ops: unknown op(s) {sorted(unknown)}; choose from ce, linear, contrastive")
    cases = [c for c in default_cases(device, args.quick) if c.op in ops]
    stem = f"{device.type}-{datetime.date.today().isoformat()}{'-quick' if args.quick else ''}"
    meta, results = run(cases, device, args.repeats, args.warmup, not args.no_memory,
                        progress=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True),
                        after_case=lambda m, r: write_results(m, r, args.out, stem))
    print(markdown_table(results))
    path = write_results(meta, results, args.out, stem)
    print(f"[bench] wrote {path}", file=sys.stderr)
    return path


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child_main(sys.argv[2])
    else:
        parser = argparse.ArgumentParser(prog="tempnet bench", description=__doc__.splitlines()[0])
        add_arguments(parser)
        main_from_args(parser.parse_args())
