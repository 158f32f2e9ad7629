"""SPEC §5: every bad input raises the right error type, naming the argument, on every backend."""

import pytest
import torch

import tempnet
from tempnet.dispatch import BackendUnavailableError, choose_backend

BACKENDS = ["torch", "cpp", "triton"]


def _ce(backend, logits=None, target=None, tau=0.5, **kwargs):
    logits = torch.randn(3, 5) if logits is None else logits
    target = torch.tensor([0, 4, -100]) if target is None else target
    return tempnet.tempered_cross_entropy(logits, target, tau, backend=backend, **kwargs)


CE_CASES = [
    (ValueError, "target", dict(target=torch.tensor([0, 1]))),
    (ValueError, "target", dict(target=torch.tensor([0, 5, 1]))),
    (ValueError, "target", dict(target=torch.tensor([0, -1, 1]))),
    (TypeError, "target", dict(target=torch.tensor([0.0, 1.0, 2.0]))),
    (TypeError, "logits", dict(logits=torch.randint(0, 3, (3, 5)))),
    (ValueError, "tau", dict(tau=0.0)),
    (ValueError, "tau", dict(tau=-1.0)),
    (ValueError, "tau", dict(tau=float("inf"))),
    (ValueError, "tau", dict(tau=torch.tensor([1.0, 0.0, 1.0]))),
    (ValueError, "tau", dict(tau=torch.tensor([1.0, float("nan"), 1.0]))),
    (ValueError, "tau", dict(tau=torch.ones(4))),
    (TypeError, "tau", dict(tau=torch.ones(3, dtype=torch.int64))),
    (ValueError, "rho", dict(rho=float("nan"))),
    (ValueError, "rho", dict(rho=float("inf"))),
    (ValueError, "reduction", dict(reduction="avg")),
    (ValueError, "label_smoothing", dict(label_smoothing=1.0)),
    (ValueError, "softcap", dict(softcap=0.0)),
    (ValueError, "z_loss", dict(z_loss=-1.0)),
    (ValueError, "weight", dict(weight=torch.ones(4))),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("error", "argument", "kwargs"), CE_CASES)
def test_cross_entropy_bad_inputs(backend, error, argument, kwargs):
    with pytest.raises(error, match=argument):
        _ce(backend, **kwargs)


LINEAR_CASES = [
    (ValueError, "hidden", dict(hidden=torch.randn(3, 5))),
    (ValueError, "weight", dict(weight=torch.randn(6, 4, 1))),
    (ValueError, "bias", dict(bias=torch.randn(5))),
    (TypeError, "hidden", dict(hidden=torch.randn(3, 4, dtype=torch.float64))),
    (ValueError, "target", dict(target=torch.tensor([0, 6, 1]))),
    (ValueError, "class_weight", dict(class_weight=torch.ones(5))),
    (ValueError, "tau", dict(tau=torch.tensor([1.0, -2.0, 1.0]))),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("error", "argument", "kwargs"), LINEAR_CASES)
def test_linear_cross_entropy_bad_inputs(backend, error, argument, kwargs):
    args = dict(hidden=torch.randn(3, 4), weight=torch.randn(6, 4), target=torch.tensor([0, 5, -100]), tau=0.7)
    args.update(kwargs)
    with pytest.raises(error, match=argument):
        tempnet.tempered_linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("target"),
                                              args.pop("tau"), backend=backend, **args)


CONTRASTIVE_CASES = [
    (ValueError, "text_features", dict(text=torch.randn(4, 3))),
    (ValueError, "image_features", dict(image=torch.randn(5))),
    (TypeError, "image_features", dict(image=torch.ones(5, 3, dtype=torch.int32))),
    (ValueError, "tau_image", dict(tau_image=torch.ones(4))),
    (ValueError, "tau_text", dict(tau_text=0.0)),
    (ValueError, "tau_text", dict(tau_text=torch.tensor([1.0, 1.0, float("inf"), 1.0, 1.0]))),
    (ValueError, "rho", dict(rho=float("nan"))),
    (ValueError, "B=1", dict(image=torch.randn(1, 3), text=torch.randn(1, 3), rho=1.0)),
    (ValueError, "reduction", dict(reduction="max")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("error", "argument", "kwargs"), CONTRASTIVE_CASES)
def test_contrastive_bad_inputs(backend, error, argument, kwargs):
    args = dict(image=torch.randn(5, 3), text=torch.randn(5, 3), tau_image=0.1, tau_text=0.1)
    args.update(kwargs)
    with pytest.raises(error, match=argument):
        tempnet.tempered_contrastive_loss(args.pop("image"), args.pop("text"), args.pop("tau_image"),
                                          args.pop("tau_text"), backend=backend, **args)


def test_mixed_devices_are_rejected():
    logits = torch.randn(2, 3, device="meta")
    with pytest.raises(ValueError, match="target"):
        tempnet.tempered_cross_entropy(logits, torch.tensor([0, 1]), 1.0, backend="torch")


def test_value_checks_can_be_switched_off():
    with tempnet.value_checks(False):
        loss = _ce("torch", tau=torch.tensor([1.0, -1.0, 1.0]))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="tau"):
        _ce("torch", tau=torch.tensor([1.0, -1.0, 1.0]))


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        _ce("cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        choose_backend("triton", torch.device("cpu"))


def test_cpp_refuses_cuda_tensors():
    with pytest.raises(BackendUnavailableError, match="CPU tensors"):
        choose_backend("cpp", torch.device("cuda"))


def test_auto_prefers_cpp_on_cpu_and_triton_on_cuda():
    choice = choose_backend("auto", torch.device("cpu"))
    assert choice.name == "cpp", choice.reason
    assert "CPU" in choice.reason
    assert choose_backend("torch", torch.device("cpu")).module is tempnet.reference


def test_auto_falls_back_to_reference_when_cpp_is_disabled(monkeypatch):
    monkeypatch.setenv("TEMPNET_DISABLE_CPP", "1")
    choice = choose_backend("auto", torch.device("cpu"))
    assert choice.name == "torch" and "TEMPNET_DISABLE_CPP" in choice.reason
