"""GARDCallback: GARD inside a Hugging Face `transformers.Trainer`, checkpoints and exact resume included.

Where each part happens, in the order `Trainer` runs:

1. Wrap: through `prepare(model)` before `Trainer(...)`, or else in `on_init_end` (the end of
   `Trainer.__init__`). Either way before `train()` builds its optimizer, so the Trainer's own
   optimizer holds every LoRA factor (rank-0 ones are zero-size parameters that require grad).
   Every other parameter is frozen, as PEFT does. A model transformers flags as quantized must
   be wrapped before: `Trainer.__init__` refuses a quantized model without adapters, and
   `prepare` marks the adapters the way transformers' own adapter loading does (see
   `_mark_adapters`), until `on_init_end` has passed the check.
2. Resume, shapes: `train(resume_from_checkpoint=...)` loads the checkpoint's model weights before
   any callback event and before it builds and loads the optimizer. A load_state_dict pre-hook on
   each adapter resizes it to the saved factor's rank, so the weights load and the optimizer
   state that follows finds parameters of its shapes.
3. Resume, controller: `on_train_begin` (before the first step) restores the rest of the
   controller (sketch ring, EMA, counters, generator, history) from `gard_state.pt` in
   `<output_dir>/checkpoint-<global_step>`, or from the directory given to `load_checkpoint`.
   Then it attaches the Trainer's optimizer, whose state follows every later resize. A
   configuration that allocates from profile batches (the marginal-gain scores, the default;
   grow_init="gora_safe") profiles here, on the first `window` batches of a pass of its own over
   the Trainer's train dataloader (refused first if the dataloader has fewer), so the first step
   already trains the allocated adapters. Under the Trainer's default seedable sampler that pass
   gives the first epoch's first batches and leaves the epochs' order as it was; with
   `accelerator_config={"use_seedable_sampler": False}` it draws a shuffle from torch's generator,
   so the epochs' order differs from a run without it.
4. Step: `on_step_end` runs once per optimizer step (after the optimizer and LR scheduler
   steps and zero_grad, whatever gradient_accumulation_steps is) and calls `gard.step()`.
   The LR scheduler keeps driving the same optimizer: a resize changes parameter shapes and
   state, never the parameter objects or param groups.
5. Save: `on_save` writes `gard_state.pt` into the checkpoint directory the Trainer just wrote
   (every process builds the state, which is collective under torch.distributed; process 0 writes it).
6. Log: `on_log` adds `lora_params` and a summary of the ranks (`lora_rank_min`,
   `lora_rank_mean`, `lora_rank_max`, `lora_rank0_layers`: how many layers have rank 0) to the
   Trainer's log record and to the logs passed on to the callbacks after this one. The rank of
   every layer is in `gard.ranks` and, per step, in the saved state (`gard_state.pt`: `ranks`,
   `names` and `history`).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Optional

import torch
from torch import nn
from transformers import TrainerCallback

from .. import distributed, fsdp
from ..config import GARDConfig
from ..controller import GARD

__all__ = ["GARDCallback", "GARD_STATE_NAME"]

GARD_STATE_NAME = "gard_state.pt"
# The attribute by which transformers knows that adapters sit on a (quantized) base model: its
# own add_adapter / load_adapter set it, and Trainer.__init__ accepts a quantized model with it.
_ADAPTERS_FLAG = "_hf_peft_config_loaded"
_UNSET = object()


class GARDCallback(TrainerCallback):
    """Runs GARD inside `transformers.Trainer`; pass it in `callbacks=[...]`.

    Args:
        config: GARDConfig of the run.

    Attributes:
        gard: the GARD controller once the model is wrapped (ranks, history, export), else None.
    """

    def __init__(self, config: GARDConfig):
        if not isinstance(config, GARDConfig):
            raise TypeError(f"config must be a GARDConfig, got {type(config).__name__}")
        self.config = config
        self.gard: Optional[GARD] = None
        # Whether prepare() set the model's adapters flag, and the model's own value before it.
        self._marked = False
        self._flag_before = _UNSET

    def prepare(self, model: nn.Module) -> nn.Module:
        """Wrap `model` now (the Trainer does it otherwise): GARD adapters, everything else frozen.

        Needed for a model that transformers flags as quantized (`Trainer(...)` refuses it
        without adapters), to build an optimizer yourself (`Trainer(optimizers=...)`), or to
        inspect the adapters before the Trainer exists. Calling it again with the same model
        wraps nothing more.

        Returns:
            The same model, wrapped in place.
        Raises:
            ValueError: the model is flagged as quantized with a method transformers cannot
                train (it refuses a PeftModel on it too).
        """
        if self.gard is not None:
            if self.gard.model is model:
                # Again before another Trainer(...): its check must see the adapters too.
                self._mark_adapters(model)
                return model
            raise ValueError("this GARDCallback already wraps another model; use one callback per model")
        _check_quantization_trains(model)
        gard = GARD(model, self.config)
        owned = {id(p) for p in gard.lora_parameters()}
        for param in model.parameters():
            if id(param) not in owned:
                param.requires_grad_(False)
        for layer in gard.manager.layers:
            layer.register_load_state_dict_pre_hook(self._resize_before_load)
        self.gard = gard
        self._mark_adapters(model)
        return model

    def load_checkpoint(self, checkpoint_dir: str | os.PathLike) -> None:
        """Restore the controller state saved in `checkpoint_dir` now.

        Resuming from `<output_dir>/checkpoint-N` (or `resume_from_checkpoint=True`) finds the state
        by itself; call this before `trainer.train(resume_from_checkpoint=checkpoint_dir)` when the
        checkpoint lives elsewhere.
        """
        self._require_gard("load_checkpoint")
        path = os.path.join(checkpoint_dir, GARD_STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no GARD state at {path}: the checkpoint was not written by a Trainer running GARDCallback"
            )
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.gard.load_state_dict(saved["gard"])

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError(
                "GARDCallback needs the model when the Trainer is built (Trainer(model=...)); "
                "model_init is not supported"
            )
        self.prepare(model)
        self._unmark_adapters(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        gard = self._require_gard("training")
        if model is not None and model is not gard.model:
            raise ValueError("the Trainer trains another model than the one GARDCallback wrapped")
        if state.global_step > 0 and gard.step_count != state.global_step:
            # Resuming: the Trainer restored its own state at global_step from the checkpoint.
            checkpoint_dir = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if not os.path.isfile(os.path.join(checkpoint_dir, GARD_STATE_NAME)):
                raise FileNotFoundError(
                    f"resuming at step {state.global_step} but {checkpoint_dir} has no {GARD_STATE_NAME}; "
                    "for a checkpoint outside output_dir call callback.load_checkpoint(path) before "
                    "trainer.train(resume_from_checkpoint=path)"
                )
            self.load_checkpoint(checkpoint_dir)
        if gard.step_count != state.global_step:
            raise ValueError(
                f"GARD is at step {gard.step_count} but the Trainer starts at step {state.global_step}; "
                "restore the matching checkpoint (callback.load_checkpoint) or use a fresh model and callback"
            )
        if optimizer is None:
            raise ValueError("GARDCallback needs the Trainer's optimizer at on_train_begin")
        optimizer = _unwrap_optimizer(optimizer)
        _check_state_shapes(optimizer, gard)
        _refuse_resizes_under_ddp(gard)
        gard.attach_optimizer(optimizer)
        if gard._needs_profile() and not gard.allocated:
            self._profile(gard, args, kwargs.get("train_dataloader"))

    def _profile(self, gard: GARD, args, train_dataloader) -> None:
        """Allocate from the first `window` batches of a pass over the Trainer's dataloader.

        The marginal-gain scores and grow_init="gora_safe" pass over their profile batches more
        than once, which the Trainer's steps cannot give: they are taken from a pass of their own,
        before the first step, with the loss `model(**batch).loss` (the Trainer's default). A
        custom `compute_loss` needs `gard.profile(batches, loss_fn=...)` before `trainer.train()`.
        A dataloader with a length below `window` is refused before any batch is taken.
        """
        if train_dataloader is None:
            raise ValueError(
                f"score={gard.config.score!r} / grow_init={gard.config.grow_init!r} allocate from profile "
                "batches and the Trainer passed no train_dataloader to take them from: call "
                "callback.gard.profile(batches) before trainer.train(), or set score='update_nuclear' and "
                "grow_init='gora' (or 'zero'), allocated from the first training steps"
            )
        _check_enough_batches(gard, train_dataloader)
        gard.profile(_on_device(batch, args.device) for batch in train_dataloader)

    def on_step_end(self, args, state, control, **kwargs):
        self.gard.step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.gard is None or logs is None:
            return
        # A summary, not one entry per layer: the full list is in the saved state.
        ranks = self.gard.manager.ranks
        extra = {
            "lora_params": self.gard.num_lora_params,
            "lora_rank_min": min(ranks),
            "lora_rank_mean": round(sum(ranks) / len(ranks), 3),
            "lora_rank_max": max(ranks),
            "lora_rank0_layers": sum(rank == 0 for rank in ranks),
        }
        logs.update(extra)
        # The Trainer stored a copy of `logs` in log_history just before this event.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, **kwargs):
        if self.gard is None:
            return
        # Collective under torch.distributed (the processes' mean ring): every process takes part.
        gard_state = self.gard.state_dict()
        if not state.is_world_process_zero:
            return
        checkpoint_dir = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(checkpoint_dir):
            warnings.warn(
                f"GARDCallback: no checkpoint directory {checkpoint_dir} (hyperparameter search?); "
                "the controller state was not saved, so this checkpoint cannot be resumed exactly",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        torch.save({"gard": gard_state}, os.path.join(checkpoint_dir, GARD_STATE_NAME))

    def _require_gard(self, what: str) -> GARD:
        if self.gard is None:
            raise RuntimeError(
                f"GARDCallback has not wrapped a model yet ({what}): pass it to Trainer(callbacks=[...]) "
                "or call callback.prepare(model) first"
            )
        return self.gard

    def _mark_adapters(self, model: nn.Module) -> None:
        """Let `Trainer.__init__` see the adapters on a model transformers flags as quantized.

        transformers refuses to fine-tune a quantized model unless it is a PeftModel or carries
        its adapters flag (prepare() has already refused methods that cannot train, as
        transformers does for a PeftModel). The flag is set only while needed: it also makes
        `model.save_pretrained` write a PEFT adapter instead of the model, and Trainer
        checkpoints must hold the GARD factors for resuming.
        """
        if not getattr(model, "is_quantized", False) or getattr(model, _ADAPTERS_FLAG, False):
            return
        self._flag_before = model.__dict__.get(_ADAPTERS_FLAG, _UNSET)
        setattr(model, _ADAPTERS_FLAG, True)
        self._marked = True

    def _unmark_adapters(self, model: nn.Module) -> None:
        """Undo `_mark_adapters` once Trainer.__init__ has checked the model."""
        if not self._marked:
            return
        if self._flag_before is _UNSET:
            # The class attribute (transformers' default, False) shows through again.
            delattr(model, _ADAPTERS_FLAG)
        else:
            setattr(model, _ADAPTERS_FLAG, self._flag_before)
        self._marked = False

    def _resize_before_load(self, layer, state_dict, prefix, *args) -> None:
        """load_state_dict pre-hook of each adapter: take the rank of the incoming factors."""
        incoming_a, incoming_b = state_dict.get(prefix + "lora_A"), state_dict.get(prefix + "lora_B")
        if incoming_a is None or incoming_b is None or incoming_a.dim() != 2 or incoming_a.shape[1] != layer.d_in:
            return
        if incoming_a.shape[0] != layer.rank:
            # The optimizer's state of the old shape would not fit; the checkpoint's replaces it.
            for param in (layer.lora_A, layer.lora_B):
                if self.gard.optimizer is not None:
                    self.gard.optimizer.state.pop(param, None)
            layer.load_factors(incoming_a, incoming_b)


def _check_quantization_trains(model: nn.Module) -> None:
    """Refuse a model flagged as quantized by a method that cannot train, as transformers does."""
    if not getattr(model, "is_quantized", False) or getattr(model, _ADAPTERS_FLAG, False):
        return
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and quantizer.is_trainable:
        return
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    method = getattr(method, "value", method)
    raise ValueError(
        f"the model is flagged as quantized (method {method!r}) and transformers cannot train that "
        "quantization, with or without adapters. If its weights are in fact floats (GGUF files load "
        "de-quantized), the flags are stale: clear them first with "
        "gard_kernels.experiments.models.clear_dequantized_flags(model)"
    )


def _refuse_resizes_under_ddp(gard: GARD) -> None:
    """Under DDP (torch.distributed without FSDP2) the Trainer wrapped the model before this
    callback runs and never rebuilds that wrapper: an adapter resized afterwards would have its
    gradients averaged no more, and the processes would drift apart. Only a static run whose one
    allocation is done (profiled before trainer.train()) trains there."""
    if not distributed.is_distributed() or fsdp.is_fully_sharded(gard.model):
        return
    if gard.config.mode == "static" and gard.allocated:
        return
    what = "dynamic mode re-allocates during training" if gard.config.mode == "dynamic" else (
        "static mode allocates at the start of training"
    )
    raise ValueError(
        f"under torch.distributed without FSDP2 the Trainer wraps the model in DDP before this callback runs, "
        f"and {what}: the resized adapters' gradients would no longer be averaged over the processes. Use "
        "static mode and call callback.gard.profile(batches) (each process its own batches) before "
        "trainer.train(), or shard with FSDP2 (docs/distributed.md)"
    )


def _check_enough_batches(gard: GARD, train_dataloader) -> None:
    """Refuse, before any batch is taken, a dataloader with fewer batches than the profile needs."""
    try:
        count = len(train_dataloader)
    except TypeError:
        return  # an iterable dataset: profile() says how many batches it got if too few
    window = gard.config.window
    if count < window:
        raise ValueError(
            f"the Trainer's train dataloader gives {count} batches per pass, and the profile of "
            f"score={gard.config.score!r} / grow_init={gard.config.grow_init!r} needs window={window} of them: "
            f"lower GARDConfig.window (at least 2), give the Trainer more data or a smaller "
            "per_device_train_batch_size, or call callback.gard.profile(batches) yourself before trainer.train()"
        )


def _on_device(batch, device):
    """A Trainer batch (a mapping of model inputs) with its tensors on `device`."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"the Trainer's batches are {type(batch).__name__}, not a mapping of model inputs: call "
            "callback.gard.profile(batches, loss_fn=...) before trainer.train()"
        )
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


def _unwrap_optimizer(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (and similar wrappers)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _check_state_shapes(optimizer, gard: GARD) -> None:
    for param in gard.lora_parameters():
        for key, value in optimizer.state.get(param, {}).items():
            # Factored states (other ranks of tensor) are refused at the first resize instead.
            if torch.is_tensor(value) and value.dim() == param.dim() and value.shape != param.shape:
                raise RuntimeError(
                    f"optimizer state {key!r} has shape {tuple(value.shape)} for a LoRA factor of shape "
                    f"{tuple(param.shape)}: the checkpoint's model weights and optimizer state disagree"
                )
