"""Integrations of tempnet with other libraries.

- :mod:`tempnet.integrations.transformers`: TempNet for any Hugging Face causal LM
  (:class:`~tempnet.integrations.transformers.TempNetForCausalLM`), a logits processor that
  applies its temperatures in ``generate``, and a one-line switch of a model's loss to the fused
  tempered cross-entropy (:func:`~tempnet.integrations.transformers.use_tempered_loss`).

Each integration is imported explicitly, so ``import tempnet`` never imports the library it wraps.
"""
