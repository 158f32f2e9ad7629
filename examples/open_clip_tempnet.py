"""Plug TempNet into an open_clip training loop: replace ClipLoss, add one optimizer param group.

Runs a few steps of a small open_clip model on random images and captions (CPU, seconds):

    python examples/open_clip_tempnet.py

In a real open_clip training script the changes are the same three: build
``TempNetClipLoss(embed_dim, ...)`` where ``ClipLoss(...)`` was built (same distributed options),
freeze ``model.logit_scale`` (TempNet predicts τ instead), and give ``loss.parameters()`` their
own param group with the TempNet learning rate (paper: 3e-5).
"""

import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import SimpleTokenizer

from tempnet.integrations.open_clip import TempNetClipLoss

MODEL_LR, TEMPNET_LR = 1e-3, 3e-5
BATCH = 16


def main() -> None:
    torch.manual_seed(0)
    model = CLIP(embed_dim=64,
                 vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
                 text_cfg=CLIPTextCfg(context_length=16, width=64, heads=2, layers=2), output_dict=True)
    model.logit_scale.requires_grad_(False)  # TempNet predicts the temperatures

    # Minibatch DRO loss (SPEC §2). rho must stay below log(BATCH - 1); the paper's 7-8 is for large batches.
    # For the moving-average estimator of SPEC §2b: estimator="global", dataset_size=N, gamma=0.8, and
    # pass loss(..., indices=dataset_indices) in the loop.
    loss_fn = TempNetClipLoss(embed_dim=64, rho=1.5, n_prototypes=BATCH)
    optimizer = torch.optim.AdamW([
        {"params": [p for p in model.parameters() if p.requires_grad], "lr": MODEL_LR, "weight_decay": 0.1},
        {"params": loss_fn.parameters(), "lr": TEMPNET_LR, "weight_decay": 0.0},
    ])

    tokenizer = SimpleTokenizer(context_length=16)
    captions = [f"photo number {i} of a {'red' if i % 2 else 'blue'} thing" for i in range(BATCH)]
    texts = tokenizer(captions)
    images = torch.rand(BATCH, 3, 32, 32)
    for step in range(5):
        out = model(images, texts)
        # Same call as open_clip's ClipLoss; logit_scale is ignored in the default temperature="tempnet" mode.
        losses = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], output_dict=True)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        loss_fn.average_head_gradients_()  # a no-op on one process; averages the heads' gradients under DDP
        optimizer.step()
        tau_image, tau_text = loss_fn.temperatures(out["image_features"], out["text_features"])
        print(f"step {step}: loss {total.item():.4f}, mean τ image {tau_image.mean().item():.4f}, "
              f"text {tau_text.mean().item():.4f}")


if __name__ == "__main__":
    main()
