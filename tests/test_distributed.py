"""Distributed contrastive losses: 2 gloo processes on halves of a batch vs one process on all of it.

Both workers run every scenario in one spawn (process start-up dominates) and save their results;
the test compares them with the single-process losses. With ``reduction="mean"`` each rank returns
the mean over its local anchors, so (see :mod:`tempnet.distributed`): the mean of the rank losses
is the full-batch loss, each rank's gradients on its own features and temperatures are
``world_size`` times the full-batch ones, and the DDP-averaged parameter gradients (sum over ranks
divided by ``world_size``) equal the single-process ones.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import tempnet
from tempnet.distributed import distributed_tempered_contrastive_loss, gather_features
from tempnet.global_contrastive import GlobalContrastiveLoss

pytestmark = pytest.mark.xdist_group(name="distributed")  # one spawn per test session

WORLD = 2
BATCH = 6  # global; 3 pairs per rank
DIM_IN, DIM = 5, 8
CONTRASTIVE_SCENARIOS = [("infonce-torch", None, "torch"), ("dro-torch", 0.5, "torch"), ("dro-triton", 0.5, "triton")]
GLOBAL_STEPS = [torch.tensor([3, 7, 1, 0, 9, 4]), torch.tensor([7, 2, 3, 5, 0, 8])]
GLOBAL_RHO, GLOBAL_GAMMA = 0.4, 0.5


def _problem(seed: int):
    """A shared linear layer producing features, its inputs and leaf temperatures (float64)."""
    torch.manual_seed(seed)
    layer = nn.Linear(DIM_IN, DIM, dtype=torch.float64)
    x_image = torch.randn(BATCH, DIM_IN, dtype=torch.float64)
    x_text = torch.randn(BATCH, DIM_IN, dtype=torch.float64)
    tau_image = 0.2 + 0.4 * torch.rand(BATCH, dtype=torch.float64)
    tau_text = 0.2 + 0.4 * torch.rand(BATCH, dtype=torch.float64)
    return layer, x_image, x_text, tau_image, tau_text


def _forward(layer, x_image, x_text, tau_image, tau_text, rows):
    """Features of ``rows`` and leaf temperatures; features keep their gradient."""
    image = F.normalize(layer(x_image[rows]), dim=-1)
    text = F.normalize(layer(x_text[rows]), dim=-1)
    image.retain_grad()
    text.retain_grad()
    tau_i = tau_image[rows].clone().requires_grad_()
    tau_t = tau_text[rows].clone().requires_grad_()
    return image, text, tau_i, tau_t


def _record(loss, layer, image, text, tau_i, tau_t):
    layer.zero_grad()
    loss.backward()
    return {"loss": loss.detach(), "image": image.grad, "text": text.grad, "tau_image": tau_i.grad,
            "tau_text": tau_t.grad, "weight": layer.weight.grad.clone(), "bias": layer.bias.grad.clone()}


def _run_scenarios(rows, contrastive_loss, global_loss_module):
    """Every scenario on the pairs ``rows``; returns a dict of results."""
    results = {}
    for seed, (name, rho, backend) in enumerate(CONTRASTIVE_SCENARIOS):
        layer, *data = _problem(seed)
        inputs = _forward(layer, *data, rows)
        results[name] = _record(contrastive_loss(*inputs, rho=rho, backend=backend), layer, *inputs)
    module = global_loss_module()
    for step, indices in enumerate(GLOBAL_STEPS):
        layer, *data = _problem(10 + step)
        inputs = _forward(layer, *data, rows)
        results[f"global-{step}"] = _record(module(*inputs, indices[rows]), layer, *inputs)
    results["global-state"] = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    return results


def _global_module():
    return GlobalContrastiveLoss(dataset_size=10, gamma=GLOBAL_GAMMA, rho=GLOBAL_RHO, backend="torch").double()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        local = BATCH // WORLD
        rows = slice(rank * local, (rank + 1) * local)
        results = _run_scenarios(rows, distributed_tempered_contrastive_loss, _global_module)
        layer, *data = _problem(0)
        gathered = gather_features(*_forward(layer, *data, rows)[:3], 0.3)
        results["gathered"] = [t.detach() if isinstance(t, torch.Tensor) else t for t in gathered]
        # Unequal local batches are refused on every rank (no hang).
        layer, *data = _problem(0)
        uneven = _forward(layer, *data, slice(0, 3 if rank == 0 else 2))
        try:
            distributed_tempered_contrastive_loss(*uneven, backend="torch")
            results["uneven"] = ""
        except ValueError as error:
            results["uneven"] = str(error)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(str(out_dir / "init"), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.fixture(scope="module")
def single_results():
    def full_loss(*inputs, rho, backend):
        return tempnet.tempered_contrastive_loss(*inputs, rho=rho, backend="torch")

    return _run_scenarios(slice(0, BATCH), full_loss, _global_module)


def _check_against_single(per_rank, single):
    torch.testing.assert_close(sum(r["loss"] for r in per_rank) / WORLD, single["loss"], rtol=1e-12, atol=1e-12)
    for name in ("image", "text", "tau_image", "tau_text"):
        joined = torch.cat([r[name] for r in per_rank]) / WORLD
        torch.testing.assert_close(joined, single[name], rtol=1e-10, atol=1e-12)
    for name in ("weight", "bias"):
        ddp_average = sum(r[name] for r in per_rank) / WORLD
        torch.testing.assert_close(ddp_average, single[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scenario", [name for name, _, _ in CONTRASTIVE_SCENARIOS])
def test_distributed_loss_matches_single_process(rank_results, single_results, scenario):
    _check_against_single([r[scenario] for r in rank_results], single_results[scenario])


@pytest.mark.parametrize("step", range(len(GLOBAL_STEPS)))
def test_distributed_global_loss_matches_single_process(rank_results, single_results, step):
    _check_against_single([r[f"global-{step}"] for r in rank_results], single_results[f"global-{step}"])


def test_distributed_global_state_is_identical_on_every_rank(rank_results, single_results):
    for results in rank_results:
        for name, tensor in single_results["global-state"].items():
            torch.testing.assert_close(results["global-state"][name], tensor, rtol=1e-12, atol=0)


def test_gather_features_concatenates_in_rank_order(rank_results):
    layer, *data = _problem(0)
    full = _forward(layer, *data, slice(0, BATCH))[:3]
    for results in rank_results:
        *tensors, tau_text = results["gathered"]
        for tensor, want in zip(tensors, full, strict=True):
            torch.testing.assert_close(tensor, want.detach(), rtol=0, atol=0)
        assert tau_text == 0.3


def test_unequal_local_batches_are_refused(rank_results):
    for results in rank_results:
        assert "same number of pairs" in results["uneven"]


@pytest.mark.parametrize("rho", [None, 0.5])
def test_without_process_group_it_is_the_local_loss(rho):
    layer, *data = _problem(0)
    inputs = _forward(layer, *data, slice(0, BATCH))
    loss = distributed_tempered_contrastive_loss(*inputs, rho=rho, backend="torch")
    torch.testing.assert_close(loss, tempnet.tempered_contrastive_loss(*inputs, rho=rho, backend="torch"))
