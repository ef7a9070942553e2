"""EUPMUConfig's defaults are the optimizer's, and the Trainer with a learning-rate warm-up unlearns.

The warm-up case: the Trainer's linear warm-up starts at learning rate 0, and a dual rule that
divides by the step's learning rate must not turn the multiplier w into inf or NaN there (which
then skips every later step on its non-finite gradient, so nothing is unlearned and nothing fails).
Tiny randomly initialised Llama on the CPU, no download.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

from eupmu_kernels import EUPMU  # noqa: E402
from eupmu_kernels.integrations.hf import EUPMUConfig, EUPMUTrainer, ForgetRetainDataset  # noqa: E402

VOCAB = 64
# The options EUPMUConfig passes to the optimizer under the optimizer's own names.
SHARED = {"mode", "rule", "surgery", "tolerance", "dual", "dual_lr", "w_init", "loss_transform", "max_grad_norm"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def pairs() -> ForgetRetainDataset:
    gen = torch.Generator().manual_seed(0)

    def examples(count: int) -> list[dict[str, list[int]]]:
        starts = torch.randint(0, VOCAB - 1, (count,), generator=gen)
        return [{"input_ids": [(int(s) + k) % (VOCAB - 1) + 1 for k in range(8)]} for s in starts]

    return ForgetRetainDataset(examples(16), examples(24), seed=1)


def test_config_defaults_are_the_optimizer_defaults() -> None:
    signature = inspect.signature(EUPMU.__init__).parameters
    fields = {f.name: f for f in dataclasses.fields(EUPMUConfig)}
    shared = {name for name in fields if name in signature}
    assert shared == SHARED  # a new shared option must be listed (and share the default) too
    for name in sorted(shared):
        assert fields[name].default == signature[name].default, f"EUPMUConfig.{name} differs from EUPMU's default"


def test_trainer_builds_the_optimizer_with_its_defaults(tmp_path) -> None:
    model = tiny_llama()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no")
    trainer = EUPMUTrainer(model=model, args=args, train_dataset=pairs())
    trainer.create_optimizer()
    built = trainer.eupmu_optimizer
    plain = EUPMU(model.parameters())
    assert built.mode == plain.mode and built.dual_config == plain.dual_config


def test_gradient_ascent_with_a_log_dual_rule_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match="forget_loss='ga' is negative.*dual='paper'"):
        EUPMUConfig(mode="implicit", forget_loss="ga")
    EUPMUConfig(mode="implicit", forget_loss="ga", dual="paper")  # fine: no log transform
    EUPMUConfig(mode="explicit", forget_loss="ga")  # explicit mode has no multiplier


def unlearn_with_warmup(tmp_path, **config) -> tuple[list[dict], LlamaForCausalLM, LlamaForCausalLM]:
    """The Trainer's defaults except for the warm-up, learning rate and length, logging every step."""
    model = tiny_llama()
    before = copy.deepcopy(model)
    args = TrainingArguments(output_dir=str(tmp_path), warmup_steps=2, learning_rate=1e-3, max_steps=12,
                             per_device_train_batch_size=4, logging_steps=1, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, seed=0)
    trainer = EUPMUTrainer(model=model, args=args, train_dataset=pairs(),
                           eupmu_config=EUPMUConfig(mode="implicit", forget_loss="npo", **config))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "eupmu_w" in entry]
    return logs, before, model


def check_unlearned(logs: list[dict], before: LlamaForCausalLM, after: LlamaForCausalLM) -> None:
    assert len(logs) == 12
    assert all(math.isfinite(entry["eupmu_w"]) for entry in logs), [entry["eupmu_w"] for entry in logs]
    assert [entry["eupmu_skipped_steps"] for entry in logs] == [0.0] * 12
    unchanged = [name for (name, p), q in zip(after.named_parameters(), before.parameters()) if torch.equal(p, q)]
    assert not unchanged, f"parameters that did not move: {unchanged}"


@pytest.mark.parametrize("dual_update", ["lagged", "exact"])
def test_warmup_from_lr_zero_unlearns_with_the_defaults(tmp_path, dual_update) -> None:
    check_unlearned(*unlearn_with_warmup(tmp_path, dual_update=dual_update))


@pytest.mark.parametrize("dual_update", ["lagged", "exact"])
def test_warmup_from_lr_zero_unlearns_with_the_paper_dual_rule(tmp_path, dual_update) -> None:
    check_unlearned(*unlearn_with_warmup(tmp_path, dual="paper", dual_update=dual_update))
