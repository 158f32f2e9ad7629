"""Shared helpers of the hardening tests: run an op on a backend, collect every output and gradient,
and compare them with the float64 reference under the tolerances of SPEC §4.

Each ``run_*`` function takes the inputs of a public op, marks every differentiable tensor input
as requiring grad (on a fresh copy, so the caller's tensors are never touched), runs the op on one
backend, backpropagates an incoming gradient and returns a dict ``name -> tensor`` holding the
outputs (``loss``, ``lse``, ``loss_image``...) and the gradients (``grad_logits``, ``grad_tau``...).
With ``as_float64=True`` every floating input is first converted to float64: that is the
reference of SPEC §4.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import tempnet

BACKENDS = ("torch", "cpp", "triton")

# SPEC §4: (loss, gradients) bounds of ‖out − ref‖ / ‖ref‖ against the float64 reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-2, 2e-2),
}

# Below this norm a reference is "≈ 0": the error is then measured absolutely (``‖out − ref‖``)
# instead of relative to a norm that may be pure rounding noise.
ZERO_NORM = 1e-12


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64, or ``‖out − ref‖`` when ``‖ref‖ < ZERO_NORM``.

    Both tensors must have the same shape; NaN anywhere gives NaN (so every comparison fails).
    """
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}"
    out, ref = out.detach().double(), ref.detach().double()
    diff = (out - ref).norm().item()
    norm = ref.norm().item()
    return diff / norm if norm >= ZERO_NORM else diff


def assert_matches_reference(outputs: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                             dtype: torch.dtype, context: str = "", atol: dict[str, float] | None = None) -> None:
    """Every tensor of ``outputs`` is finite where the reference is and within SPEC §4 of it.

    Names starting with ``grad`` use the gradient tolerance of ``dtype``, all others the loss one.
    ``atol`` adds an absolute allowance to named outputs whose reference is a cancellation that the
    accumulation dtype cannot resolve (the caller says why); the bound is ``tol·‖ref‖ + atol``.
    """
    assert outputs.keys() == reference.keys(), f"{sorted(outputs)} != {sorted(reference)}"
    tol_loss, tol_grad = TOLERANCES[dtype]
    atol = atol or {}
    for name, ref in reference.items():
        out = outputs[name]
        finite = torch.isfinite(ref)
        assert torch.isfinite(out[finite]).all(), f"{context}: {name} is non-finite where the reference is finite"
        tol = tol_grad if name.startswith("grad") else tol_loss
        diff = (out.detach().double() - ref.double()).norm().item()
        norm = ref.double().norm().item()
        bound = tol * (norm if norm >= ZERO_NORM else 1.0) + atol.get(name, 0.0)
        assert diff <= bound, (f"{context}: {name} error ‖out − ref‖ = {diff:.3e} > {bound:.3e} "
                               f"(relative {rel_err(out, ref):.3e}, SPEC §4 {dtype} tolerance {tol:.0e})")


def assert_bitwise_equal(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], context: str = "") -> None:
    """Same names, dtypes, shapes and bits (NaN compares equal to NaN of the same position)."""
    assert first.keys() == second.keys()
    for name in first:
        a, b = first[name], second[name]
        assert a.dtype == b.dtype and a.shape == b.shape, f"{context}: {name} dtype/shape differ"
        same = torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
        assert same, f"{context}: {name} differs between two identical calls"


def _prepare(value: Any, as_float64: bool) -> Any:
    """A detached copy of a tensor input (float64 if asked) that requires grad when the input did."""
    if not isinstance(value, torch.Tensor):
        return value
    copy = value.detach().clone()
    if as_float64 and copy.is_floating_point():
        copy = copy.double()
    return copy.requires_grad_(value.requires_grad)


def _strided_copy(view: torch.Tensor, as_float64: bool) -> torch.Tensor:
    """A copy of ``view`` that keeps its strides (a new storage of the same layout)."""
    dtype = torch.float64 if as_float64 else view.dtype
    base = torch.empty_strided(view.shape, view.stride(), dtype=dtype)
    with torch.no_grad():
        base.copy_(view)
    return base.requires_grad_(view.requires_grad)


