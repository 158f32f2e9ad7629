"""Sweep the Triton launch parameters on a real GPU and write what each configuration achieved.

``python benchmarks/gpu_tune.py --out DIR`` times, with ``triton.testing.do_bench`` (median ms):

- the fused cross-entropy row kernel (pass 1 and pass 2, DRO, per-row τ, both gradients) at
  ``N × V`` bfloat16 logits over ``BLOCK_V × num_warps``, as GB/s of its 2 reads + 1 write;
- the contrastive side (forward + backward of one side, DRO, per-anchor τ) at ``B × D`` bfloat16
  features over the forward kernel's tile sizes and the backward's rows per chunk, as TFLOP/s of
  its 4 ``B×B×D`` products (1 forward, 3 backward).

It writes ``gpu_tune.json`` (every configuration, the device, versions and shapes) and prints the
best of each. The defaults in ``kernels/`` are chosen from its output; it needs CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from tempnet._options import CEOptions
from tempnet.kernels._ce_row import launch_ce_rows
from tempnet.kernels.contrastive import Tiles, contrastive_side

CE_CONFIGS = [(2048, 4), (2048, 8), (4096, 4), (4096, 8), (4096, 16), (8192, 8), (8192, 16), (16384, 16),
              (16384, 32)]
TILE_CONFIGS = [Tiles(64, 64, 64, 4), Tiles(64, 64, 64, 8), Tiles(128, 64, 64, 8), Tiles(64, 128, 64, 8),
                Tiles(128, 128, 64, 8), Tiles(128, 64, 128, 8), Tiles(128, 128, 32, 8), Tiles(64, 64, 128, 8)]


def sweep_cross_entropy(n_rows: int, vocab: int) -> list[dict]:
    logits = torch.randn(n_rows, vocab, device="cuda", dtype=torch.bfloat16) * 2
    target = torch.randint(0, vocab, (n_rows,), device="cuda")
    tau = 1 + torch.rand(n_rows, device="cuda")
    grad = torch.empty_like(logits)
    rows, lse, dtau = (torch.empty(n_rows, device="cuda") for _ in range(3))
    opts = CEOptions(rho=2.0)
    moved = 3 * logits.numel() * logits.element_size()
    results = []
    for block_v, num_warps in CE_CONFIGS:
        def kernel(block_v=block_v, num_warps=num_warps):
            launch_ce_rows(logits, target, tau, opts, weight_sum=None, rows=rows, lse=lse, dtau=dtau, grad=grad,
                           block_v=block_v, num_warps=num_warps)
        try:
            ms = do_bench(kernel, warmup=25, rep=100)
            results.append({"block_v": block_v, "num_warps": num_warps, "ms": ms, "GBps": moved / ms / 1e6})
        except Exception as error:  # a configuration the compiler rejects (registers, shared memory)
            results.append({"block_v": block_v, "num_warps": num_warps, "error": f"{type(error).__name__}: {error}"})
        print("ce", results[-1], flush=True)
    return results


def _contrastive_step(batch: int, dim: int):
    anchors = F.normalize(torch.randn(batch, dim, device="cuda"), dim=-1).bfloat16().requires_grad_()
    candidates = F.normalize(torch.randn(batch, dim, device="cuda"), dim=-1).bfloat16().requires_grad_()
    tau = (0.05 + 0.05 * torch.rand(batch, device="cuda")).requires_grad_()
    weights = torch.full((batch,), 1.0 / batch, device="cuda")

    def step(tiles: Tiles | None = None, chunk_rows: int | None = None) -> None:
        out = contrastive_side(anchors, candidates, tau, offset=0, rho=6.0, tiles=tiles, chunk_rows=chunk_rows)
        torch.autograd.grad(out, (anchors, candidates, tau), weights)

    return step


def sweep_contrastive(batch: int, dim: int) -> list[dict]:
    step = _contrastive_step(batch, dim)
    flops = 4 * 2 * batch * batch * dim
    results = []
    for tiles in TILE_CONFIGS:
        entry = {"tiles": [tiles.block_m, tiles.block_n, tiles.block_d, tiles.num_warps]}
        try:
            ms = do_bench(lambda tiles=tiles: step(tiles=tiles), warmup=5, rep=50)
            entry.update(ms=ms, TFLOPs=flops / ms / 1e9)
        except Exception as error:
            entry["error"] = f"{type(error).__name__}: {error}"
        results.append(entry)
        print("contrastive", entry, flush=True)
    return results


def sweep_contrastive_chunks(batch: int, dim: int) -> list[dict]:
    """Rows per backward chunk (default tiles): fewer, larger GEMMs against a larger buffer."""
    step = _contrastive_step(batch, dim)
    flops = 4 * 2 * batch * batch * dim
    results = []
    for chunk_rows in (512, 1024, 2048, 4096, 8192):
        ms = do_bench(lambda chunk_rows=chunk_rows: step(chunk_rows=chunk_rows), warmup=5, rep=50)
        results.append({"chunk_rows": chunk_rows, "buffer_MiB": chunk_rows * batch * 4 / 2**20, "ms": ms,
                        "TFLOPs": flops / ms / 1e9})
        print("contrastive chunk", results[-1], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--ce-shape", type=int, nargs=2, default=[16384, 128256], metavar=("N", "V"))
    parser.add_argument("--contrastive-shape", type=int, nargs=2, default=[16384, 768], metavar=("B", "D"))
    args = parser.parse_args()
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "ce_shape": {"N": args.ce_shape[0], "V": args.ce_shape[1], "dtype": "bfloat16", "mode": "dro, both grads"},
        "contrastive_shape": {"B": args.contrastive_shape[0], "D": args.contrastive_shape[1], "dtype": "bfloat16",
                              "mode": "dro side, forward+backward"},
        "timing": "triton.testing.do_bench median",
    }
    report["cross_entropy"] = sweep_cross_entropy(*args.ce_shape)
    report["contrastive"] = sweep_contrastive(*args.contrastive_shape)
    report["contrastive_chunks"] = sweep_contrastive_chunks(*args.contrastive_shape)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_tune.json").write_text(json.dumps(report, indent=2))
    for key, metric in (("cross_entropy", "GBps"), ("contrastive", "TFLOPs")):
        ok = [r for r in report[key] if metric in r]
        if ok:
            print(f"best {key}:", max(ok, key=lambda r: r[metric]))


if __name__ == "__main__":
    main()
