"""``tempnet train-clip``: a tiny open_clip model trained with a fixed-τ CLIP loss and with TempNet + DRO.

Everything is made here, nothing is downloaded: a procedurally drawn image–caption set
("a small red circle on the left"; colour, shape, size and position vary, with jitter and noise),
a small :class:`open_clip.model.CLIP` built from a config (vision and text transformers, open_clip's
bundled BPE tokenizer), and two training runs with the same seed, data order, model init, steps
and optimizer:

- ``baseline``: open_clip's ``ClipLoss`` with the model's learnable ``logit_scale`` (one τ);
- ``tempnet``: :class:`tempnet.integrations.open_clip.TempNetClipLoss`, per-sample τ from two
  TempNet heads and the minibatch DRO loss of SPEC §2 (``logit_scale`` frozen).

The validation split holds every attribute combination once (so each caption is unique and
retrieval is well defined), rendered with a seed the training set never uses. The job reports
image→text and text→image recall@1/@5 on it for both runs, the distribution of the predicted τ,
and writes ``clip_demo.json`` and ``clip_demo.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip.loss import ClipLoss
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import SimpleTokenizer
from torch import nn
from tqdm.auto import tqdm

from tempnet.dispatch import BACKENDS
from tempnet.integrations.open_clip import TempNetClipLoss

COLORS = {
    "red": (0.90, 0.12, 0.12), "green": (0.15, 0.75, 0.20), "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.15), "purple": (0.60, 0.20, 0.80), "orange": (0.98, 0.55, 0.10),
    "cyan": (0.15, 0.85, 0.90), "white": (0.95, 0.95, 0.95),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 3.5, "large": 6.5}
POSITIONS = {"left": (-8.0, 0.0), "right": (8.0, 0.0), "top": (0.0, -8.0), "bottom": (0.0, 8.0),
             "center": (0.0, 0.0)}
IMAGE_SIZE = 32
CONTEXT_LENGTH = 12
METHODS = ("baseline", "tempnet")


@dataclass
class Split:
    """An image–caption split: ``images (N, 3, 32, 32)`` float32 in ``[-0.5, 0.5]``,
    ``tokens (N, CONTEXT_LENGTH)`` int64, ``captions`` the N strings."""

    images: torch.Tensor
    tokens: torch.Tensor
    captions: list[str]


def caption(color: int, shape: int, size: int, position: int) -> str:
    """The caption of one attribute combination (indices into the attribute tables)."""
    place = list(POSITIONS)[position]
    where = "in the center" if place == "center" else f"on the {place}"
    return f"a {list(SIZES)[size]} {list(COLORS)[color]} {SHAPES[shape]} {where}"


def render(attributes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw one shape per row of ``attributes (N, 4)`` int64 (colour, shape, size, position).

    Returns ``(N, 3, 32, 32)`` float32 in ``[-0.5, 0.5]``: a noisy dark background and the shape
    with jittered centre, radius and colour.
    """
    n = attributes.shape[0]
    color, shape, size, position = attributes.unbind(1)
    palette = torch.tensor(list(COLORS.values()))
    radii = torch.tensor(list(SIZES.values()))[size] * (1 + 0.15 * (torch.rand(n, generator=generator) - 0.5))
    offsets = torch.tensor(list(POSITIONS.values()))[position] + 3 * (torch.rand(n, 2, generator=generator) - 0.5)
    centre = (IMAGE_SIZE - 1) / 2 + offsets
    grid = torch.arange(IMAGE_SIZE, dtype=torch.float32)
    dx = grid[None, None, :] - centre[:, 0, None, None]
    dy = grid[None, :, None] - centre[:, 1, None, None]
    r = radii[:, None, None]
    masks = torch.stack([
        dx**2 + dy**2 <= r**2,
        torch.maximum(dx.abs(), dy.abs()) <= 0.85 * r,
        (dy >= -r) & (dy <= r) & (dx.abs() <= 0.5 * (dy + r)),
        dx.abs() + dy.abs() <= 1.15 * r,
    ], dim=1)
    mask = masks[torch.arange(n), shape].float()[:, None]
    rgb = (palette[color] + 0.08 * torch.randn(n, 3, generator=generator)).clamp(0, 1)[:, :, None, None]
    background = 0.15 + 0.05 * torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return (mask * rgb + (1 - mask) * background).clamp(0, 1) - 0.5