def _backward(outputs: list[torch.Tensor], grad_outputs: list[torch.Tensor],
              inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients of ``Σ <outputs, grad_outputs>`` w.r.t. the ``inputs`` that require grad."""
    wanted = {name: tensor for name, tensor in inputs.items() if isinstance(tensor, torch.Tensor)
              and tensor.requires_grad}
    if not wanted:
        return {}
    grads = torch.autograd.grad(outputs, list(wanted.values()),
                                [g.to(o.dtype) for o, g in zip(outputs, grad_outputs, strict=True)])
    return {f"grad_{name}": grad for name, grad in zip(wanted, grads, strict=True)}


def incoming_gradient(output: torch.Tensor, seed: int) -> torch.Tensor:
    """The incoming gradient the ``run_*`` functions use: shaped like ``output``, float64, values in
    ``[0.5, 1.5)``; seed 0 for cross-entropy, 1 for the linear op, 2 and 3 for the contrastive pair."""
    gen = torch.Generator().manual_seed(seed)
    return 0.5 + torch.rand(output.shape, generator=gen, dtype=torch.float64)


def run_cross_entropy(backend: str, logits: torch.Tensor, target: torch.Tensor, tau: float | torch.Tensor, *,
                      as_float64: bool = False, **kwargs: Any) -> dict[str, torch.Tensor]:
    """``tempered_cross_entropy`` on ``backend``; returns ``loss`` (+ ``lse``) and the gradients.

    ``logits`` keeps its strides (a non-contiguous view stays non-contiguous); with
    ``inplace_backward=True`` only the copy is overwritten. The class ``weight`` is converted
    to float64 with the other inputs but gets no gradient.
    """
    z = _strided_copy(logits, as_float64)
    t = _prepare(tau, as_float64)
    if as_float64 and kwargs.get("weight") is not None:
        kwargs = {**kwargs, "weight": kwargs["weight"].double()}
    if as_float64:
        kwargs = {**kwargs, "inplace_backward": False}
    out = tempnet.tempered_cross_entropy(z, target, t, backend=backend, **kwargs)
    loss, lse = out if kwargs.get("return_lse") else (out, None)
    result = {"loss": loss.detach()} if lse is None else {"loss": loss.detach(), "lse": lse.detach()}
    result.update(_backward([loss], [incoming_gradient(loss, 0)], {"logits": z, "tau": t}))
    return result


def run_linear_cross_entropy(backend: str, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                             tau: float | torch.Tensor, *, bias: torch.Tensor | None = None,
                             as_float64: bool = False, **kwargs: Any) -> dict[str, torch.Tensor]:
    """``tempered_linear_cross_entropy`` on ``backend``; ``loss`` (+ ``lse``) and the gradients
    w.r.t. ``hidden``, ``weight``, ``bias`` and ``tau`` (those that require grad)."""
    h, w, b, t = (_prepare(x, as_float64) for x in (hidden, weight, bias, tau))
    if as_float64 and kwargs.get("class_weight") is not None:
        kwargs = {**kwargs, "class_weight": kwargs["class_weight"].double()}
    out = tempnet.tempered_linear_cross_entropy(h, w, target, t, bias=b, backend=backend, **kwargs)
    loss, lse = out if kwargs.get("return_lse") else (out, None)
    result = {"loss": loss.detach()} if lse is None else {"loss": loss.detach(), "lse": lse.detach()}
    result.update(_backward([loss], [incoming_gradient(loss, 1)], {"hidden": h, "weight": w, "bias": b, "tau": t}))
    return result


def run_contrastive(backend: str, image: torch.Tensor, text: torch.Tensor, tau_image: float | torch.Tensor,
                    tau_text: float | torch.Tensor, *, as_float64: bool = False,
                    **kwargs: Any) -> dict[str, torch.Tensor]:
    """``tempered_contrastive_loss`` on ``backend``; ``loss`` (or ``loss_image`` / ``loss_text``
    for ``reduction="none"``) and the gradients w.r.t. features and temperatures."""
    x, y, ti, tt = (_prepare(v, as_float64) for v in (image, text, tau_image, tau_text))
    out = tempnet.tempered_contrastive_loss(x, y, ti, tt, backend=backend, **kwargs)
    if isinstance(out, tuple):
        outputs, names = list(out), ["loss_image", "loss_text"]
    else:
        outputs, names = [out], ["loss"]
    result = {name: o.detach() for name, o in zip(names, outputs, strict=True)}
    incoming = [incoming_gradient(o, 2 + k) for k, o in enumerate(outputs)]
    result.update(_backward(outputs, incoming, {"image": x, "text": y, "tau_image": ti, "tau_text": tt}))
    return result


def check_against_reference(run: Callable[..., dict[str, torch.Tensor]], backend: str, dtype: torch.dtype,
                            *args: Any, context: str = "", atol: dict[str, float] | None = None,
                            **kwargs: Any) -> dict[str, torch.Tensor]:
    """Run ``run`` on ``backend`` and on the float64 reference; assert SPEC §4; return the outputs."""
    reference = run("torch", *args, as_float64=True, **kwargs)
    outputs = run(backend, *args, **kwargs)
    assert_matches_reference(outputs, reference, dtype, context, atol)
    return outputs
