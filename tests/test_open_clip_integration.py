"""open_clip integration: TempNetClipLoss against open_clip's ClipLoss, one training step, the CLIP demo.

Small shapes and the ``"torch"`` backend keep this file fast; the fused backends have their own
tests against the reference.
"""

import argparse
import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss

import tempnet
from tempnet.clip_demo import add_arguments, build_model, make_data, run_clip_demo
from tempnet.integrations.open_clip import TempNetClipLoss

BATCH, DIM = 8, 16


def _features(seed: int = 0, batch: int = BATCH, dim: int = DIM) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim), dim=-1)
    text = F.normalize(image + 0.5 * torch.randn(batch, dim), dim=-1)
    return image, text


@pytest.fixture(scope="module")
def data():
    return make_data(n_train=32, seed=0)


def test_training_step_updates_model_and_heads(data):
    train, _ = data
    torch.manual_seed(0)
    model = build_model()
    model.logit_scale.requires_grad_(False)
    loss_fn = TempNetClipLoss(model.text_projection.shape[1], rho=1.0, n_prototypes=8, backend="torch")
    optimizer = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.requires_grad]},
                                   {"params": loss_fn.parameters(), "lr": 3e-5}], lr=1e-3)
    model_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    heads_before = {n: p.detach().clone() for n, p in loss_fn.named_parameters()}

    out = model(train.images[:BATCH], train.tokens[:BATCH])
    loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
    assert loss.dim() == 0 and torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    for name in ("visual.conv1.weight", "token_embedding.weight", "text_projection", "visual.proj"):
        assert not torch.equal(model_before[name], dict(model.named_parameters())[name]), name
    assert torch.equal(model_before["logit_scale"], model.logit_scale)
    changed = [n for n, p in loss_fn.named_parameters() if not torch.equal(heads_before[n], p)]
    for name in ("image_tempnet.proj.weight", "image_tempnet.prototypes", "text_tempnet.proj.weight",
                 "text_tempnet.output.bias"):
        assert name in changed


def test_prototypes_start_from_the_other_modality_and_survive_state_dict():
    image, text = _features()
    loss_fn = TempNetClipLoss(DIM, rho=1.0, n_prototypes=4, backend="torch")
    loss_fn(image, text, None)
    torch.testing.assert_close(loss_fn.image_tempnet.prototypes.detach(), text[:4])
    torch.testing.assert_close(loss_fn.text_tempnet.prototypes.detach(), image[:4])

    restored = TempNetClipLoss(DIM, rho=1.0, n_prototypes=4, backend="torch")
    restored.load_state_dict(loss_fn.state_dict())
    other_image, other_text = _features(seed=1)
    restored(other_image, other_text, None)  # must not re-initialise from this batch
    torch.testing.assert_close(restored.image_tempnet.prototypes.detach(), text[:4])


def test_output_format_matches_clip_loss():
    image, text = _features()
    scale = torch.tensor(1 / 0.07)
    for loss_fn in (TempNetClipLoss(DIM, rho=1.0, backend="torch"),
                    TempNetClipLoss(temperature="logit_scale", rho=None, backend="torch")):
        plain = loss_fn(image, text, scale)
        as_dict = loss_fn(image, text, scale, output_dict=True)
        reference = ClipLoss()(image, text, scale, output_dict=True)
        assert set(as_dict) == set(reference) == {"contrastive_loss"}
        assert plain.shape == as_dict["contrastive_loss"].shape == reference["contrastive_loss"].shape == ()
        torch.testing.assert_close(plain, as_dict["contrastive_loss"])


@pytest.mark.parametrize("with_bias", [False, True])
def test_fixed_temperature_equals_clip_loss(data, with_bias):
    train, _ = data
    torch.manual_seed(0)
    model = build_model()
    out = model(train.images[:BATCH], train.tokens[:BATCH])
    bias = torch.tensor(-3.0) if with_bias else None
    ours = TempNetClipLoss(temperature="logit_scale", rho=None, backend="torch")(
        out["image_features"], out["text_features"], out["logit_scale"], bias)
    grads = torch.autograd.grad(ours, [model.logit_scale, model.visual.proj, model.text_projection])
    out = model(train.images[:BATCH], train.tokens[:BATCH])
    theirs = ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"], bias)
    expected = torch.autograd.grad(theirs, [model.logit_scale, model.visual.proj, model.text_projection])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_tempnet_mode_uses_heads_and_dro_loss():
    image, text = _features()
    loss_fn = TempNetClipLoss(DIM, rho=1.0, n_prototypes=4, backend="torch")
    loss = loss_fn(image, text, torch.tensor(100.0))
    tau_image, tau_text = loss_fn.temperatures(image, text)
    assert ((tau_image > 0.005) & (tau_image < 0.05)).all() and ((tau_text > 0.005) & (tau_text < 0.05)).all()
    expected = tempnet.tempered_contrastive_loss(image, text, tau_image, tau_text, rho=1.0, backend="torch")
    torch.testing.assert_close(loss, expected)


