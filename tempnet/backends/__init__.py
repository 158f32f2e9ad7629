"""Backends of the tempnet ops and the protocol they share.

A backend is a module with three functions. The public ops (:mod:`tempnet.functional`) validate
and canonicalise the inputs (:mod:`tempnet._validation`), pick a backend (:mod:`tempnet.dispatch`)
and apply the reduction themselves, so a backend only computes per-row values:

``cross_entropy_rows(logits, target, tau, opts) -> (rows, lse)``
    ``logits (N, V)`` floating with unit column stride and any row stride; ``target (N,)`` int64;
    ``tau (N,)`` floating (a stride-0 view for a scalar temperature); ``opts`` a
    :class:`tempnet._options.CEOptions`. ``rows (N,)``: the loss of each row with class weights,
    smoothing and z-loss folded in, 0 at ignored rows; ``lse (N,)``: ``lse(u)`` of each row (no
    gradient), 0 at ignored rows. Both in float32 (float64 for float64 logits). ``rows`` is
    differentiable w.r.t. ``logits`` and ``tau``; its backward receives a per-row gradient.

``linear_cross_entropy_rows(hidden, weight, bias, target, tau, opts) -> (rows, lse)``
    Same with ``logits = hidden (N, D) @ weight (V, D).T + bias (V,)``; differentiable w.r.t.
    ``hidden``, ``weight``, ``bias`` and ``tau``.

``contrastive_side(anchors, candidates, tau, *, offset, rho) -> losses``
    ``anchors (b, D)`` against ``candidates (B, D)``; the positive of anchor ``i`` is candidate
    ``offset + i``; ``tau (b,)``. Returns the ``(b,)`` per-anchor losses of SPEC §2,
    differentiable w.r.t. ``anchors``, ``candidates`` and ``tau``.

Implementations: :mod:`tempnet.reference` (``"torch"``), :mod:`tempnet.kernels` (``"triton"``),
:mod:`tempnet.backends.cpp` (``"cpp"``).
"""
