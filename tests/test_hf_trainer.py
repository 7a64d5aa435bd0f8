"""GARDCallback in transformers.Trainer: gradient accumulation, logs, checkpoints, exact resume."""
import shutil

import pytest
import torch
from safetensors.torch import load_file

import gard_kernels as gk

from .models import VOCAB, tiny_llama

transformers = pytest.importorskip("transformers")
from gard_kernels.integrations import GARDCallback  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BUDGET = 1_500
MAX_STEPS = 12
LR = 1e-2


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, count=4 * MAX_STEPS, length=12):
        generator = torch.Generator().manual_seed(7)
        self.ids = torch.randint(0, VOCAB, (count, length), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _config() -> gk.GARDConfig:
    # Re-allocations at steps 3, 6, 9, 12; random scores without smoothing move ranks each time.
    return gk.GARDConfig(
        budget=BUDGET, target_modules=TARGETS, window=2, interval=3, warmup=2, delta_max=2, r_max=6,
        score="random", ema=0.0, seed=4, grow_init="gradient",
    )


def _trainer(output_dir, callback):
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=MAX_STEPS, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, optim="adamw_torch",
        logging_steps=1, save_strategy="steps", save_steps=4, report_to=[], use_cpu=True, seed=3,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    return transformers.Trainer(model=tiny_llama(), args=args, train_dataset=_Tokens(), callbacks=[callback])


def _train_logs(trainer):
    return [record for record in trainer.state.log_history if "loss" in record]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted run with a checkpoint every 4 steps."""
    out = tmp_path_factory.mktemp("full")
    callback = GARDCallback(_config())
    trainer = _trainer(out, callback)
    trainer.train()
    return out, trainer, callback


def test_trainer_runs_gard_once_per_optimizer_step(full_run):
    out, trainer, callback = full_run
    gard = callback.gard
    # Only the adapters train; the Trainer's own optimizer holds all of them, rank-0 ones included.
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in gard.lora_parameters()}
    assert gard.optimizer is trainer.optimizer.optimizer
    held = [p for group in gard.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in held} == trainable

    assert gard.step_count == MAX_STEPS and [r["step"] for r in gard.history] == list(range(1, MAX_STEPS + 1))
    events = [r["reallocation"]["step"] for r in gard.history if "reallocation" in r]
    assert events == [3, 6, 9, 12]
    assert len({tuple(r["ranks"]) for r in gard.history}) > 2
    assert all(r["params"] <= BUDGET for r in gard.history)

    logs = _train_logs(trainer)
    assert [r["step"] for r in logs] == list(range(1, MAX_STEPS + 1))
    for record, history in zip(logs, gard.history):
        assert record["lora_params"] == history["params"] <= BUDGET
        assert record["lora_ranks"] == ",".join(map(str, history["ranks"]))
    # The linear schedule keeps driving the optimizer through every resize.
    linear = [LR * (MAX_STEPS - s) / MAX_STEPS for s in range(MAX_STEPS)]
    assert [r["learning_rate"] for r in logs] == pytest.approx(linear)
    assert [g["lr"] for g in gard.optimizer.param_groups] == pytest.approx(trainer.lr_scheduler.get_last_lr())
    for param in held:
        for value in gard.optimizer.state[param].values():
            assert not torch.is_tensor(value) or value.dim() == 0 or value.shape == param.shape
    for step in (4, 8, 12):
        assert (out / f"checkpoint-{step}" / "gard_state.pt").is_file()


def _assert_same_continuation(resumed, full, start):
    (trainer, callback), (full_trainer, full_callback) = resumed, full
    assert [r["ranks"] for r in callback.gard.history] == [r["ranks"] for r in full_callback.gard.history]
    got = [r["loss"] for r in _train_logs(trainer) if r["step"] > start]
    expected = [r["loss"] for r in _train_logs(full_trainer) if r["step"] > start]
    assert len(got) == MAX_STEPS - start
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_resume_before_a_reallocation_matches_the_full_run(full_run, tmp_path):
    # Step 8's checkpoint: capture (and the gradient range finder) is armed for re-allocation 9.
    out, full_trainer, full_callback = full_run
    shutil.copytree(out / "checkpoint-8", tmp_path / "checkpoint-8")
    callback = GARDCallback(_config())
    trainer = _trainer(tmp_path, callback)
    trainer.train(resume_from_checkpoint=True)
    _assert_same_continuation((trainer, callback), (full_trainer, full_callback), 8)


def test_resume_from_elsewhere_after_a_reallocation(full_run, tmp_path):
    # Step 4's checkpoint, one step after re-allocation 3, resumed into another output_dir.
    out, full_trainer, full_callback = full_run
    checkpoint = str(out / "checkpoint-4")
    with pytest.raises(FileNotFoundError, match="load_checkpoint"):
        _trainer(tmp_path / "lost", GARDCallback(_config())).train(resume_from_checkpoint=checkpoint)
    callback = GARDCallback(_config())
    trainer = _trainer(tmp_path / "elsewhere", callback)
    callback.load_checkpoint(checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)
    _assert_same_continuation((trainer, callback), (full_trainer, full_callback), 4)


def test_checkpoint_weights_load_at_their_ranks(full_run):
    # Step 12's checkpoint has rank-0 layers (zero-size factors); the pre-hook resizes on load.
    out, _, full_callback = full_run
    assert 0 in full_callback.gard.manager.ranks
    callback = GARDCallback(_config())
    model = callback.prepare(tiny_llama())
    result = model.load_state_dict(load_file(out / "checkpoint-12" / "model.safetensors"), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    assert callback.gard.manager.ranks == full_callback.gard.manager.ranks
    for mine, theirs in zip(callback.gard.lora_parameters(), full_callback.gard.lora_parameters()):
        torch.testing.assert_close(mine, theirs.detach())