def all_combinations() -> torch.Tensor:
    """Every attribute combination once, ``(C, 4)`` int64 (C = 8·4·2·5 = 320)."""
    ranges = (range(len(COLORS)), range(len(SHAPES)), range(len(SIZES)), range(len(POSITIONS)))
    return torch.tensor(list(itertools.product(*ranges)))


def compact_vocabulary() -> torch.Tensor:
    """Map from open_clip BPE ids to a compact vocabulary of the ids the captions use.

    Returns a ``(49408,)`` int64 lookup table. The map preserves order, so padding stays 0 and
    end-of-text keeps the largest id, which the text tower's ``argmax`` pooling relies on; the
    token embedding then has ``VOCAB_SIZE`` rows instead of 49408 (a 15× smaller model).
    """
    tokenizer = SimpleTokenizer(context_length=CONTEXT_LENGTH)
    used = tokenizer([caption(*row) for row in all_combinations().tolist()]).unique()
    table = torch.zeros(tokenizer.vocab_size, dtype=torch.int64)
    table[used] = torch.arange(used.numel())
    return table


def make_split(attributes: torch.Tensor, generator: torch.Generator, tokenizer: SimpleTokenizer,
               vocabulary: torch.Tensor) -> Split:
    """Render ``attributes (N, 4)`` and tokenize their captions (compact ids, see :func:`compact_vocabulary`)."""
    captions = [caption(*row) for row in attributes.tolist()]
    tokens = vocabulary[tokenizer(captions, context_length=CONTEXT_LENGTH)]
    return Split(render(attributes, generator), tokens, captions)


def make_data(n_train: int, seed: int) -> tuple[Split, Split]:
    """``(train, validation)``: ``n_train`` random combinations, and every combination once
    rendered from an independent stream."""
    tokenizer = SimpleTokenizer(context_length=CONTEXT_LENGTH)
    vocabulary = compact_vocabulary()
    combos = all_combinations()
    train_gen = torch.Generator().manual_seed(seed)
    val_gen = torch.Generator().manual_seed(seed + 1_000_003)
    train_attributes = combos[torch.randint(len(combos), (n_train,), generator=train_gen)]
    return (make_split(train_attributes, train_gen, tokenizer, vocabulary),
            make_split(combos, val_gen, tokenizer, vocabulary))


def build_model(embed_dim: int = 64) -> CLIP:
    """A small open_clip CLIP: 2-layer ViT (patch 8 on 32×32 images) and 2-layer text transformer."""
    vision = CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=IMAGE_SIZE)
    vocab_size = int(compact_vocabulary().max()) + 1
    text = CLIPTextCfg(context_length=CONTEXT_LENGTH, vocab_size=vocab_size, width=64, heads=2, layers=2)
    return CLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text, output_dict=True)


