"""The unlearning methods, one registry for every application (docs/design.md, Applications).

A method is a way to take an unlearning step (:mod:`eupmu_unlearn.loop`). Its ``family`` picks
the step and ``option`` the variant:

- ``implicit``: one backward pass through ``EUPMU.combine``; option: the dual preset;
- ``explicit``: retain and forget backward passes, the surgery in ``EUPMU.step``; option: the
  surgery rule;
- ``plain``: one loss, one backward pass, the base rule's ``torch.optim`` optimizer; option: the
  objective (``forget``: the forget loss alone, ``retain``: the retain loss alone, ``relabel``:
  the cross-entropy of forget samples with random labels and retain samples, as one batch).

================  ========  =========  ============  =========  ==================================
name              family    option     forget loss   knob       notes
================  ========  =========  ============  =========  ==================================
eupmu-paper       implicit  paper      application   dual_lr    projected dual ascent on w
eupmu-reference   implicit  reference  application   err        the authors' practice: Adam on w
eupmu-length      implicit  reference  application   epochs     the same with err 0.03, length tuned
ungrad            explicit  ungrad     application   tolerance  d = g_f + lambda* g_r
ungrad-update     explicit  ungrad     application   tolerance  <theta_{t+1} - theta_t, g_r> <= lr eps
pcgrad            explicit  pcgrad     application   epochs
graddiff          explicit  graddiff   ga            alpha      d = g_f + alpha g_r
npo-graddiff      explicit  graddiff   npo           alpha
simnpo            explicit  graddiff   simnpo        alpha      SimNPO with the retain NLL term
famo              implicit  famo       application   dual_lr
ga                plain     forget     ga            epochs
npo               plain     forget     npo           epochs
rl                plain     relabel    random-label  epochs     classification only
salun             plain     relabel    random-label  keep       RL on the salient weights only
ft                plain     retain     none          epochs
l1-sparse         plain     retain     none          l1         FT + decaying l1 penalty
================  ========  =========  ============  =========  ==================================

"application" means the application's default forget loss: random-label cross-entropy on
classes, NPO on text (:mod:`eupmu_unlearn.losses`). ``eupmu`` names each application's default
EUPMU configuration: ``eupmu-length`` on the image benchmark (protocol v2's choice there), else
the preset of the ``dual`` the caller passes (the LLM pipeline passes its ``--dual``, by default
the one its validation search chose for the tiny model) or the default dual preset
``eupmu-reference`` (the Hugging Face integration). Spellings of earlier versions are accepted as
aliases (:data:`OLD_SPELLINGS`).

``eupmu-length`` is ``eupmu-reference`` with its err fixed at 0.03 and the run length as its tuned
knob (5, 10 or 20 passes over the retain set): with the other methods' 5 passes the reference
dual often stops before the forget set is fully forgotten. ``ungrad-update`` is UNGrad with
``surgery_space="update"``: the constraint holds for the update the base rule applies (momentum
included), not only for the combined gradient (docs/design.md, Update-space surgery); the
optimizer offers update space for explicit UNGrad only. ``salun``
(SalUn, Fan et al., ICLR 2024) keeps the fraction ``keep`` of the weights with the largest
forget-loss gradient magnitude and runs RL updates on those weights only; ``l1-sparse`` (Jia et
al., NeurIPS 2023) fine-tunes on the retain set with an l1 penalty whose coefficient decays
linearly from ``l1`` to 0 over the run. These four are image-benchmark methods
(``image_only``): the LLM pipeline does not offer them.

The knob grids and the built-in ``default`` values are the image benchmark's tuning budget
(:mod:`eupmu_unlearn.evaluation.sweep`, :mod:`eupmu_unlearn.evaluation.suite`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


FAMILIES = ("implicit", "explicit", "plain")
PLAIN_OBJECTIVES = ("forget", "retain", "relabel")
DEFAULT_DUAL = "reference"
IMAGE_EUPMU = "eupmu-length"  # what ``eupmu`` means on the image benchmark
LR_GRID = (0.0003, 0.001, 0.003, 0.01)


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    family: str
    option: str  # dual preset (implicit), surgery rule (explicit) or objective (plain)
    forget_loss: str | None  # None: the application's default forget loss
    knob: str | None  # "tolerance", "err", "alpha", "dual_lr", "epochs", "keep" (salun) or "l1" (l1-sparse)
    knob_grid: tuple[float, ...]
    default: tuple[float, float]  # (lr, knob) when no stored selection covers a run
    takes_tolerance: bool = False  # accepts a tolerance besides its knob (0 unless overridden)
    surgery_space: str = "gradient"  # explicit UNGrad: "gradient" or "update" (EUPMU's surgery_space)
    image_only: bool = False  # offered by the image benchmark only
    fixed: tuple[tuple[str, Any], ...] = ()  # further EUPMU keyword arguments, the same for every grid point

    @property
    def step_knob(self) -> bool:
        """The knob shapes the step loop (length, mask, penalty), not the optimizer's options."""
        return self.knob in ("epochs", "keep", "l1")

    @property
    def uses_forget_loss(self) -> bool:
        return not (self.family == "plain" and self.option == "retain")

    @property
    def needs_non_negative_tolerance(self) -> bool:
        """Explicit surgery: a negative tolerance would ask the surgery to undo retain progress."""
        return self.knob == "tolerance"

    def forget_loss_or(self, default: str) -> str:
        """The forget loss this method uses in an application whose default is ``default``."""
        return self.forget_loss or default


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("eupmu-paper", "EUPMU (paper dual)", "implicit", "paper", None, "dual_lr", (0.01, 0.1, 1.0),
           (0.001, 1.0), takes_tolerance=True),
    Method("eupmu-reference", "EUPMU (reference dual)", "implicit", "reference", None, "err", (0.01, 0.03, 0.05),
           (0.001, 0.01)),
    Method("eupmu-length", "EUPMU (reference dual, tuned length)", "implicit", "reference", None, "epochs",
           (5, 10, 20), (0.001, 10), image_only=True, fixed=(("tolerance", -0.03),)),
    Method("ungrad", "UNGrad (explicit)", "explicit", "ungrad", None, "tolerance", (0.0, 0.1, 1.0), (0.001, 0.0)),
    Method("ungrad-update", "UNGrad (update space)", "explicit", "ungrad", None, "tolerance", (0.0, 0.1, 1.0),
           (0.001, 0.0), surgery_space="update", image_only=True),
    Method("pcgrad", "PCGrad", "explicit", "pcgrad", None, "epochs", (2, 5, 10), (0.001, 10)),
    Method("graddiff", "GradDiff", "explicit", "graddiff", "ga", "alpha", (1.0, 3.0, 10.0), (0.001, 10.0)),
    Method("npo-graddiff", "NPO + GradDiff", "explicit", "graddiff", "npo", "alpha", (1.0, 3.0, 10.0),
           (0.001, 10.0)),
    Method("simnpo", "SimNPO", "explicit", "graddiff", "simnpo", "alpha", (1.0, 3.0, 10.0), (0.001, 1.0)),
    Method("famo", "FAMO", "implicit", "famo", None, "dual_lr", (0.0025, 0.025, 0.25), (0.01, 0.25)),
    Method("ga", "GA", "plain", "forget", "ga", "epochs", (1, 2, 5), (0.001, 5)),
    Method("npo", "NPO", "plain", "forget", "npo", "epochs", (1, 2, 5), (0.001, 5)),
    Method("rl", "RL", "plain", "relabel", "random-label", "epochs", (2, 5, 10), (0.003, 10)),
    Method("salun", "SalUn", "plain", "relabel", "random-label", "keep", (0.3, 0.5, 0.7), (0.003, 0.5),
           image_only=True),
    Method("ft", "FT", "plain", "retain", None, "epochs", (2, 5, 10), (0.01, 10)),
    Method("l1-sparse", "l1-sparse", "plain", "retain", None, "l1", (0.003, 0.01, 0.03), (0.01, 0.01),
           image_only=True),
)}
EUPMU_PRESETS = tuple(name for name in METHODS if name.startswith("eupmu-"))
BASELINES = tuple(name for name in METHODS if name not in EUPMU_PRESETS)
OLD_SPELLINGS = {"eupmu_implicit": "eupmu", "eupmu_explicit": "ungrad", "npo_graddiff": "npo-graddiff"}


