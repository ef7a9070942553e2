"""Integrations with training frameworks.

Each submodule imports its framework only when it is itself imported, so importing this package
costs nothing. Available:

- :mod:`eupmu_kernels.integrations.hf`: a Hugging Face ``Trainer`` subclass for forget/retain
  unlearning with the :class:`~eupmu_kernels.EUPMU` optimizer (needs ``transformers`` and
  ``accelerate``: ``pip install eupmu-kernels[hf]``). It is :mod:`eupmu_unlearn.hf`, re-exported
  under this name.
"""