@torch.no_grad()
def encode(model: CLIP, split: Split, device: torch.device, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised ``(image_features, text_features)``, each ``(N, D)`` float32 on the CPU."""
    model.eval()
    images, texts = [], []
    for start in range(0, split.tokens.shape[0], batch_size):
        images.append(model.encode_image(split.images[start:start + batch_size].to(device), normalize=True).cpu())
        texts.append(model.encode_text(split.tokens[start:start + batch_size].to(device), normalize=True).cpu())
    model.train()
    return torch.cat(images).float(), torch.cat(texts).float()


def recall_at_k(similarity: torch.Tensor, k: int) -> float:
    """Fraction of rows ``i`` of ``similarity (N, N)`` whose column ``i`` is among the top ``k``."""
    top = similarity.topk(k, dim=1).indices
    return (top == torch.arange(similarity.shape[0])[:, None]).any(dim=1).float().mean().item()


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, float]:
    """Image→text and text→image recall@1 and @5 of paired features ``(N, D)``."""
    similarity = image_features @ text_features.T
    return {"i2t_r1": recall_at_k(similarity, 1), "i2t_r5": recall_at_k(similarity, 5),
            "t2i_r1": recall_at_k(similarity.T, 1), "t2i_r5": recall_at_k(similarity.T, 5)}


def _tau_summary(tau: torch.Tensor) -> dict[str, float]:
    quantiles = torch.quantile(tau, torch.tensor([0.05, 0.5, 0.95]))
    return {"mean": tau.mean().item(), "std": tau.std().item(), "min": tau.min().item(),
            "p05": quantiles[0].item(), "median": quantiles[1].item(), "p95": quantiles[2].item(),
            "max": tau.max().item()}


def train_run(method: str, train: Split, val: Split, args: argparse.Namespace) -> dict:
    """Train one model with ``method`` (``"baseline"`` or ``"tempnet"``) and evaluate it.

    Returns the final validation metrics, the recall@1 curve, the temperatures on the validation
    split (``tau_image``/``tau_text`` lists) and the wall time.
    """
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = build_model().to(device)
    groups = [{"params": [p for name, p in model.named_parameters() if name != "logit_scale"]}]
    if method == "baseline":
        loss_fn: nn.Module = ClipLoss()
        groups.append({"params": [model.logit_scale], "weight_decay": 0.0})
    else:
        model.logit_scale.requires_grad_(False)
        loss_fn = TempNetClipLoss(model.text_projection.shape[1], rho=args.rho, n_prototypes=args.prototypes,
                                  backend=args.backend).to(device)
        image_features, text_features = encode(model, Split(train.images[:args.prototypes],
                                                            train.tokens[:args.prototypes], []), device)
        loss_fn.init_prototypes_(image_features.to(device), text_features.to(device))
        groups.append({"params": list(loss_fn.parameters()), "lr": args.tempnet_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.1)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
    order = torch.Generator().manual_seed(args.seed + 7)
    eval_every = max(1, args.steps // 5)
    curve, losses = [], []
    start = time.perf_counter()
    for step in tqdm(range(args.steps), desc=f"train-clip {method}", leave=False):
        batch = torch.randint(len(train.captions), (args.batch_size,), generator=order)
        out = model(train.images[batch].to(device), train.tokens[batch].to(device))
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % eval_every == 0 or step + 1 == args.steps:
            metrics = retrieval_metrics(*encode(model, val, device))
            curve.append({"step": step + 1, "r1_mean": 0.5 * (metrics["i2t_r1"] + metrics["t2i_r1"])})
    seconds = time.perf_counter() - start
    image_features, text_features = encode(model, val, device)
    if method == "baseline":
        tau_value = 1.0 / model.logit_scale.exp().item()
        tau_image = tau_text = torch.full((len(val.captions),), tau_value)
    else:
        with torch.no_grad():
            loss_fn.eval()
            tau_image, tau_text = (t.cpu() for t in loss_fn.temperatures(image_features.to(device),
                                                                         text_features.to(device)))
    return {"metrics": retrieval_metrics(image_features, text_features), "curve": curve,
            "final_train_loss": losses[-1], "tau_image": _tau_summary(tau_image), "tau_text": _tau_summary(tau_text),
            "tau_image_values": tau_image.tolist(), "tau_text_values": tau_text.tolist(), "seconds": seconds}


def _plot(results: dict, path: Path) -> None:
    """Recall bars, validation recall@1 over training, and the predicted τ histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    keys = ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")
    for offset, method in zip((-0.2, 0.2), METHODS, strict=True):
        values = [results[method]["metrics"][k] for k in keys]
        axes[0].bar([i + offset for i in range(len(keys))], values, width=0.4, label=method)
        curve = results[method]["curve"]
        axes[1].plot([c["step"] for c in curve], [c["r1_mean"] for c in curve], marker="o", label=method)
    axes[0].set_xticks(range(len(keys)), keys)
    axes[0].set_ylabel("validation recall")
    axes[0].set_title("retrieval on the validation split")
    axes[0].legend()
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("mean recall@1 (i→t, t→i)")
    axes[1].set_title("validation recall@1 during training")
    axes[1].legend()
    axes[2].hist(results["tempnet"]["tau_image_values"], bins=30, alpha=0.6, label="TempNet τ (images)")
    axes[2].hist(results["tempnet"]["tau_text_values"], bins=30, alpha=0.6, label="TempNet τ (texts)")
    axes[2].axvline(results["baseline"]["tau_image"]["mean"], color="k", linestyle="--",
                    label="baseline τ = 1/logit_scale")
    axes[2].set_xlabel("τ")
    axes[2].set_title("temperatures on the validation split")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``tempnet train-clip`` on ``parser``."""
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of each run (default: 300)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--out", type=Path, default=Path("clip_demo_out"),
                        help="directory for clip_demo.json and clip_demo.png (default: clip_demo_out)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, init and batch order (default: 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per step (default: 64)")
    parser.add_argument("--n-train", type=int, default=4096, help="training pairs rendered (default: 4096)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW lr of the model (default: 1e-3)")
    parser.add_argument("--tempnet-lr", type=float, default=3e-5,
                        help="AdamW lr of the TempNet heads (default: 3e-5, the paper's)")
    parser.add_argument("--rho", type=float, default=2.0,
                        help="DRO radius ρ; keep it below log(batch_size - 1) (default: 2.0)")
    parser.add_argument("--prototypes", type=int, default=256, help="TempNet prototypes M (default: 256)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads during the job; the model is too small to gain from more (default: 1)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="tempnet backend of the contrastive op (default: auto)")


def run_clip_demo(args: argparse.Namespace) -> dict:
    """Run both trainings, print the side-by-side table, write JSON + PNG to ``args.out``.

    Returns the report: settings, per-method metrics, τ summaries, timings and the output paths.
    """
    if args.rho >= math.log(args.batch_size - 1):
        raise ValueError(f"--rho {args.rho} must be below log(batch_size - 1) = {math.log(args.batch_size - 1):.3f}, "
                         f"the largest KL from uniform over the batch's negatives")
    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        train, val = make_data(args.n_train, args.seed)
        results = {method: train_run(method, train, val, args) for method in METHODS}
    finally:
        torch.set_num_threads(previous_threads)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not callable(v)}
    report = {"settings": settings, "n_validation": len(val.captions), "wall_seconds": time.perf_counter() - start,
              "results": {m: {k: v for k, v in r.items() if not k.endswith("_values")} for m, r in results.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / "clip_demo.json", args.out / "clip_demo.png"
    _plot(results, png_path)
    report["files"] = {"json": str(json_path), "png": str(png_path)}
    json_path.write_text(json.dumps(report, indent=2))
    _print_report(report)
    return report


def _print_report(report: dict) -> None:
    results = report["results"]
    print(f"train-clip: {report['settings']['steps']} steps per run, validation = {report['n_validation']} "
          f"unique captions, wall time {report['wall_seconds']:.1f} s")
    print(f"{'metric':<22}{'baseline (ClipLoss)':>22}{'TempNet + DRO':>18}")
    for key, label in (("i2t_r1", "image→text R@1"), ("i2t_r5", "image→text R@5"),
                       ("t2i_r1", "text→image R@1"), ("t2i_r5", "text→image R@5")):
        print(f"{label:<22}{results['baseline']['metrics'][key]:>22.3f}{results['tempnet']['metrics'][key]:>18.3f}")
    for side in ("tau_image", "tau_text"):
        b, t = results["baseline"][side], results["tempnet"][side]
        print(f"{side + ' median':<22}{b['median']:>22.4f}{t['median']:>18.4f}   "
              f"(TempNet p05–p95 {t['p05']:.4f}–{t['p95']:.4f})")
    print(f"{'train seconds':<22}{results['baseline']['seconds']:>22.1f}{results['tempnet']['seconds']:>18.1f}")
    tau = results["tempnet"]["tau_image"]
    spread = (tau["p95"] - tau["p05"]) / tau["median"]
    print(f"TempNet image τ spread (p95 − p05) / median = {spread:.1%}", end="")
    if spread < 0.05:
        print(": the heads mostly set one τ level in a run this short; the two runs differ in that level and "
              "in the loss (InfoNCE vs DRO) more than in per-sample temperatures")
    else:
        print()
    print(f"wrote {report['files']['json']} and {report['files']['png']}")
