"""Hugging Face ``Trainer`` integration: forget/retain unlearning driven by the EUPMU optimizer.

Data. Every training item pairs one forget example with one retain example::

    {"forget": {"input_ids": [...], "attention_mask": [...], "labels": [...]},
     "retain": {"input_ids": [...]}}

(``attention_mask`` and ``labels`` are optional: labels default to the input ids, with padding
ignored.) :class:`ForgetRetainDataset` builds such items from two datasets: it is as long as the
forget set, and pairs the forget examples of each epoch with the next stretch of a stream of
seeded shuffled passes over the retain set. Any other map-style dataset yielding such dicts works
too. :class:`ForgetRetainCollator` right-pads each side into ``forget_input_ids``,
``forget_attention_mask``, ``forget_labels`` and the same three ``retain_*`` tensors; it pads plain
(unpaired) examples as an ordinary causal-LM batch, so an evaluation set of plain examples goes
through the Trainer's usual evaluation loop.

Training. :class:`EUPMUTrainer` computes the forget loss L_f (gradient ascent, NPO against a
frozen reference model, or any callable) and the retain loss L_r (next-token cross-entropy) on
every micro-batch and drives the optimizer in one of its two modes:

- implicit: ``J = opt.combine(L_f, L_r)``, one backward pass of J; the multiplier w is updated
  after the step from the lagged retain loss (free) or from a no-grad re-evaluation of the step's
  retain micro-batches at the new parameters (``dual_update="exact"``, one extra forward each).
- explicit: the retain backward pass runs inside ``with opt.retain_grad():`` (the gradient lands
  in the optimizer's retain buffer), then the forget backward pass fills ``.grad``. Micro-batches
  of gradient accumulation interleave freely, and the surgery in ``step()`` sees the gradients of
  the whole accumulated batch.

Both losses are divided by the number of accumulated micro-batches, exactly as the Trainer does
for its own loss. The backward passes are the step loop's own blocks
(:func:`eupmu_unlearn.loop.explicit_backward`, :func:`~eupmu_unlearn.loop.implicit_backward`);
the losses come from the one vocabulary (:mod:`eupmu_unlearn.losses`), and
``EUPMUConfig.for_method("ungrad")`` (or any implicit or explicit method of
:mod:`eupmu_unlearn.methods`) sets the mode and variant by the method's name.

Logging. At logging steps only, the Trainer's log (``self.log``) gains ``forget_loss`` and
``retain_loss`` (means over the micro-batches since the last log), ``eupmu_w`` (implicit mode),
``eupmu_lambda`` and ``eupmu_cos`` (explicit mode: lambda* and cos(g_f, g_r) of the last step;
implicit mode never forms g_f and g_r separately), ``eupmu_clip`` (the clip factor of the last
step, when clipping is on) and ``eupmu_skipped_steps``. These device values are read to the host in
one transfer per log; nothing else in the training step reads a device value. (The Trainer itself
checks each micro-batch loss for NaN on the host unless ``logging_nan_inf_filter=False``.) The
Trainer's ``loss`` is J in implicit mode and L_f in explicit mode.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from eupmu_kernels import EUPMU
from eupmu_kernels.dual import preset as dual_preset

from . import methods
from .llm.tokens import BATCH_FIELDS, TEXT_FORGET_LOSSES, causal_lm_loss, pad_examples, sequence_log_prob, \
    text_forget_loss
from .loop import Losses, explicit_backward, implicit_backward

__all__ = [
    "EUPMUConfig",
    "EUPMUTrainer",
    "ForgetRetainCollator",
    "ForgetRetainDataset",
    "LossFn",
    "NPOLoss",
    "causal_lm_loss",
    "frozen_copy",
    "gradient_ascent_loss",
    "sequence_log_prob",
    "split_batch",
    "unwrap_eupmu",
]

LossFn = Callable[[nn.Module, Mapping[str, Tensor]], Tensor]
"""A loss on one side of a batch: ``fn(model, {"input_ids", "attention_mask", "labels"}) -> scalar``."""

PARTS = ("forget", "retain")
DUAL_UPDATES = ("lagged", "exact")


# ---------------------------------------------------------------------------------- configuration


def _eupmu_default(name: str) -> Any:
    """:class:`~eupmu_kernels.EUPMU`'s own default for its keyword ``name``.

    :class:`EUPMUConfig` reads its defaults of the optimizer's options from the optimizer's
    signature, so the Trainer and the optimizer used directly cannot disagree on them.
    """
    parameter = inspect.signature(EUPMU.__init__).parameters[name]
    if parameter.default is inspect.Parameter.empty:
        raise TypeError(f"EUPMU.__init__ has no default for {name!r}")
    return parameter.default


@dataclass
class EUPMUConfig:
    """EUPMU options for :class:`EUPMUTrainer`.

    The learning rate, Adam betas and epsilon and the weight decay come from the
    ``TrainingArguments``; everything about unlearning comes from here. The options shared with
    :class:`~eupmu_kernels.EUPMU` have its defaults (``dual="reference"``, ...).

    Args:
        mode: ``"implicit"`` (one backward pass) or ``"explicit"`` (gradient surgery, two).
        forget_loss: ``"npo"`` (default: negative preference optimisation against a frozen
            reference model), ``"ga"`` (gradient ascent: minus the cross-entropy) or a
            :data:`LossFn`. Gradient ascent is negative, so in implicit mode it needs a dual rule
            without the log transform: ``dual="paper"`` (or ``loss_transform="identity"``).
        npo_beta: NPO's inverse temperature beta.
        simnpo_beta, simnpo_gamma: SimNPO's inverse temperature and margin (``forget_loss="simnpo"``,
            NPO without a reference model on the length-normalised log-likelihood).
        dual_update: implicit mode: ``"lagged"`` (the next step's retain loss stands in for the
            retain loss after the step) or ``"exact"`` (re-evaluate the step's retain micro-batches
            after the step, without gradients).
        max_grad_norm: clip norm of the final update direction, applied inside the optimizer.
            ``None`` takes ``TrainingArguments.max_grad_norm`` (a value <= 0 there: no clipping).
        rule, surgery, tolerance, dual, dual_lr, w_init, loss_transform: as for
            :class:`~eupmu_kernels.EUPMU`, with its defaults.
        optimizer_kwargs: any further :class:`~eupmu_kernels.EUPMU` keyword (``weighting``,
            ``alpha``, ``state_dtype``, ``backend``, ``skip_nonfinite``, ...).
    """

    mode: str = _eupmu_default("mode")
    forget_loss: str | LossFn = "npo"
    npo_beta: float = 0.1
    simnpo_beta: float = 2.5
    simnpo_gamma: float = 0.0
    dual_update: str = "lagged"
    max_grad_norm: float | None = None  # None: TrainingArguments.max_grad_norm (see above)
    rule: str = _eupmu_default("rule")
    surgery: str = _eupmu_default("surgery")
    tolerance: float = _eupmu_default("tolerance")
    dual: str = _eupmu_default("dual")
    dual_lr: float | None = _eupmu_default("dual_lr")
    w_init: float = _eupmu_default("w_init")
    loss_transform: str | None = _eupmu_default("loss_transform")
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.forget_loss, str) and self.forget_loss not in TEXT_FORGET_LOSSES:
            raise ValueError(f"forget_loss must be one of {TEXT_FORGET_LOSSES} or a callable, got {self.forget_loss!r}")
        if self.dual_update not in DUAL_UPDATES:
            raise ValueError(f"dual_update must be one of {DUAL_UPDATES}, got {self.dual_update!r}")
        if self.dual_update == "exact" and self.dual == "famo":
            raise ValueError("dual_update='exact' re-evaluates the retain loss only; dual='famo' needs the forget "
                             "loss after the step too: use dual_update='lagged'")
        if (self.mode == "implicit" and self.forget_loss == "ga" and "loss_lower_bounds" not in self.optimizer_kwargs
                and dual_preset(self.dual, psi=self.loss_transform).psi == "log"):
            raise ValueError(f"forget_loss='ga' is negative, and dual={self.dual!r} takes the log of the losses: "
                             "use forget_loss='npo', or dual='paper' (or loss_transform='identity') for gradient "
                             "ascent")

    @classmethod
    def for_method(cls, name: str, **fields: Any) -> "EUPMUConfig":
        """The configuration of a method of :mod:`eupmu_unlearn.methods` (``eupmu``, ``ungrad``,
        ``npo-graddiff``, ...): its mode, dual preset or surgery rule and, where the method fixes
        one, its forget loss; ``fields`` set the rest. Plain methods and FAMO have none."""
        method = methods.resolve(name, fields.get("dual", methods.DEFAULT_DUAL))
        if method.family == "plain" or method.option == "famo":
            raise ValueError(f"method {name!r} does not run in EUPMUTrainer (plain methods and famo have no "
                             "EUPMU configuration here)")
        variant = {"dual": method.option} if method.family == "implicit" else {"surgery": method.option}
        fixed = {"forget_loss": method.forget_loss} if method.forget_loss is not None else {}
        return cls(**{"mode": method.family, **variant, **fixed, **fields})

    def optimizer_arguments(self, max_grad_norm: float | None) -> dict[str, Any]:
        """Keyword arguments of :class:`~eupmu_kernels.EUPMU` (without the per-group ones)."""
        return dict(rule=self.rule, mode=self.mode, surgery=self.surgery, tolerance=self.tolerance, dual=self.dual,
                    dual_lr=self.dual_lr, w_init=self.w_init, loss_transform=self.loss_transform,
                    max_grad_norm=max_grad_norm, **self.optimizer_kwargs)


# ---------------------------------------------------------------------------------- data


class ForgetRetainDataset(torch.utils.data.Dataset):
    """Pairs each forget example with a retain example; one epoch is one pass over the forget set.

    The retain partners are read from an endless stream of shuffled passes over the retain set
    (pass ``k`` is a permutation drawn from ``(seed, k)``), ``len(forget)`` partners per epoch:
    epoch ``e`` pairs forget example ``i`` with stream position ``e * len(forget) + i``. So the
    pairing is reproducible, changes from epoch to epoch, and uses every retain example once per
    pass even when the retain set is the larger one. :class:`EUPMUTrainer` calls
    :meth:`set_epoch` at the start of every epoch (persistent data-loader workers keep the pairing
    of the epoch they were started in).
    """

    def __init__(self, forget: Sequence[Any], retain: Sequence[Any], seed: int = 0) -> None:
        if len(forget) == 0 or len(retain) == 0:
            raise ValueError("ForgetRetainDataset needs a non-empty forget set and a non-empty retain set")
        self.forget = forget
        self.retain = retain
        self.seed = seed
        self.epoch = 0
        self._passes: dict[int, Tensor] = {}

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self._passes = {}

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"forget": self.forget[index], "retain": self.retain[self.retain_index(index)]}

    def retain_index(self, index: int) -> int:
        position = self.epoch * len(self.forget) + int(index)
        pass_index, offset = divmod(position, len(self.retain))
        order = self._passes.get(pass_index)
        if order is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + pass_index)
            order = self._passes[pass_index] = torch.randperm(len(self.retain), generator=generator)
        return int(order[offset])


@dataclass
class ForgetRetainCollator:
    """Right-pads forget/retain pairs into ``forget_*`` and ``retain_*`` causal-LM tensors.

    Each example is a mapping with ``input_ids`` and optionally ``attention_mask`` and ``labels``
    (lists or 1-D tensors). Missing labels are the input ids; padded and masked positions get
    label -100. Plain examples (no ``forget``/``retain`` keys) give ``input_ids``,
    ``attention_mask`` and ``labels``.
    """

    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        if not features:
            raise ValueError("ForgetRetainCollator got an empty batch")
        if not all(isinstance(f, Mapping) and "forget" in f and "retain" in f for f in features):
            return self.pad([dict(f) for f in features])
        batch: dict[str, Tensor] = {}
        for part in PARTS:
            for key, value in self.pad([f[part] for f in features]).items():
                batch[f"{part}_{key}"] = value
        return batch

    def pad(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        return pad_examples(examples, self.pad_token_id, self.pad_to_multiple_of)


def split_batch(inputs: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The forget and the retain side of a collated batch, with the prefixes stripped."""
    sides = tuple({key: inputs[f"{part}_{key}"] for key in BATCH_FIELDS if f"{part}_{key}" in inputs}
                  for part in PARTS)
    for part, side in zip(PARTS, sides):
        if "input_ids" not in side:
            raise ValueError(f"the batch has no {part}_input_ids: train EUPMUTrainer on forget/retain pairs "
                             f"(ForgetRetainDataset + ForgetRetainCollator); got keys {sorted(inputs)}")
    return sides[0], sides[1]


