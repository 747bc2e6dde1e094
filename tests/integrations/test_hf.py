"""The Hugging Face integration with a real ``transformers.Trainer``: records, loss, steps, resume, hooks removed."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import pytest
import torch
import transformers  # the dev extra installs the frameworks: these tests run, never skip, in CI
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.pytorch_utils import Conv1D
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from heavytail.integrations.hf import STATE_FILE, HeavyTailCallback
from tests.conftest import read_records

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def _quiet_transformers():
    transformers.logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    yield


class RandomTokens(torch.utils.data.Dataset):
    """Sequences of random token ids, their own labels (a causal LM's targets)."""

    def __init__(self, n: int = 64, length: int = 16, vocab: int = 100) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def make_trainer(
    tmp_path,
    callback,
    *,
    model=None,
    max_steps=12,
    accumulation=1,
    logging_steps=4,
    trainer_class=Trainer,
    eval_dataset=None,
    **kw,
) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulation,
        logging_steps=logging_steps,
        learning_rate=1e-3,
        report_to=[],
        save_strategy=kw.pop("save_strategy", "no"),
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        **kw,
    )
    trainer = trainer_class(
        model=model or tiny_gpt2(),
        args=args,
        train_dataset=RandomTokens(),
        eval_dataset=eval_dataset,
        callbacks=[callback],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_records_loss_and_steps(tmp_path, accumulation):
    callback = HeavyTailCallback(every=4)
    # Evaluation every 4 steps: its forward passes (eval mode, no grad) must not leak into the training loss.
    trainer = make_trainer(
        tmp_path,
        callback,
        accumulation=accumulation,
        eval_strategy="steps",
        eval_steps=4,
        eval_dataset=RandomTokens(n=8),
    )
    model = trainer.model
    trainer.train()

    monitor = callback.monitor
    assert monitor.log_dir == tmp_path / "out" / "heavytail"
    assert monitor.step_count == trainer.state.global_step == 12
    records = read_records(monitor.log_dir)
    assert [r["step"] for r in records] == [4, 8, 12]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "transformer.h.0.attn.c_attn.weight" in names
    for record in records:
        m = record["metrics"]
        assert m["steps"] == 4
        for name in names:
            if name == "lm_head.weight":
                continue  # tied to transformer.wte.weight: watched once, under its first name
            assert math.isfinite(m[f"grad/norm/{name}"]), name
        assert math.isfinite(m["loss"])
    # Under accumulation the monitor sees every micro-batch's backward: the micro-batch noise source.
    assert ("noise/microbatch_kurtosis/transformer.h.0.attn.c_attn.weight" in records[-1]["metrics"]) == (
        accumulation > 1
    )
    # The monitor's loss is the Trainer's own logged loss (mean over the same logging window of 4 steps).
    logged = [h for h in trainer.state.log_history if "loss" in h and "eval_loss" not in h]
    assert [h["step"] for h in logged] == [4, 8, 12]
    for record, h in zip(records, logged):
        assert record["metrics"]["loss"] == pytest.approx(h["loss"], rel=1e-4)
    # Hooks are gone after training: the model's forward hook, the optimizer's step hooks.
    assert not model._forward_hooks
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    inner = trainer.optimizer.optimizer
    assert not inner._optimizer_step_pre_hooks and not inner._optimizer_step_post_hooks


def test_loss_computed_outside_the_model(tmp_path):
    """Label smoothing pops the labels: the model returns no loss. The callback warns, then takes the user's."""
    silent = HeavyTailCallback(every=2)
    trainer = make_trainer(tmp_path / "a", silent, max_steps=4, label_smoothing_factor=0.1)
    with pytest.warns(RuntimeWarning, match="returned no loss"):
        trainer.train()
    assert all("loss" not in r["metrics"] for r in read_records(silent.monitor.log_dir))

    fed = HeavyTailCallback(every=2)

    class OwnLoss(Trainer):
        loss_is_scaled_for_ga = False  # a per-micro-batch mean: the Trainer divides it by the accumulation

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logits = model(input_ids=inputs["input_ids"]).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), inputs["labels"][:, 1:].reshape(-1)
            )
            fed.observe_loss(loss)
            return loss

    trainer = make_trainer(tmp_path / "b", fed, max_steps=4, trainer_class=OwnLoss, accumulation=2, logging_steps=2)
    trainer.train()
    records = read_records(fed.monitor.log_dir)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert [r["metrics"]["loss"] for r in records] == pytest.approx(logged, rel=1e-4)


