"""``tempnet demo``: a tiny Llama trained with and without TempNet on Python's bundled docs.

Modules, one job each: :mod:`~tempnet.demo.corpus` (text and splits), :mod:`~tempnet.demo.tokenizer`
(byte-level BPE trained on the spot), :mod:`~tempnet.demo.training` (the two training runs and
their evaluation), :mod:`~tempnet.demo.metrics` (quantiles and correlations),
:mod:`~tempnet.demo.report` (JSON, PNG and the printed summary), :mod:`~tempnet.demo.run` (the
``demo`` command), :mod:`~tempnet.demo.generate` (the ``generate`` command) and
:mod:`~tempnet.demo.sweep` (the hyper-parameter sweep behind the defaults, docs/TUNING.md).
"""