def resolve(name: str, dual: str | None = None, *, image: bool = False) -> Method:
    """The method behind a name or an old spelling. ``eupmu`` is the ``dual`` preset when ``dual``
    is given, else the application's default: :data:`IMAGE_EUPMU` on the image benchmark
    (``image``), the :data:`DEFAULT_DUAL` preset elsewhere."""
    key = OLD_SPELLINGS.get(name, name)
    if key == "eupmu":
        if dual is not None:
            key = f"eupmu-{dual}"
        else:
            key = IMAGE_EUPMU if image else f"eupmu-{DEFAULT_DUAL}"
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(names())}")
    return METHODS[key]


def names(methods: tuple[Method, ...] | None = None) -> tuple[str, ...]:
    """``eupmu`` (the application's default configuration) and the canonical names of ``methods`` (default: all)."""
    chosen = tuple(METHODS.values()) if methods is None else methods
    return ("eupmu", *(m.name for m in chosen))


def available(forget_losses: tuple[str, ...], default_forget_loss: str, image: bool = False) -> tuple[Method, ...]:
    """The methods an application can run with the forget losses it can compute (``image``: the
    image benchmark, which also runs the ``image_only`` methods)."""
    return tuple(m for m in METHODS.values()
                 if (image or not m.image_only)
                 and (not m.uses_forget_loss or m.forget_loss_or(default_forget_loss) in forget_losses))


def describe(methods: tuple[Method, ...], default_forget_loss: str) -> str:
    """One line per method (for ``--help``): name, label, family and option, forget loss, knob."""
    lines = []
    for m in methods:
        loss = m.forget_loss_or(default_forget_loss) if m.uses_forget_loss else "-"
        lines.append(f"  {m.name:16s} {m.label:23s} {m.family} ({m.option}), forget loss {loss}, "
                     f"tuned knob {m.knob}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Hyper:
    """A method's tuned values: learning rate and its one knob (and a tolerance, where it takes one)."""

    lr: float
    knob: float | None = None
    tolerance: float | None = None

    def describe(self, method: Method) -> dict[str, float | None]:
        out = {"lr": self.lr, method.knob or "knob": self.knob}
        if self.tolerance is not None:
            out["tolerance"] = self.tolerance
        return out


def optimizer_options(method: Method, hyper: Hyper) -> dict[str, float]:
    """The ``EUPMU`` keyword arguments that ``hyper`` sets (the learning rate and length are not among them)."""
    options = dict(method.fixed)
    if hyper.tolerance is not None:
        options["tolerance"] = hyper.tolerance
    if hyper.knob is None or method.knob is None or method.step_knob:
        return options
    if method.knob == "err":  # the authors' err demands a retain improvement: tolerance = -err
        return {**options, "tolerance": -hyper.knob}
    return {**options, method.knob: hyper.knob}

