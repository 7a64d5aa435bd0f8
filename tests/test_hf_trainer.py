"""GARDCallback in transformers.Trainer: gradient accumulation, logs, checkpoints, exact resume,
models flagged as quantized."""
import shutil

import pytest
import torch
from safetensors.torch import load_file

import gard_kernels as gk

from .models import VOCAB, tiny_llama

transformers = pytest.importorskip("transformers")
from gard_kernels.integrations import GARDCallback  # noqa: E402
from gard_kernels.lora.layer import LoRALayer  # noqa: E402

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
        budget=BUDGET, target_modules=TARGETS, mode="dynamic", window=2, interval=3, warmup=2, delta_max=2, r_max=6,
        score="random", ema=0.0, seed=4, grow_init="gradient",
    )


def _trainer(output_dir, callback, model=None, max_steps=MAX_STEPS):
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=max_steps, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, optim="adamw_torch",
        logging_steps=1, save_strategy="steps", save_steps=4, report_to=[], use_cpu=True, seed=3,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    model = tiny_llama() if model is None else model
    return transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[callback])


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
    # The linear schedule keeps driving the optimizer through every resize.
    linear = [LR * (MAX_STEPS - s) / MAX_STEPS for s in range(MAX_STEPS)]
    assert [r["learning_rate"] for r in logs] == pytest.approx(linear)
    assert [g["lr"] for g in gard.optimizer.param_groups] == pytest.approx(trainer.lr_scheduler.get_last_lr())
    for param in held:
        for value in gard.optimizer.state[param].values():
            assert not torch.is_tensor(value) or value.dim() == 0 or value.shape == param.shape
    for step in (4, 8, 12):
        assert (out / f"checkpoint-{step}" / "gard_state.pt").is_file()


def test_trainer_runs_the_recommended_defaults(tmp_path):
    """GARDConfig's defaults (static, marginal gain from a profile, GoRA's step checked on it at
    the Trainer's learning rate, rsLoRA's scale) through the Trainer: one allocation before the
    first step, none after, budget held."""
    callback = GARDCallback(gk.GARDConfig(budget=BUDGET, target_modules=TARGETS))
    trainer = _trainer(tmp_path, callback, max_steps=6)
    trainer.train()
    gard = callback.gard
    assert (gard.config.mode, gard.config.score, gard.config.grow_init, gard.config.scaling_rule) == (
        "static", "marginal_gain", "gora_safe", "rslora"
    )
    assert gard.history[0].get("profile") and gard.history[0]["step"] == 0
    assert 0.0 <= gard.history[0]["reallocation"]["init_step_scale"] <= 1.0
    assert not [r for r in gard.history[1:] if "reallocation" in r]
    assert gard.step_count == 6 and all(r["params"] <= BUDGET for r in gard.history)
    assert gard.num_lora_params > 0 and all(p.isfinite().all() for p in gard.lora_parameters())


def test_trainer_runs_static_profiling_inside_the_loop(tmp_path):
    """A layer score and GoRA's start (which needs the Trainer's optimizer and learning rate):
    the first `window` training steps are the profile, one allocation after them."""
    callback = GARDCallback(gk.GARDConfig(budget=BUDGET, target_modules=TARGETS, score="update_nuclear", grow_init="gora"))
    trainer = _trainer(tmp_path, callback, max_steps=6)
    trainer.train()
    gard = callback.gard
    events = [r["reallocation"]["step"] for r in gard.history if "reallocation" in r]
    assert events == [gard.config.window]
    assert all(r["params"] <= BUDGET for r in gard.history)
    assert gard.num_lora_params > 0 and all(p.isfinite().all() for p in gard.lora_parameters())


def test_logs_summarise_ranks_and_the_saved_state_lists_them(full_run):
    out, trainer, callback = full_run
    gard = callback.gard
    logs = _train_logs(trainer)
    summaries = []
    for record, history in zip(logs, gard.history):
        ranks = history["ranks"]
        assert record["lora_rank_min"] == min(ranks) and record["lora_rank_max"] == max(ranks)
        assert record["lora_rank_mean"] == pytest.approx(sum(ranks) / len(ranks), abs=1e-3)
        assert record["lora_rank0_layers"] == ranks.count(0)
        # A handful of numbers, not one entry per layer.
        assert not any(isinstance(value, (str, list)) for value in record.values())
        summaries.append((record["lora_rank_min"], record["lora_rank_max"], record["lora_rank0_layers"]))
    # The run moves ranks and drops layers to 0, so a summary frozen at the start would fail.
    assert len(set(summaries)) > 1 and any(count > 0 for _, _, count in summaries)
    for step in (4, 8, 12):
        saved = torch.load(out / f"checkpoint-{step}" / "gard_state.pt", weights_only=True)["gard"]
        assert saved["names"] == gard.names and len(saved["ranks"]) == len(gard.names)
        assert saved["ranks"] == gard.history[step - 1]["ranks"]
        assert [r["ranks"] for r in saved["history"]] == [r["ranks"] for r in gard.history[:step]]


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


