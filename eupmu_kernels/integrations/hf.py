"""The Hugging Face ``Trainer`` integration, at its original import path.

It lives in :mod:`eupmu_unlearn.hf`; this module re-exports its public names. Importing it
imports transformers and accelerate (``pip install eupmu-kernels[hf]``); ``import eupmu_kernels``
never does.
"""

from eupmu_unlearn.hf import *  # noqa: F401,F403
from eupmu_unlearn.hf import __all__  # noqa: F401