def test_trainer_post_clip_gradient(tmp_path):
    """The step hook sees the clipped gradient; grad/norm_preclip the one before clipping."""
    callback = HeavyTailCallback(every=1)
    trainer = make_trainer(tmp_path, callback, max_steps=3, max_grad_norm=1e-3, logging_steps=1)
    trainer.train()
    records = read_records(callback.monitor.log_dir)
    assert len(records) == 3
    for record in records:
        m = record["metrics"]
        assert m["grad/norm"] == pytest.approx(1e-3, rel=1e-3)
        assert m["grad/norm_preclip"] > 10 * m["grad/norm"]


def test_trainer_watches_only_attention_weights(tmp_path):
    """Watch only the attention weights: by name glob or by module type (GPT-2's attention is a Conv1D)."""
    by_name = HeavyTailCallback(every=4, include=["*attn.c_attn.weight"])
    trainer = make_trainer(tmp_path / "a", by_name, max_steps=4)
    trainer.train()
    keys = read_records(by_name.monitor.log_dir)[-1]["metrics"]
    watched = sorted(k.split("/", 2)[2] for k in keys if k.startswith("grad/norm/"))
    assert watched == ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"]

    by_type = HeavyTailCallback(every=4, include=[Conv1D], exclude=["*mlp*", "*.bias"])
    trainer = make_trainer(tmp_path / "b", by_type, max_steps=4)
    trainer.train()
    keys = read_records(by_type.monitor.log_dir)[-1]["metrics"]
    watched = sorted(k.split("/", 2)[2] for k in keys if k.startswith("grad/norm/"))
    assert watched == [f"transformer.h.{i}.attn.{m}.weight" for i in (0, 1) for m in ("c_attn", "c_proj")]


def test_trainer_resume_restores_monitor_state(tmp_path):
    first = HeavyTailCallback(every=3)
    trainer = make_trainer(tmp_path, first, max_steps=6, save_strategy="steps", save_steps=3)
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-3"
    assert (checkpoint / STATE_FILE).is_file()

    resumed = HeavyTailCallback(every=3)
    trainer = make_trainer(tmp_path, resumed, max_steps=6)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.monitor.step_count == trainer.state.global_step == 6
    steps = [r["step"] for r in read_records(resumed.monitor.log_dir)]
    assert steps == [3, 6, 6]  # the first run's two records, then the resumed run's record at step 6


def test_integrations_package_imports_no_framework():
    code = (
        "import sys, heavytail.integrations; "
        "print(sorted({'transformers', 'lightning', 'pytorch_lightning', 'accelerate'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bad_monitor_arguments_fail_when_the_callback_is_built():
    with pytest.raises(ValueError, match="every"):
        HeavyTailCallback(every=0)


def test_the_run_is_titled_with_the_trainers_run_name(tmp_path):
    callback = HeavyTailCallback(every=2)
    make_trainer(tmp_path, callback, max_steps=2, run_name="gpt2-lr1e-3").train()
    meta = json.loads((callback.monitor.log_dir / "meta.json").read_text())
    assert meta["run_name"] == "gpt2-lr1e-3"
    assert meta["final_step"] == 2


def test_a_new_train_into_the_same_output_dir_replaces_the_records_with_a_warning(tmp_path):
    make_trainer(tmp_path, HeavyTailCallback(every=2), max_steps=4).train()
    again = HeavyTailCallback(every=2)
    with pytest.warns(
        RuntimeWarning,
        match=r"a new Trainer run in the same output directory: replacing the records "
        r"of a previous run \(2 records up to step 4\)",
    ):
        make_trainer(tmp_path, again, max_steps=2).train()
    assert [r["step"] for r in read_records(again.monitor.log_dir)] == [2]  # not [2, 4, 2]


def test_an_explicit_choice_overrides_the_trainers(tmp_path):
    make_trainer(tmp_path, HeavyTailCallback(every=2), max_steps=4).train()
    with pytest.raises(FileExistsError, match="already holds a previous run"):
        make_trainer(tmp_path, HeavyTailCallback(every=2, overwrite=False, resume=False), max_steps=2).train()