class _TrainableQuantizer(transformers.quantizers.HfQuantizer):
    """Stands for a quantization method transformers trains adapters on (bitsandbytes-like)."""

    requires_calibration = False

    def __init__(self):
        super().__init__(transformers.utils.quantization_config.QuantizationConfigMixin("trainable-test"))

    @property
    def is_trainable(self):
        return True

    def is_serializable(self, safe_serialization=None):
        return True


def _flag_quantized(model, quantizer):
    """The attributes transformers' quantizers set on a model they load (preprocess_model)."""
    model.is_quantized = True
    model.quantization_method = quantizer.quantization_config.quant_method
    model.hf_quantizer = quantizer
    return model


def _quantized_config() -> gk.GARDConfig:
    return gk.GARDConfig(
        budget=BUDGET, target_modules=TARGETS, mode="dynamic", window=2, interval=2, score="random", ema=0.0, seed=1,
        grow_init="zero",
    )


def test_quantized_model_trains_when_wrapped_before_the_trainer(tmp_path, one_thread):
    # Wrapped only at on_init_end, the model meets transformers' check without adapters.
    with pytest.raises(ValueError, match="purely quantized"):
        _trainer(tmp_path / "late", GARDCallback(_quantized_config()), _flag_quantized(tiny_llama(), _TrainableQuantizer()))

    model = _flag_quantized(tiny_llama(), _TrainableQuantizer())
    callback = GARDCallback(_quantized_config())
    callback.prepare(model)
    assert model._hf_peft_config_loaded is True
    trainer = _trainer(tmp_path / "run", callback, model, max_steps=4)
    # After the check the flag is transformers' default again, so checkpoints hold the whole model.
    assert "_hf_peft_config_loaded" not in vars(model) and model._hf_peft_config_loaded is False
    trainer.train()
    assert callback.gard.step_count == 4 and any("reallocation" in r for r in callback.gard.history)
    checkpoint = tmp_path / "run" / "checkpoint-4"
    weights = load_file(checkpoint / "model.safetensors")
    assert "model.embed_tokens.weight" in weights
    assert {k for k in weights if k.endswith("lora_A")} == {f"{n}.lora_A" for n in callback.gard.names}

    # The checkpoint resumes into another flagged model, adapters at their saved ranks.
    resumed = GARDCallback(_quantized_config())
    other = resumed.prepare(_flag_quantized(tiny_llama(), _TrainableQuantizer()))
    result = other.load_state_dict(weights, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    assert resumed.gard.manager.ranks == callback.gard.manager.ranks


def test_quantization_that_cannot_train_is_refused_before_wrapping(tmp_path, one_thread):
    # GGUF's quantizer cannot train. transformers refuses a PeftModel on it, and the adapters
    # flag must not sneak a GARD model past that: prepare refuses it, with what to do.
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    model = _flag_quantized(tiny_llama(), GgufHfQuantizer(GgufConfig(dequantize=True)))
    callback = GARDCallback(_quantized_config())
    with pytest.raises(ValueError, match="'gguf'.*cannot train.*clear_dequantized_flags"):
        callback.prepare(model)
    assert callback.gard is None and not model._hf_peft_config_loaded
    assert not any(isinstance(m, LoRALayer) for m in model.modules())

    # The fix the message names: the de-quantized model then trains like any other.
    from gard_kernels.experiments.models import clear_dequantized_flags

    assert clear_dequantized_flags(model)
    callback.prepare(model)
    _trainer(tmp_path, callback, model, max_steps=2).train()
    assert callback.gard.step_count == 2


def test_prepare_leaves_models_that_are_not_quantized_alone(one_thread):
    model = GARDCallback(_quantized_config()).prepare(tiny_llama())
    assert "_hf_peft_config_loaded" not in vars(model) and not model._hf_peft_config_loaded


@pytest.mark.parametrize("options", [{"score": "marginal_gain", "grow_init": "zero"}, {"grow_init": "gora_safe"}])
def test_profile_only_options_profile_the_trainers_batches_before_the_first_step(tmp_path, options):
    """Marginal gain and gora_safe allocate from profile batches: the callback takes the first
    `window` of the Trainer's batches before its first step, and allocates exactly as
    gard.profile on those batches does on a fresh copy of the model."""
    config = gk.GARDConfig(budget=BUDGET, target_modules=TARGETS, **options)
    callback = GARDCallback(config)
    trainer = _trainer(tmp_path, callback, max_steps=2)
    gard = callback.gard
    profiled = []
    profile = gard.profile

    def recording(batches, **kwargs):
        taken = []

        def tee():
            for batch in batches:
                taken.append({key: value.clone() for key, value in batch.items()})
                yield batch

        record = profile(tee(), **kwargs)
        profiled.append((taken, dict(gard.ranks), record, gard.step_count))
        return record

    gard.profile = recording
    trainer.train()
    (taken, ranks, record, step_count), = profiled
    assert step_count == 0 and len(taken) == config.window
    assert all(batch["input_ids"].shape == (2, 12) for batch in taken)
    assert gard.step_count == trainer.state.global_step == 2 and gard.history[0].get("profile")
    assert all(p.shape == gard.optimizer.state[p]["exp_avg"].shape for p in gard.lora_parameters() if p.numel())

    fresh = gk.GARD(tiny_llama(), config)
    fresh.attach_optimizer(torch.optim.AdamW(fresh.lora_parameters(), lr=LR))
    expected = fresh.profile(taken)
    assert fresh.ranks == ranks and sum(ranks.values()) > 0
    assert expected.get("init_step_scale") == record.get("init_step_scale")


def test_profile_without_a_dataloader_says_what_to_call(tmp_path):
    callback = GARDCallback(gk.GARDConfig(budget=BUDGET, target_modules=TARGETS, score="marginal_gain", grow_init="zero"))
    trainer = _trainer(tmp_path, callback, max_steps=2)
    control = transformers.TrainerControl()
    with pytest.raises(ValueError, match=r"callback.gard.profile\(batches\)"):
        callback.on_train_begin(trainer.args, trainer.state, control, model=trainer.model,
                                optimizer=trainer.create_optimizer(), train_dataloader=None)
    assert callback.gard.step_count == 0 and not callback.gard.allocated


def test_profile_refuses_a_dataloader_with_fewer_batches_than_the_window(tmp_path):
    """6 samples in batches of 2 are 3 batches, one short of window=4: refused before the
    profile takes a batch (no forward pass ran), with what to change."""
    callback = GARDCallback(gk.GARDConfig(budget=BUDGET, target_modules=TARGETS))
    trainer = _trainer(tmp_path, callback, max_steps=2)
    trainer.train_dataset = _Tokens(count=6)
    forwards = []
    trainer.model.register_forward_hook(lambda *args: forwards.append(1))
    with pytest.raises(ValueError, match=r"gives 3 batches per pass.*needs window=4.*per_device_train_batch_size"):
        trainer.train()
    assert not forwards
    assert callback.gard.step_count == 0 and not callback.gard.allocated


def _training_batches(tmp_path, score):
    """First tokens of every batch the model sees in a 2-step run (the profile's passes first).
    B = 0 at the allocation: gora_safe's check would add forward passes over the profile batches."""
    callback = GARDCallback(gk.GARDConfig(budget=BUDGET, target_modules=TARGETS, score=score, grow_init="zero"))
    trainer = _trainer(tmp_path, callback, max_steps=2)
    seen = []
    trainer.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"][:, 0].tolist()), with_kwargs=True
    )
    trainer.train()
    return seen