def is_paired_batch(inputs: Mapping[str, Any]) -> bool:
    return "forget_input_ids" in inputs and "retain_input_ids" in inputs


# ---------------------------------------------------------------------------------- losses


def gradient_ascent_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Minus the cross-entropy: minimising it pushes the forget examples' likelihood down."""
    return text_forget_loss("ga", model, batch)


class NPOLoss:
    """Negative preference optimisation: (2/beta) E[log(1 + (pi_theta / pi_ref)^beta)] >= 0.

    ``pi`` are sequence likelihoods of the forget examples; ``reference`` is frozen (its forward
    pass runs without gradients).
    """

    def __init__(self, reference: nn.Module, beta: float = 0.1) -> None:
        if beta <= 0:
            raise ValueError(f"npo beta must be > 0, got {beta}")
        self.reference = reference
        self.beta = beta

    def __call__(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        with torch.no_grad():
            reference_log_prob = sequence_log_prob(self.reference, batch)
        return text_forget_loss("npo", model, batch, reference_log_prob, self.beta)


class SimNPOLoss:
    """SimNPO: (2/beta) E[log(1 + exp(beta * log pi / |y| + gamma))] >= 0; no reference model."""

    def __init__(self, beta: float = 2.5, gamma: float = 0.0) -> None:
        if beta <= 0 or gamma < 0:
            raise ValueError(f"simnpo needs beta > 0 and gamma >= 0, got beta={beta}, gamma={gamma}")
        self.beta, self.gamma = beta, gamma

    def __call__(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        return text_forget_loss("simnpo", model, batch, None, simnpo_beta=self.beta, simnpo_gamma=self.gamma)


def frozen_copy(model: nn.Module) -> nn.Module:
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


# ---------------------------------------------------------------------------------- trainer helpers


def unwrap_eupmu(optimizer: Any) -> EUPMU | None:
    """The EUPMU instance inside accelerate's (or DeepSpeed's) optimizer wrappers, if any."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, EUPMU) and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer if isinstance(optimizer, EUPMU) else None


class _LossMeter:
    """Device-side running sum of (L_f, L_r) between two logs; read only when logging."""

    def __init__(self) -> None:
        self._sum: Tensor | None = None
        self._count = 0

    def add(self, forget_loss: Tensor, retain_loss: Tensor) -> None:
        pair = torch.stack([forget_loss.detach().float().reshape(()), retain_loss.detach().float().reshape(())])
        self._sum = pair if self._sum is None else self._sum + pair
        self._count += 1

    def take_mean(self) -> Tensor | None:
        if self._sum is None:
            return None
        mean = self._sum / self._count
        self._sum, self._count = None, 0
        return mean


class _UnlearningCallback(TrainerCallback):
    """Hooks of :class:`EUPMUTrainer` that must run between the Trainer's own loop stages."""

    def __init__(self, trainer: "EUPMUTrainer") -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):  # noqa: ANN001 (TrainerCallback API)
        dataset = self.trainer.train_dataset
        if isinstance(dataset, ForgetRetainDataset):
            dataset.set_epoch(int(state.epoch or 0))

    def on_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001 (TrainerCallback API)
        self.trainer.finish_exact_dual_update()


def _trainer_view_of(args: TrainingArguments) -> TrainingArguments:
    """A copy of the arguments with the Trainer's own clipping off and the pair columns kept."""
    view = copy.copy(args)
    view.max_grad_norm = 0.0
    view.remove_unused_columns = False
    return view


# ---------------------------------------------------------------------------------- the trainer


class EUPMUTrainer(Trainer):
    """A ``transformers.Trainer`` that unlearns a forget set while preserving a retain set with EUPMU.

    Use it like a ``Trainer`` with a dataset of forget/retain pairs (see the module docstring)::

        trainer = EUPMUTrainer(model=model, args=TrainingArguments(...),
                               train_dataset=ForgetRetainDataset(forget, retain),
                               eupmu_config=EUPMUConfig(mode="explicit", forget_loss="npo"))
        trainer.train()

    Args:
        model, args, **trainer_kwargs: as for ``Trainer`` (``data_collator`` defaults to a
            :class:`ForgetRetainCollator` padding with the ``processing_class``'s pad token id).
        eupmu_config: the unlearning options (default: ``EUPMUConfig()``, implicit mode with the
            NPO forget loss).
        ref_model: NPO's frozen reference model; default: a frozen copy of ``model`` as it is
            when the trainer is built (the model the unlearning starts from).
        retain_loss: the retain loss, default the causal-LM cross-entropy.

    Optimizer. :meth:`create_optimizer` builds the :class:`~eupmu_kernels.EUPMU` optimizer from
    the Trainer's own weight-decay grouping (``get_decay_parameter_names``: decayed weights at
    ``args.weight_decay``, biases and norms at 0), ``args.learning_rate``, ``adam_beta1/2`` and
    ``adam_epsilon``; the learning-rate scheduler is created by the Trainer as usual and drives
    the optimizer's groups. Setups that build the optimizer through ``create_optimizer`` (FSDP
    creates it after wrapping the model) therefore keep working. ``args.optim`` is not used. An
    optimizer passed through ``optimizers=`` must be an EUPMU.

    Gradient clipping. The surgery must see the unclipped g_f and g_r, and clipping only the
    forget gradient in ``.grad`` (which is all the Trainer can see) would be wrong. So the
    trainer keeps a copy of the ``TrainingArguments`` with ``max_grad_norm=0`` (the Trainer then
    clips nothing, and DeepSpeed's ``"auto"`` clipping is off too) and hands the original clip norm
    (or ``EUPMUConfig.max_grad_norm``) to the optimizer, which clips the final direction inside its
    update kernel: for d = g_f + lambda* g_r, ||d|| comes from the Gramian, so this costs no extra
    pass. ``trainer.args`` is that copy (it also sets ``remove_unused_columns=False`` so the pair
    columns reach the collator); the clip norm in use is :attr:`eupmu_max_grad_norm`. The
    ``grad_norm`` the Trainer still logs is the norm of ``.grad`` before the step: of g_f in
    explicit mode, of the gradient of J in implicit mode.

    DeepSpeed runs its own backward/step and keeps gradients in its own buffers, so explicit mode
    (which redirects ``.grad`` into the retain buffer) refuses to run under it.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        *,
        eupmu_config: EUPMUConfig | None = None,
        ref_model: nn.Module | None = None,
        retain_loss: LossFn | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        if args is None:
            args = TrainingArguments(output_dir="tmp_trainer")
        self.eupmu_config = eupmu_config if eupmu_config is not None else EUPMUConfig()
        clip = self.eupmu_config.max_grad_norm
        clip = args.max_grad_norm if clip is None else clip
        self.eupmu_max_grad_norm: float | None = clip if clip is not None and clip > 0 else None
        if trainer_kwargs.get("data_collator") is None:
            trainer_kwargs["data_collator"] = _default_collator(trainer_kwargs.get("processing_class"))
        super().__init__(model=model, args=_trainer_view_of(args), **trainer_kwargs)
        if self.eupmu_config.mode == "explicit" and getattr(self, "is_deepspeed_enabled", False):
            raise ValueError("EUPMUConfig(mode='explicit') does not run under DeepSpeed; use mode='implicit'")
        self.forget_loss_fn = self._make_forget_loss(ref_model)
        self.retain_loss_fn: LossFn = retain_loss if retain_loss is not None else causal_lm_loss
        self._loss_meter = _LossMeter()
        self._retain_batches: list[Mapping[str, Tensor]] = []  # dual_update="exact": this step's batches
        self.add_callback(_UnlearningCallback(self))

    def _make_forget_loss(self, ref_model: nn.Module | None) -> LossFn:
        chosen = self.eupmu_config.forget_loss
        if callable(chosen):
            return chosen
        if chosen == "ga":
            return gradient_ascent_loss
        if chosen == "simnpo":
            return SimNPOLoss(self.eupmu_config.simnpo_beta, self.eupmu_config.simnpo_gamma)
        reference = ref_model if ref_model is not None else frozen_copy(self.model)
        reference = reference.to(self.args.device).eval()
        reference.requires_grad_(False)
        return NPOLoss(reference, self.eupmu_config.npo_beta)

    # ------------------------------------------------------------------ optimizer

    @property
    def eupmu_optimizer(self) -> EUPMU | None:
        """The EUPMU instance (``self.optimizer`` is accelerate's wrapper around it in training)."""
        return unwrap_eupmu(self.optimizer)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = self.build_eupmu(self.model if model is None else model)
        elif self.eupmu_optimizer is None:
            raise TypeError(f"EUPMUTrainer needs an EUPMU optimizer, got {type(self.optimizer).__name__}")
        return super().create_optimizer() if model is None else super().create_optimizer(model)

    def build_eupmu(self, model: nn.Module) -> EUPMU:
        """EUPMU over the Trainer's weight-decay parameter groups (named, so errors name parameters)."""
        decay_names = set(self.get_decay_parameter_names(model))
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [(n, p) for n, p in named if n in decay_names], "weight_decay": self.args.weight_decay},
            {"params": [(n, p) for n, p in named if n not in decay_names], "weight_decay": 0.0},
        ]
        extra: dict[str, Any] = {}
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:  # fp16: the optimizer must unscale its retain buffer itself
            extra["grad_scaler"] = scaler
        return EUPMU([g for g in groups if g["params"]], lr=self.args.learning_rate,
                     betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon,
                     **self.eupmu_config.optimizer_arguments(self.eupmu_max_grad_norm), **extra)

    def _require_eupmu(self) -> EUPMU:
        opt = self.eupmu_optimizer
        if opt is None:
            raise RuntimeError("EUPMUTrainer.training_step needs the EUPMU optimizer (created by train())")
        return opt

    # ------------------------------------------------------------------ training step

    def training_step(self, model: nn.Module, inputs: dict[str, Tensor | Any],
                      num_items_in_batch: Tensor | int | None = None) -> Tensor:
        """Both losses on one micro-batch, backward in the optimizer's mode; returns J or L_f, detached."""
        opt = self._require_eupmu()
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        forget_batch, retain_batch = split_batch(inputs)
        scale = 1.0 / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        losses = Losses(lambda: self._loss(self.forget_loss_fn, model, forget_batch),
                        lambda: self._loss(self.retain_loss_fn, model, retain_batch))

        def backward(loss: Tensor, **kwargs: Any) -> None:
            self._backward(loss * scale, **kwargs)

        if opt.mode == "explicit":  # one forward and backward pass per loss: one graph alive at a time
            explicit_backward(opt, losses, backward)
            reported = losses.forget
        else:
            reported = implicit_backward(opt, losses, backward)
            if self.eupmu_config.dual_update == "exact":
                self._retain_batches.append(retain_batch)
        self._loss_meter.add(losses.forget, losses.retain)
        return (reported * scale).detach()

    def _loss(self, fn: LossFn, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        with self.compute_loss_context_manager():
            return fn(model, batch)

    def _backward(self, loss: Tensor, **kwargs: Any) -> None:
        if getattr(self, "is_deepspeed_enabled", False):
            kwargs["scale_wrt_gas"] = False  # the loss is already divided by the accumulation steps
        self.accelerator.backward(loss, **kwargs)

    def finish_exact_dual_update(self) -> None:
        """Right after the optimizer step (``dual_update="exact"``): the retain loss at the new
        parameters on the step's own retain micro-batches, without gradients, moves w.

        Running it before the checkpoint of the step is written keeps resumed runs exact."""
        if not self._retain_batches:
            return
        batches, self._retain_batches = self._retain_batches, []
        model = self.model_wrapped if self.model_wrapped is not None else self.model
        with torch.no_grad(), self.compute_loss_context_manager():
            retain_after = torch.stack([self.retain_loss_fn(model, b) for b in batches]).mean()
        self._require_eupmu().update_dual(retain_after)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Tensor | int | None = None) -> Any:
        if is_paired_batch(inputs):
            raise ValueError("compute_loss() got a forget/retain batch: paired batches are for training; "
                             "evaluate on plain causal-LM examples (ForgetRetainCollator pads those too)")
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def floating_point_ops(self, inputs: dict[str, Tensor | Any]) -> int:
        if not is_paired_batch(inputs):
            return super().floating_point_ops(inputs)
        return sum(super(EUPMUTrainer, self).floating_point_ops({"input_ids": inputs[f"{part}_input_ids"]})
                   for part in PARTS)

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the unlearning values to the Trainer's periodic training log (the one with ``loss``)."""
        if "loss" in logs:
            logs = {**logs, **self.unlearning_log_values()}
        super().log(logs, *args, **kwargs)

    def unlearning_log_values(self) -> dict[str, float]:
        """forget/retain loss means since the last call and the optimizer's last-step statistics."""
        names: list[str] = []
        values: list[Tensor] = []
        mean = self._loss_meter.take_mean()
        if mean is not None:
            if self.accelerator.num_processes > 1:
                mean = self.accelerator.reduce(mean, reduction="mean")
            names += ["forget_loss", "retain_loss"]
            values.append(mean)
        opt = self.eupmu_optimizer
        if opt is not None:
            for name, value in self._optimizer_statistics(opt).items():
                names.append(name)
                values.append(value)
        if not values:
            return {}
        flat = torch.cat([v.detach().float().reshape(-1).to(values[0].device) for v in values]).tolist()
        return dict(zip(names, flat))

    def _optimizer_statistics(self, opt: EUPMU) -> dict[str, Tensor]:
        stats = opt.stats()
        wanted = {"eupmu_w": "w"} if opt.mode == "implicit" else {"eupmu_lambda": "lambda", "eupmu_cos": "cos"}
        if self.eupmu_max_grad_norm is not None:
            wanted["eupmu_clip"] = "clip"
        wanted["eupmu_skipped_steps"] = "skipped"
        return {name: stats[key] for name, key in wanted.items() if key in stats}


def _default_collator(processing_class: Any) -> ForgetRetainCollator:
    pad_id = getattr(processing_class, "pad_token_id", None)
    return ForgetRetainCollator(pad_token_id=pad_id if pad_id is not None else 0)

