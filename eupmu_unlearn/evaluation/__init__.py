"""End-to-end unlearning evaluation: offline data, small models, methods, metrics, sweeps, plots.

Submodules are imported on demand (``from eupmu_kernels.evaluation import metrics``): scikit-learn,
mnist1d and matplotlib load only where they are used, so importing this package stays cheap.

- :mod:`.data`: scikit-learn digits and MNIST-1D (generated locally), splits, forgetting scenarios.
- :mod:`.models`: a small MLP and a small CNN, training of the original and retrained models, caching.
- :mod:`.methods`: EUPMU and the baselines (UNGrad, PCGrad, GradDiff, FAMO, GA, RL, FT).
- :mod:`.metrics`: UA, RA, TA, MIA-efficacy, average gap, aggregation over seeds.
- :mod:`.memory`: peak tensor memory of a few unlearning steps.
- :mod:`.runner`: one benchmark run (seeds x methods) and its JSON record.
- :mod:`.selection`: the stored hyperparameter selection (``results/hparams.json``).
- :mod:`.sweep`: the validation-split hyperparameter sweep that writes it.
- :mod:`.tables`, :mod:`.plots`: the metrics table and the forget/retain trade-off figure.
- :mod:`.progress`, :mod:`.threads`: the command line's progress bar and CPU thread setting.
"""

SUBMODULES = ("data", "models", "methods", "metrics", "memory", "runner", "selection", "sweep", "tables", "plots",
              "progress", "threads")

__all__ = list(SUBMODULES)