def test_profile_pass_leaves_the_epoch_order_under_the_seedable_sampler(tmp_path):
    """The callback's own pass over the dataloader (the Trainer's default seedable sampler) gives
    the first epoch's first `window` batches, and training then sees the order a run without the
    pass sees (integrations.md says so)."""
    in_loop = _training_batches(tmp_path / "in-loop", "update_nuclear")
    profiled = _training_batches(tmp_path / "profiled", "marginal_gain")
    window, passes = 4, 3
    assert len(in_loop) == 4 and len(profiled) == passes * window + 4
    assert profiled[passes * window:] == in_loop
    assert profiled[:window] == in_loop[:window]


@pytest.mark.parametrize(
    "options, why",
    [({}, "static mode allocates"), ({"score": "update_nuclear", "grow_init": "zero"}, "static mode allocates"),
     ({"mode": "dynamic"}, "dynamic mode re-allocates")],
    ids=["profiled-static", "in-loop-static", "dynamic"],
)
def test_resizing_under_ddp_is_refused_before_the_wrapper_goes_stale(tmp_path, monkeypatch, options, why):
    """Under DDP the Trainer's wrapper exists before on_train_begin and is never rebuilt: the
    callback refuses every run that would resize the adapters under it (its own profile, an
    in-loop static allocation, dynamic re-allocation), and says what trains instead."""
    from gard_kernels import distributed

    callback = GARDCallback(gk.GARDConfig(budget=BUDGET, target_modules=TARGETS, **options))
    trainer = _trainer(tmp_path, callback, max_steps=2)
    monkeypatch.setattr(distributed, "is_distributed", lambda group=None: True)
    with pytest.raises(ValueError, match=rf"{why}.*profile\(batches\).*before trainer.train\(\), or shard with FSDP2"):
        callback.on_train_begin(trainer.args, trainer.state, transformers.TrainerControl(), model=trainer.model,
                                optimizer=trainer.create_optimizer(), train_dataloader=trainer.get_train_dataloader())
    assert not callback.gard.allocated and callback.gard.step_count == 0
