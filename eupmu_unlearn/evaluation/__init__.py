"""The image-classification unlearning benchmark: offline data, small models, metrics, sweeps, plots.

Submodules are imported on demand (``from eupmu_unlearn.evaluation import metrics``): scikit-learn,
mnist1d and matplotlib load only where they are used, so importing this package stays cheap.

- :mod:`.data`: scikit-learn digits and MNIST-1D (generated locally), splits, forgetting scenarios.
- :mod:`.models`: a small MLP and a small CNN, training of the original and retrained models, caching.
- :mod:`.unlearning`: the methods of :mod:`eupmu_unlearn.methods` on class-labelled batches.
- :mod:`.metrics`: UA, RA, TA, MIA-efficacy, average gap, aggregation over seeds.
- :mod:`.runner`: one benchmark run (seeds x methods) and its JSON record.
- :mod:`.selection`: the tuned hyperparameters (package data, or a user's sweep).
- :mod:`.sweep`: the validation-split hyperparameter sweep that writes a selection.
- :mod:`.report`, :mod:`.plots`: the metrics table, the target check and the trade-off figure.
- :mod:`.progress`, :mod:`.threads`: the command line's progress bar and CPU thread setting.
"""

SUBMODULES = ("data", "models", "unlearning", "metrics", "runner", "selection", "sweep", "report", "plots",
              "progress", "threads")

__all__ = list(SUBMODULES)