def test_global_estimator_with_gamma_one_equals_minibatch():
    image, text = _features()
    minibatch = TempNetClipLoss(DIM, rho=1.0, n_prototypes=4, backend="torch")
    global_loss = TempNetClipLoss(DIM, rho=1.0, n_prototypes=4, estimator="global", gamma=1.0, dataset_size=20,
                                  backend="torch")
    global_loss.load_state_dict(minibatch.state_dict(), strict=False)
    indices = torch.arange(3, 3 + BATCH)
    expected = minibatch(image, text, None)
    got = global_loss(image, text, None, indices=indices)
    torch.testing.assert_close(got, expected)
    heads_grad = torch.autograd.grad(got, global_loss.image_tempnet.proj.weight)[0]
    expected_grad = torch.autograd.grad(expected, minibatch.image_tempnet.proj.weight)[0]
    torch.testing.assert_close(heads_grad, expected_grad, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="indices"):
        global_loss(image, text, None)


def test_bad_configurations_raise():
    with pytest.raises(ValueError, match="horovod"):
        TempNetClipLoss(DIM, use_horovod=True)
    with pytest.raises(ValueError, match="gather_with_grad"):
        TempNetClipLoss(DIM, local_loss=True, gather_with_grad=False, world_size=2)
    with pytest.raises(ValueError, match="embed_dim"):
        TempNetClipLoss()
    with pytest.raises(ValueError, match="rho"):
        TempNetClipLoss(DIM, estimator="global", rho=None)
    with pytest.raises(ValueError, match="logit_scale"):
        TempNetClipLoss(temperature="logit_scale", rho=None)(*_features(), None)


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Each rank: TempNetClipLoss vs open_clip's ClipLoss on its half of a batch, for every open_clip
    gather setting we support, plus the TempNet heads' prototype init and gradient averaging."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    image_all, text_all = _features(batch=2 * BATCH)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    scale = torch.tensor(1 / 0.07)
    results = {}
    for local_loss, with_grad in ((True, True), (False, False), (False, True)):
        options = {"local_loss": local_loss, "gather_with_grad": with_grad, "rank": rank, "world_size": world}
        for name, loss_fn in (("ours", TempNetClipLoss(temperature="logit_scale", rho=None, backend="torch",
                                                        **options)),
                              ("theirs", ClipLoss(**options))):
            image = image_all[rows].clone().requires_grad_()
            text = text_all[rows].clone().requires_grad_()
            loss = loss_fn(image, text, scale)
            loss.backward()
            results[f"{name}-{local_loss}-{with_grad}"] = (loss.detach(), image.grad, text.grad)
    heads = TempNetClipLoss(DIM, rho=1.0, n_prototypes=2 * BATCH, local_loss=True, gather_with_grad=True, rank=rank,
                            world_size=world, backend="torch")
    heads(image_all[rows], text_all[rows], None).backward()
    heads.average_head_gradients_()
    results["prototypes"] = heads.image_tempnet.prototypes.detach().clone()
    results["head_grad"] = heads.image_tempnet.proj.weight.grad.clone()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_distributed_matches_clip_loss(tmp_path):
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for results in ranks:
        for key in [k for k in results if k.startswith("ours-")]:
            for got, want in zip(results[key], results[key.replace("ours", "theirs")], strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=key)
    _, text_all = _features(batch=2 * BATCH)
    for results in ranks:
        torch.testing.assert_close(results["prototypes"], text_all)  # from the gathered batch, on every rank
    torch.testing.assert_close(ranks[0]["head_grad"], ranks[1]["head_grad"])


def test_run_clip_demo_writes_report(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--steps", "2", "--n-train", "64", "--batch-size", "16", "--prototypes", "16",
                              "--rho", "1.0", "--backend", "torch", "--out", str(tmp_path / "out"), "--seed", "3"])
    report = run_clip_demo(args)
    saved = json.loads((tmp_path / "out" / "clip_demo.json").read_text())
    assert (tmp_path / "out" / "clip_demo.png").stat().st_size > 0
    assert saved["results"].keys() == report["results"].keys() == {"baseline", "tempnet"}
    for method in ("baseline", "tempnet"):
        metrics = saved["results"][method]["metrics"]
        assert set(metrics) == {"i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"}
        assert all(0.0 <= value <= 1.0 for value in metrics.values())
        assert saved["results"][method]["tau_image"]["median"] > 0.0
    assert math.isclose(saved["results"]["baseline"]["tau_text"]["std"], 0.0, abs_tol=1e-7)


def test_run_clip_demo_rejects_rho_above_log_batch(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ValueError, match="rho"):
        run_clip_demo(parser.parse_args(["--batch-size", "8", "--rho", "3.0", "--out", str(tmp_path)]))
