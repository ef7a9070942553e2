"""The Hugging Face Trainer integration on a tiny randomly initialised Llama (CPU, no download)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

from eupmu_kernels import EUPMU  # noqa: E402
from eupmu_kernels.integrations.hf import (  # noqa: E402
    EUPMUConfig,
    EUPMUTrainer,
    ForgetRetainCollator,
    ForgetRetainDataset,
    NPOLoss,
    causal_lm_loss,
    frozen_copy,
    split_batch,
)

VOCAB = 64
BATCH = 4


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def token_examples(count: int, seed: int, min_len: int = 4, max_len: int = 12) -> list[dict[str, list[int]]]:
    """Counting sequences (n, n+1, ...) from random starts: forget and retain sets drawn from the same
    pattern make the two gradients conflict, so the surgery has work to do."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=gen)
    starts = torch.randint(0, VOCAB - 1, (count,), generator=gen)
    return [{"input_ids": [(int(s) + k) % (VOCAB - 1) + 1 for k in range(int(n))]} for s, n in zip(starts, lengths)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A model this small runs fastest on one thread, and the CI cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pairs() -> ForgetRetainDataset:
    return ForgetRetainDataset(token_examples(16, seed=1), token_examples(24, seed=2), seed=3)


def training_args(out_dir, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(out_dir), per_device_train_batch_size=BATCH, gradient_accumulation_steps=2,
                    max_steps=3, logging_steps=1, learning_rate=1e-2, weight_decay=0.1, max_grad_norm=0.5,
                    lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no",
                    disable_tqdm=True, seed=0)
    settings.update(overrides)
    return TrainingArguments(**settings)


def no_decay(name: str) -> bool:
    return "norm" in name or "bias" in name


class RecordingCollator(ForgetRetainCollator):
    """Keeps a copy of every batch it produces, in order."""

    def __init__(self) -> None:
        super().__init__(pad_token_id=0)
        self.batches: list[dict[str, torch.Tensor]] = []

    def __call__(self, features):
        batch = super().__call__(features)
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


# ---------------------------------------------------------------------------------- data


def test_collator_pads_pairs_with_ignored_labels() -> None:
    features = [
        {"forget": {"input_ids": [5, 6, 7]}, "retain": {"input_ids": [9, 9], "labels": [-100, 9]}},
        {"forget": {"input_ids": [1], "attention_mask": [1]}, "retain": {"input_ids": [3, 4, 5, 6]}},
    ]
    batch = ForgetRetainCollator(pad_token_id=2)(features)
    assert sorted(batch) == sorted(f"{p}_{k}" for p in ("forget", "retain")
                                   for k in ("input_ids", "attention_mask", "labels"))
    assert batch["forget_input_ids"].tolist() == [[5, 6, 7], [1, 2, 2]]
    assert batch["forget_attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["forget_labels"].tolist() == [[5, 6, 7], [1, -100, -100]]
    assert batch["retain_labels"].tolist() == [[-100, 9, -100, -100], [3, 4, 5, 6]]
    forget, retain = split_batch(batch)
    assert set(forget) == set(retain) == {"input_ids", "attention_mask", "labels"}


def test_collator_pads_plain_examples_for_evaluation() -> None:
    batch = ForgetRetainCollator(pad_to_multiple_of=4)([{"input_ids": [4, 5]}, {"input_ids": [6, 7, 8]}])
    assert batch["input_ids"].shape == (2, 4)
    assert batch["labels"].tolist() == [[4, 5, -100, -100], [6, 7, 8, -100]]


def test_dataset_pairing_is_seeded_and_changes_per_epoch() -> None:
    forget, retain = list(range(5)), list(range(100, 112))
    data = ForgetRetainDataset(forget, retain, seed=7)
    first = [data[i]["retain"] for i in range(len(data))]
    assert len(data) == 5 and [data[i]["forget"] for i in range(5)] == forget
    assert first == [ForgetRetainDataset(forget, retain, seed=7)[i]["retain"] for i in range(5)]
    data.set_epoch(1)
    second = [data[i]["retain"] for i in range(len(data))]
    assert second != first
    data.set_epoch(2)
    third = [data[i]["retain"] for i in range(len(data))]
    assert set(first + second + third) == set(retain)  # one full pass over the larger retain set
    small = ForgetRetainDataset(list(range(7)), [0, 1, 2])
    assert sorted(small[i]["retain"] for i in range(6)) == [0, 0, 1, 1, 2, 2]


def test_npo_loss_is_two_log_two_over_beta_at_the_reference() -> None:
    model = tiny_llama()
    batch = split_batch(ForgetRetainCollator()(
        [{"forget": e, "retain": e} for e in token_examples(3, seed=4)]))[0]
    loss = NPOLoss(frozen_copy(model), beta=0.5)(model, batch)
    assert loss.requires_grad
    assert loss.item() == pytest.approx(2.0 / 0.5 * math.log(2.0), rel=1e-5)


# ---------------------------------------------------------------------------------- optimizer


def test_create_optimizer_builds_eupmu_from_trainer_arguments(tmp_path, pairs) -> None:
    model = tiny_llama()
    args = training_args(tmp_path, adam_beta1=0.8, adam_epsilon=1e-7)
    trainer = EUPMUTrainer(model=model, args=args, train_dataset=pairs,
                           eupmu_config=EUPMUConfig(mode="explicit", tolerance=0.01))
    opt = trainer.create_optimizer()
    assert isinstance(opt, EUPMU) and opt.mode == "explicit"
    decay, plain = opt.param_groups
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    for group in opt.param_groups:
        assert group["lr"] == 1e-2 and group["betas"] == (0.8, 0.999) and group["eps"] == 1e-7
    ids = {id(p): n for n, p in model.named_parameters()}
    assert {ids[id(p)] for p in decay["params"]} == {n for n in ids.values() if not no_decay(n)}
    assert {ids[id(p)] for p in plain["params"]} == {n for n in ids.values() if no_decay(n)}
    # clipping is routed into the optimizer; the Trainer's own clipping is off
    assert opt.surgery_config.max_norm == 0.5 and trainer.eupmu_max_grad_norm == 0.5
    assert trainer.args.max_grad_norm == 0.0 and args.max_grad_norm == 0.5


def test_foreign_optimizer_is_refused(tmp_path, pairs) -> None:
    model = tiny_llama()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = EUPMUTrainer(model=model, args=training_args(tmp_path), train_dataset=pairs, optimizers=(sgd, None))
    with pytest.raises(TypeError, match="EUPMU optimizer"):
        trainer.create_optimizer()


# ---------------------------------------------------------------------------------- training


@pytest.mark.parametrize("mode, forget_loss, dual_update", [("implicit", "npo", "exact"),
                                                            ("explicit", "ga", "lagged")])
def test_trainer_runs_and_logs_unlearning_values(tmp_path, pairs, mode, forget_loss, dual_update) -> None:
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    trainer = EUPMUTrainer(model=model, args=training_args(tmp_path), train_dataset=pairs,
                           eupmu_config=EUPMUConfig(mode=mode, forget_loss=forget_loss, dual_update=dual_update))
    trainer.train()
    assert isinstance(trainer.eupmu_optimizer, EUPMU) and trainer.optimizer is not trainer.eupmu_optimizer
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    specific = {"eupmu_w"} if mode == "implicit" else {"eupmu_lambda", "eupmu_cos"}
    expected = {"forget_loss", "retain_loss", "eupmu_clip", "eupmu_skipped_steps"} | specific
    for entry in logs:
        assert expected <= set(entry), f"missing {expected - set(entry)}"
        assert all(math.isfinite(entry[key]) for key in expected)
        assert entry["eupmu_skipped_steps"] == 0.0
        assert 0.0 < entry["eupmu_clip"] <= 1.0
    if mode == "explicit":
        assert all(entry["forget_loss"] == pytest.approx(entry["loss"], rel=1e-5) for entry in logs)
        assert all(-1.0 <= entry["eupmu_cos"] <= 1.0 and entry["eupmu_lambda"] >= 0.0 for entry in logs)
    else:
        assert logs[0]["forget_loss"] == pytest.approx(2.0 / 0.1 * math.log(2.0), rel=1e-4)  # NPO at start
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_forget_loss_callable_is_used(tmp_path, pairs) -> None:
    calls = []

    def forget_loss(model, batch):
        calls.append(batch["input_ids"].shape[0])
        return -causal_lm_loss(model, batch)

    trainer = EUPMUTrainer(model=tiny_llama(), args=training_args(tmp_path, max_steps=1), train_dataset=pairs,
                           eupmu_config=EUPMUConfig(mode="explicit", forget_loss=forget_loss))
    trainer.train()
    assert calls == [BATCH, BATCH]  # two accumulated micro-batches


def hand_written_run(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], accumulation: int,
                     exact_dual: bool = False, **eupmu_options) -> None:
    """The documented EUPMU loops on the given micro-batches, with the Trainer's hyperparameters."""
    named = list(model.named_parameters())
    groups = [{"params": [(n, p) for n, p in named if not no_decay(n)], "weight_decay": 0.1},
              {"params": [(n, p) for n, p in named if no_decay(n)], "weight_decay": 0.0}]
    opt = EUPMU(groups, lr=1e-2, **eupmu_options)
    model.train()
    for start in range(0, len(batches), accumulation):
        opt.zero_grad()
        step_batches = batches[start:start + accumulation]
        for batch in step_batches:
            forget, retain = split_batch(batch)
            if opt.mode == "explicit":
                with opt.retain_grad():
                    (model(**retain).loss / accumulation).backward()
                (-model(**forget).loss / accumulation).backward()
            else:
                forget_loss = -model(**forget).loss
                retain_loss = model(**retain).loss
                (opt.combine(forget_loss, retain_loss) / accumulation).backward()
        opt.step()
        if exact_dual:
            with torch.no_grad():
                retain_after = torch.stack([model(**split_batch(b)[1]).loss for b in step_batches]).mean()
            opt.update_dual(retain_after)


# SGD with momentum and a tolerance > 0 make the result depend on the scale of each gradient, so
# a wrong accumulation scale or the Trainer clipping g_f on its own would show. Clipping is on
# (routed into the optimizer) in explicit mode and off in implicit mode, where it would hide the
# scale of the gradient of J.
ACCUMULATION_CASES = {
    "explicit": (dict(mode="explicit", rule="sgd", tolerance=0.1, optimizer_kwargs={"momentum": 0.9}), 0.5),
    "implicit": (dict(mode="implicit", rule="sgd", w_init=0.5, dual="paper", optimizer_kwargs={"momentum": 0.9}), 0.0),
    "implicit_exact_dual": (dict(mode="implicit", rule="sgd", w_init=0.5, dual="paper", dual_update="exact",
                                 optimizer_kwargs={"momentum": 0.9}), 0.0),
}


@pytest.mark.parametrize("case", sorted(ACCUMULATION_CASES))
def test_accumulation_matches_hand_written_loop(tmp_path, pairs, case) -> None:
    steps, accumulation = 3, 2
    options, clip = ACCUMULATION_CASES[case]
    model = tiny_llama(seed=5)
    start = copy.deepcopy(model)
    collator = RecordingCollator()
    trainer = EUPMUTrainer(model=model, args=training_args(tmp_path, max_steps=steps, max_grad_norm=clip),
                           train_dataset=pairs, data_collator=collator,
                           eupmu_config=EUPMUConfig(forget_loss="ga", **options))
    trainer.train()
    micro_batches = collator.batches[:steps * accumulation]  # the loader may have fetched one more
    assert len(micro_batches) == steps * accumulation
    hand_options = {k: v for k, v in options.items() if k not in ("optimizer_kwargs", "dual_update")}
    hand_written_run(start, micro_batches, accumulation, exact_dual=options.get("dual_update") == "exact",
                     max_grad_norm=clip or None,
                     **hand_options, **options["optimizer_kwargs"])
    for (name, p), q in zip(model.named_parameters(), start.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    if case == "explicit":
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        assert all(entry["eupmu_lambda"] > 0.0 and entry["eupmu_clip"] < 1.0 for entry in logs)  # both active


def test_resume_from_checkpoint_continues_exactly(tmp_path, pairs) -> None:
    """The optimizer state, w and the exact dual update all survive a checkpoint."""
    config = EUPMUConfig(mode="implicit", forget_loss="ga", dual="paper", dual_update="exact", w_init=0.5)
    args = training_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    first = EUPMUTrainer(model=tiny_llama(seed=6), args=args, train_dataset=pairs, eupmu_config=config)
    first.train()
    resumed = EUPMUTrainer(model=tiny_llama(seed=6), args=args, train_dataset=pairs, eupmu_config=config)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    for p, q in zip(first.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert resumed.eupmu_optimizer.w.item() == first.eupmu_optimizer.w.item()
