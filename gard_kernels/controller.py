"""GARD: static and dynamic gradient-spectral rank allocation around a user's training loop.

Data flows one way each step: the layers' backward passes write sketches into the ring (capture),
`step()` closes the slot, and at a re-allocation the window's Gram spectra give effective ranks,
scores, integer ranks under the budget, and resizes of the adapters and the optimizer state.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from . import checkpoint, distributed, fsdp
from .allocate import allocate_ranks
from .config import CHECKED_GROW_INITS, DEFAULT_SCORES, GARDConfig, default_r_max
from .lora.capture import CaptureHandle
from .lora.layer import adapter_shape, learning_rate
from .lora.manager import LoRAManager, find_targets
from .lora.optim_state import check_optimizer_supported, check_remappable, track_new_directions
from .lora.scaling import RankScaling
from .marginal_gain import GAIN_SCORES, allocate_marginal
from .ring import SketchRing
from .schedule import make_schedule
from .scores import LAYER_SCORES, ScoreWindow
from .sketch import GradientSketch
from .sketch.hashing import mix32
from .spectra import equalize_valid_slots, gram_eigenvalues, spectral_scores

# Sentinel of an exhausted batch iterator in profile().
_EXHAUSTED = object()
# Refused before a profile takes a batch and before a grow (the message names both).
_GORA_NEEDS_OPTIMIZER = (
    "grow_init={!r} takes one gradient step of the optimizer's learning rate: attach the "
    "optimizer (gard.attach_optimizer) before profile() or the first re-allocation"
)
# Halvings of GoRA's step that grow_init="gora_safe" tries before it drops the step.
_SAFE_INIT_HALVINGS = 6
# The steps grow_init="gora_search" tries, as multiples λ of sqrt(d_in / r) (GoRA's step without a
# learning rate; its official adaptive choice tries λ <= 1, and at the q/v study's budgets it took
# 1 every time, so the grid reaches past it): 4, 2, 1, 1/2, ..., 2^-10.
SEARCH_INIT_STEPS = tuple(2.0**-k for k in range(-2, 11))
# Extra random directions of the range finder beyond the largest growth (grow_init "gradient", "gora").
_RANGE_OVERSAMPLE = 8


def layer_seed(run_seed: int, layer_index: int) -> int:
    """Projection seed of one layer: distinct per layer, fixed for the whole run."""
    return mix32(mix32(run_seed & 0xFFFFFFFF) ^ mix32(layer_index + 1) ^ (run_seed >> 32))


class GARD:
    """Wraps a model's target modules in LoRA adapters whose ranks follow gradient spectra.

    Call `step()` once per optimizer step, after `optimizer.step()`. Like PEFT, GARD freezes every
    parameter of the model; unfreeze what else should train (a head, norms) after constructing it.

    Args:
        model: any torch model, e.g. a Hugging Face causal LM; its target modules are replaced in place.
        config: GARDConfig.
    """

    def __init__(self, model: nn.Module, config: GARDConfig):
        if not isinstance(config, GARDConfig):
            raise TypeError(f"config must be a GARDConfig, got {type(config).__name__}")
        distributed.reject_wrapped(model)
        # Collective under torch.distributed: every process must build GARD at the same point.
        distributed.check_same_config(config.to_dict())
        # Every check runs before the model is touched: a refused config leaves it exactly as it was.
        targets = find_targets(model, config.target_modules)
        distributed.reject_partitioned(targets)
        shapes = [adapter_shape(target.module) for target in targets]
        costs = [d_in + d_out for d_in, d_out in shapes]
        caps = [min(shape) for shape in shapes]
        config = _resolve_r_max(config, costs)
        _check_budget_feasible(config, [t.name for t in targets], costs, caps)
        r_init = _initial_rank(config, costs)
        _warn_unspendable(config, costs, caps)
        self.model = model
        self.config = config
        self.schedule = make_schedule(config)
        self._generator = torch.Generator().manual_seed(config.seed)
        self.optimizer: Optional[torch.optim.Optimizer] = None
        device = next(model.parameters()).device
        self.step_count = 0
        self.allocated = False  # static mode: the one allocation has happened
        # Step of the last resize that no step has yet checked the processes agree after (None: checked).
        self._resized_at: Optional[int] = None
        self._probe_halves = (0, 0)  # batches in each half of the profile (marginal-gain scores)
        self.ema_statistic: Optional[torch.Tensor] = None
        self.history: list[dict[str, Any]] = []
        self._params_sum = 0
        self._capturing = False
        self._non_finite_warned = False
        # FSDP2: nobody else reduces the adapters' gradients (fsdp.py); runs in the optimizer's step pre-hook.
        self._gradient_sync = fsdp.LoRAGradientSync(model, self.lora_parameters)
        self._optimizer_hook = None

        trainable = [(p, p.requires_grad) for p in model.parameters()]
        self.manager = None
        try:
            # Base weights get no gradients: backward computes only what the adapters and capture need.
            model.requires_grad_(False)
            self.manager = LoRAManager(model, config.target_modules, 0, config.scaling)
            # scale(r) per scaling_rule; every rule gives `scaling` at the budget's average rank.
            rank_scaling = RankScaling(config.scaling, config.scaling_rule, _reference_rank(config, costs, caps))
            for layer in self.manager.layers:
                layer.rank_scaling = rank_scaling
            self.ring = SketchRing(len(self.manager), config.window, config.k_in * config.k_out, device=device)
            self.handles = []
            for index, layer in enumerate(self.manager.layers):
                sketch = GradientSketch(
                    layer.d_in, layer.d_out, config.k_in, config.k_out, seed=layer_seed(config.seed, index)
                )
                # The ring's open slot never moves: the handle sees it once, for the whole run.
                out = self.ring.current(index).view(config.k_out, config.k_in)
                handle = CaptureHandle(sketch=sketch, out=out, backend=config.backend, on_new_device=self._follow_device)
                layer.capture = handle
                self.handles.append(handle)
            for layer in self.manager.layers:
                layer.resize(min(r_init, layer.d_in, layer.d_out), generator=self._generator)
            self._set_capture(self._capture_due(0))
        except BaseException:
            if self.manager is not None:
                self.manager.unwrap()
            for param, flag in trainable:
                param.requires_grad_(flag)
            raise
        _guard_foreign_optimizer_steps(self)

    def _follow_device(self, device: torch.device) -> None:
        """The model moved after GARD was built (e.g. a Trainer's model.to("cuda")): move the ring
        and the smoothed statistic to its device and re-point every handle at the ring."""
        self.ring.to(device)
        for index, handle in enumerate(self.handles):
            handle.buffer = self.ring.current(index).view(self.config.k_out, self.config.k_in)
        if self.ema_statistic is not None:
            self.ema_statistic = self.ema_statistic.to(device)

    @property
    def names(self) -> list[str]:
        return self.manager.names

    @property
    def ranks(self) -> dict[str, int]:
        """Current rank of every adapted module, by full module name."""
        return dict(zip(self.manager.names, self.manager.ranks))

    @property
    def num_lora_params(self) -> int:
        """Active LoRA parameters now: sum r * (d_in + d_out)."""
        return self.manager.num_params()

    @property
    def lora_params_mean(self) -> float:
        """Mean of num_lora_params over the optimizer steps taken so far (the current value before any)."""
        return self._params_sum / self.step_count if self.step_count else float(self.num_lora_params)

    def lora_parameters(self) -> list[nn.Parameter]:
        """Every LoRA factor (rank-0 ones included), to hand to the optimizer."""
        return self.manager.parameters()

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer whose state follows the adapters through resizes.

        Raises:
            ValueError: it does not hold every LoRA factor.
            TypeError: its state could not follow a rank change (factored or quantised state such
                as Adafactor's or 8-bit Adam's, a paged optimizer, or with a rank-dependent
                scaling_rule state GARD cannot rescale), refused now rather than at the first
                resize. Not checked in static mode once its one allocation has happened (after
                `profile()`): no resize follows it; nor before a profile that allocates while the
                optimizer holds no state for the factors (checked again at profile()).
        """
        fsdp.check_adapters_outside_fsdp(self.manager.layers)
        owned = {id(p) for p in self.lora_parameters()}
        seen = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = owned - seen
        if missing:
            raise ValueError(
                f"the optimizer does not hold {len(missing)} of GARD's {len(owned)} LoRA parameters; "
                "build it from gard.lora_parameters() (rank-0 factors included)"
            )
        if (self.config.mode != "static" or not self.allocated) and not self._allocates_before_state(optimizer):
            self._check_optimizer(optimizer)
        # Grown directions recorded in a loaded optimizer state keep their fresh-Adam treatment.
        track_new_directions(optimizer)
        self.optimizer = optimizer
        if self._optimizer_hook is not None:
            self._optimizer_hook.remove()
        # The hook holds GARD weakly: an optimizer outliving GARD must not keep it (and its global
        # foreign-optimizer hook) alive.
        ref = weakref.ref(self)

        def before_step(optimizer, args, kwargs) -> None:
            gard = ref()
            if gard is not None:
                gard._before_optimizer_step(optimizer, args, kwargs)

        self._optimizer_hook = optimizer.register_step_pre_hook(before_step)
        # First in line: the pre-hook that keeps grown directions fresh (optim_state.py) reads the
        # gradients, which must already be the reduced ones.
        hooks = getattr(optimizer, "_optimizer_step_pre_hooks", None)
        if hooks is not None and self._optimizer_hook.id in hooks:
            hooks.move_to_end(self._optimizer_hook.id, last=False)

    def _allocates_before_state(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether static mode's one allocation (gard.profile) is still to come and `optimizer`
        holds no state for the LoRA factors: the resize then has no state to carry or rescale
        (profile() checks again, in case a step came in between)."""
        return (
            self.config.mode == "static" and not self.allocated and self._needs_profile()
            and not any(param in optimizer.state for param in self.lora_parameters())
        )

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """optim_state.check_optimizer_supported for the resizes this configuration makes."""
        check_optimizer_supported(
            optimizer, self._largest_factor_shape(), rescaled=self.config.scaling_rule != "constant"
        )

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        """Step pre-hook of the attached optimizer: refuse stale parameters, reduce gradients under FSDP2."""
        self._check_parameters_current()
        self._gradient_sync.before_optimizer_step()

    def _check_parameters_current(self) -> None:
        """Raise unless the adapters are GARD's to resize and the attached optimizer holds them.

        A wrapper or `fully_shard` applied after `attach_optimizer` replaces the LoRA factors by
        new Parameter objects: an optimizer holding the old ones would step tensors the model no
        longer uses, and nothing would train.
        """
        fsdp.check_adapters_outside_fsdp(self.manager.layers)
        if self.optimizer is None:
            return
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        stale = [
            f"{layer.name}.{factor}"
            for layer in self.manager.layers
            for factor in ("lora_A", "lora_B")
            if id(getattr(layer, factor)) not in held
        ]
        if stale:
            raise RuntimeError(
                f"the attached optimizer does not hold GARD's current LoRA parameters ({len(stale)} of "
                f"{2 * len(self.manager)}, e.g. {stale[0]!r}): they were replaced after gard.attach_optimizer "
                "(by fully_shard, a wrapper, or a reload), so it trains nothing. Build the optimizer from "
                "gard.lora_parameters() after sharding / wrapping and attach it again (gard.attach_optimizer)"
            )

    def _largest_factor_shape(self) -> tuple[int, int]:
        """Shape of the largest LoRA factor a resize can make (the highest rank the bounds and the
        budget allow, by the larger side): attach_optimizer's trial parameter, so that state whose
        kind depends on the size (8-bit above bitsandbytes' min_8bit_size) shows."""
        cfg = self.config
        shapes = [
            (max(1, min(cfg.r_max, layer.d_in, layer.d_out, cfg.budget // (layer.d_in + layer.d_out))),
             max(layer.d_in, layer.d_out))
            for layer in self.manager.layers
        ]
        return max(shapes, key=lambda shape: shape[0] * shape[1])

    def step(self) -> Optional[dict[str, Any]]:
        """Close this optimizer step: store its sketches, re-allocate ranks when due.

        Returns the re-allocation record when one happened this step, else None. A step that
        raises leaves GARD as it was before the call (counters, ring, ranks), so calling it again
        after fixing the cause gives the run that was meant.
        """
        if self._needs_profile() and not self.allocated:
            needs = [f"score={self.config.score!r}"] if self.config.score in GAIN_SCORES else []
            if self._checks_init_step():
                needs.append(f"grow_init={self.config.grow_init!r}")
            what = " and ".join(needs)
            if self.config.score == DEFAULT_SCORES["static"]:
                what += " (the defaults)" if len(needs) > 1 else " (the default)"
            # Profiling in the loop needs a layer score and a start that no profile checks.
            instead = "score='update_nuclear'" if self.config.score in GAIN_SCORES else ""
            if self._checks_init_step():
                instead += (" and " if instead else "") + "grow_init='gora' (or 'zero')"
            raise RuntimeError(
                f"{what} allocates from profile batches: call gard.profile(batches) before the "
                "first optimizer step (e.g. gard.profile(itertools.islice(loader, gard.config.window))), or set "
                f"{instead} to profile inside the training loop's first `window` steps"
            )
        self._check_parameters_current()
        if self.optimizer is None and self._gradient_sync.needed():
            raise RuntimeError(
                "the model is sharded with FSDP2 and no optimizer is attached: GARD averages the adapters' "
                "gradients over the processes in the attached optimizer's step, so without it they drift apart. "
                "Call gard.attach_optimizer(optimizer) before the first optimizer step"
            )
        due = self._reallocation_due(self.step_count + 1)
        if distributed.is_distributed() and (due or self._resized_at is not None):
            self._check_replicas()
        if due and self.schedule.reinitialises_every_layer:
            # A static allocation re-initialises every layer: that always needs the optimizer.
            self._require_optimizer()
        saved = self._save_state() if due else None
        if self._capturing:
            self.ring.advance()
        self.step_count += 1
        event = None
        if due:
            try:
                event = self._reallocate(require_optimizer=True)
            except BaseException:
                self._restore_state(saved)
                raise
        self._set_capture(self._capture_due(self.step_count))
        params = self.num_lora_params
        if params > self.config.budget:
            raise RuntimeError(f"internal error: {params} LoRA parameters exceed the budget {self.config.budget}")
        self._params_sum += params
        record = {"step": self.step_count, "ranks": self.manager.ranks, "params": params}
        if event is not None and "skipped" in event:
            record["reallocation_skipped"] = event["skipped"]
            event = None
        if event is not None:
            record["reallocation"] = event
            self._resized_at = self.step_count
        self.history.append(record)
        return event

    def _check_replicas(self) -> None:
        """Under torch.distributed, raise unless every process holds the same LoRA factors.

        Data parallelism keeps them equal; a DDP wrapper built before a resize does not (it
        averages the gradients of the parameters it was built with), and the processes' adapters
        drift apart without an error. Checked at every re-allocation and at the first step after
        one (or after the profile): two float64 sums per factor, one small all-reduce.
        """
        sums = [
            value
            for layer in self.manager.layers
            for factor in (layer.lora_A, layer.lora_B)
            for value in (factor.detach().double().sum(), factor.detach().double().square().sum())
        ]
        advice = {}
        if self._resized_at is not None:
            advice["advice"] = (
                f"The adapters were resized at step {self._resized_at}: a DDP wrapper built before that still "
                "averages the old parameters' gradients only. Rebuild it whenever gard.step() returns a "
                "re-allocation (ddp = gard_kernels.distributed.rebuild_ddp(ddp)) and profile before wrapping; a "
                "framework that owns its wrapper (the Hugging Face Trainer) cannot: use static mode profiled "
                "before trainer.train(), or FSDP2 (docs/distributed.md)"
            )
        fsdp.check_replicated(torch.stack(sums).to(self.ring.device), "the checksums of GARD's LoRA factors", **advice)
        self._resized_at = None

    def _require_optimizer(self) -> None:
        if self.optimizer is None:
            raise RuntimeError(
                "GARD must resize adapters at this step but no optimizer is attached: call "
                "gard.attach_optimizer(optimizer) after creating it from gard.lora_parameters()"
            )

    def _save_state(self) -> tuple:
        """What step() and profile() change before they can fail, to put back when they do.

        The layers and their optimizer state need nothing here: a resize is all or nothing
        (_resize_layers), and it is the last thing that can fail.
        """
        return (self.step_count, self.ring.state_dict(), self.ema_statistic, self._generator.get_state(),
                self._generator_state, self._non_finite_warned, self.allocated, self._capturing)

    def _restore_state(self, saved: tuple, rearm: bool = False) -> None:
        """Undo to `saved` (_save_state). rearm: the capture handles were switched since (profile()):
        switch them back as the last public call left them, drawing the same random directions."""
        (self.step_count, ring, self.ema_statistic, generator, generator_before_arming, self._non_finite_warned,
         self.allocated, capturing) = saved
        self.ring.load_state_dict(ring)
        if rearm:
            self._generator.set_state(generator_before_arming)
            self._set_capture(capturing)
        else:
            self._generator.set_state(generator)

    def profile(self, batches: Iterable[Any], steps: Optional[int] = None, loss_fn: Optional[Callable] = None) -> dict:
        """Profiling passes without optimizer steps, then one allocation.

        Static mode: the paper's profiling phase and its one allocation. Dynamic mode: the
        starting ranks, moved as at any re-allocation. Takes exactly `steps` batches from
        `batches` and leaves every parameter's gradient as it found it. The marginal-gain
        scores pass over the same batches three times (lora/gain_probe.py), keeping them.

        Args:
            batches: iterable of model inputs (dicts are passed as keyword arguments).
            steps: number of batches to profile (default: the window M).
            loss_fn: loss_fn(model, batch) -> scalar loss; default model(**batch).loss.
        Returns:
            The allocation record (also stored in `history`).
        """
        steps = self.config.window if steps is None else steps
        self._check_profile_call(steps)
        probing = self.config.score in GAIN_SCORES
        saved = self._save_state()
        # Gradients that existed before are put back afterwards; every one profiling creates is cleared.
        # Backward accumulates into existing .grad tensors in place: keep their values to restore.
        grads = [(p, p.grad, None if p.grad is None else p.grad.clone()) for p in self.model.parameters()]
        batch_iter = iter(batches)
        kept = []  # the batches, when a later pass or check needs them again
        layers = None
        if probing:
            self._start_gain_probes(steps)
        try:
            try:
                self._profile_passes(batch_iter, steps, loss_fn, kept)
                self._average_range_finders(steps)
            finally:
                for param, grad, value in grads:
                    if grad is not None:
                        grad.copy_(value)
                    param.grad = grad
            # The check of GoRA's step comes after the resize, the last thing a refusal undoes
            # otherwise: the layers are kept to put back if it fails.
            layers = [layer.snapshot(self.optimizer) for layer in self.manager.layers] if self._checks_init_step() else None
            event = self._reallocate(require_optimizer=False, skip_junk=False)
            if layers is not None:
                # Checked on the batches the range finder did not see: the step is a gradient step
                # of the others, and would look good on them whatever its size.
                fed = self._init_gradient_batches(len(kept))
                unseen = [batch for done, batch in enumerate(kept) if done not in fed]
                event.update(self._check_init_step(unseen, loss_fn))
        except BaseException:
            # A refused profile leaves GARD as it was (the batches it took are spent).
            for handle in self.handles:
                handle.gain_probe.clear()
            for layer, snapshot in zip(self.manager.layers, layers or []):
                layer.restore(snapshot, self.optimizer)
            self._restore_state(saved, rearm=True)
            raise
        self._set_capture(self._capture_due(self.step_count))
        self.history.append({"step": self.step_count, "ranks": self.manager.ranks, "params": self.num_lora_params,
                             "reallocation": event, "profile": True})
        self._resized_at = self.step_count
        return event

    def _check_profile_call(self, steps: Any) -> None:
        """Every refusal profile() can make before it takes a batch (GARD and the caller's
        iterator stay as they are)."""
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
            raise ValueError(f"profile needs at least 2 steps to form a spectrum, got steps={steps!r}")
        self._check_parameters_current()
        if self.config.layer_grow_init == "gora" and self.optimizer is None:
            raise RuntimeError(_GORA_NEEDS_OPTIMIZER.format(self.config.grow_init))
        static_allocation = self.config.mode == "static" and not self.allocated
        if static_allocation and self.optimizer is not None and not self._allocates_before_state(self.optimizer):
            # attach_optimizer may have left it unchecked as holding no state; a step since made some.
            self._check_optimizer(self.optimizer)

    def _profile_passes(self, batch_iter, steps: int, loss_fn: Optional[Callable], kept: list) -> None:
        """Forward / backward over `steps` batches of `batch_iter`, sketching each (and, for the
        marginal-gain scores, two more passes over them); batches a later check needs go to `kept`."""
        probing = self.config.score in GAIN_SCORES
        for done in range(steps):
            # next() only as often as needed: the caller's iterator loses exactly `steps` batches.
            batch = next(batch_iter, _EXHAUSTED)
            if batch is _EXHAUSTED:
                raise ValueError(f"profile got {done} batches but needs steps={steps}; pass more batches or fewer steps")
            # A gradient-initialised grow reads the range finder of this pass (of the last pass,
            # when the gain probes pass over the batches again).
            self._set_capture(True, arm=not probing and self._range_finder_feeds(done, steps))
            self._set_probe_half(done, steps)
            loss = self._loss(batch, loss_fn)
            loss.backward()
            self.ring.advance()
            if self._needs_profile():
                kept.append(batch)
        if probing:
            self._probe_again(kept, loss_fn)

    def _loss(self, batch: Any, loss_fn: Optional[Callable]) -> torch.Tensor:
        return loss_fn(self.model, batch) if loss_fn is not None else self.model(**batch).loss

    def _checks_init_step(self) -> bool:
        return self.config.grow_init in CHECKED_GROW_INITS

    def _needs_profile(self) -> bool:
        """Whether the allocation needs the profile batches (gard.profile), not just the training steps."""
        return self.config.score in GAIN_SCORES or self._checks_init_step()

    def _init_gradient_batches(self, steps: int) -> range:
        """The profile batches whose gradient a gradient-initialised grow starts from: the last
        one, or every one but the first ("gora_mean"); a checked start is checked on the others."""
        return range(1, steps) if self.config.grow_init == "gora_mean" else range(steps - 1, steps)

    def _range_finder_feeds(self, done: int, steps: int) -> Union[bool, str]:
        """What profile batch `done` of `steps` does to the range finder (_set_capture's `arm`):
        armed afresh at the first of _init_gradient_batches, kept armed ("keep") through the rest."""
        fed = self._init_gradient_batches(steps)
        if not self._grows_from_gradient() or done not in fed:
            return False
        return True if done == fed[0] else "keep"

    def _average_range_finders(self, steps: int) -> None:
        """The range finders summed the gradients of _init_gradient_batches; GoRA's step is one
        step of their mean (each batch's loss is already a mean over its tokens)."""
        count = len(self._init_gradient_batches(steps))
        for handle in self.handles:
            if count > 1 and handle.range_finder.armed:
                for total in handle.range_finder.sums:
                    total.div_(count)

    @torch.no_grad()
    def _check_init_step(self, kept: list, loss_fn: Optional[Callable]) -> dict:
        """The checked starts: how much of GoRA's initial B to keep, from the mean loss over `kept`
        (the profile batches the step's gradient did not come from; under torch.distributed, over
        every process's), compared with B = 0 (the output of a "gradient" or "zero" init). Only B
        changes (its optimizer state is still zero after the re-initialisation).

        "gora_safe" / "gora_mean": every B scaled by t in 1, 1/2, ..., 1/64; the first t that is
        no worse than t = 0 is kept, else 0. Returns {"init_step_scale": t}.
        "gora_search": the step η = λ sqrt(d_in / r) of each layer for λ in SEARCH_INIT_STEPS,
        whatever the learning rate; the λ with the lowest loss is kept if below t = 0's, else 0.
        Returns {"init_step_lambda": λ}.
        """
        layers = [layer for layer in self.manager.layers if layer.rank > 0]
        # B of GoRA's step at the learning rate of the layer's param group (LoRALayer._grow).
        full = [layer.lora_B.detach().clone() for layer in layers]

        def set_b(scales: list) -> None:
            for layer, b, scale in zip(layers, full, scales):
                layer.lora_B.data.copy_(b * scale)

        def loss_at(scales: list) -> float:
            set_b(scales)
            total = 0.0
            for batch in kept:
                loss = self._loss(batch, loss_fn)
                total += float(loss)
            # Under torch.distributed: the mean over every process's batches, so all keep one step.
            return distributed.mean_of_scalar(total / max(len(kept), 1), self.ring.device)

        start = loss_at([0.0] * len(layers))
        if self.config.grow_init == "gora_search":
            # λ sqrt(d_in / r) is λ / lr times the B above, whatever each layer's rate.
            rates = [learning_rate(self.optimizer, layer.lora_B) for layer in layers]
            best, best_loss = 0.0, start
            for lam in SEARCH_INIT_STEPS:
                loss = loss_at([lam / rate for rate in rates])
                if loss < best_loss:
                    best, best_loss = lam, loss
            set_b([best / rate for rate in rates])
            return {"init_step_lambda": best}
        for t in (2.0**-k for k in range(_SAFE_INIT_HALVINGS + 1)):
            if loss_at([t] * len(layers)) <= start:
                return {"init_step_scale": t}
        set_b([0.0] * len(layers))
        return {"init_step_scale": 0.0}

    def _start_gain_probes(self, steps: int) -> None:
        """Start every layer's gain probe with min(r_max, cap) + oversampling columns."""
        # Its own stream: the run's generator draws exactly what it draws without the probes.
        generator = torch.Generator().manual_seed(layer_seed(self.config.seed, len(self.handles)))
        for layer, handle in zip(self.manager.layers, self.handles):
            width = min(self.config.r_max, layer.d_in, layer.d_out) + _RANGE_OVERSAMPLE
            handle.gain_probe.start(width, generator)
        self._probe_halves = (steps // 2, steps - steps // 2)

    def _set_probe_half(self, done: int, steps: int) -> None:
        if self.config.score in GAIN_SCORES:
            for handle in self.handles:
                handle.gain_probe.set_half(0 if done < steps // 2 else 1)

    def _probe_again(self, kept: list, loss_fn: Optional[Callable]) -> None:
        """Passes 2 and 3 of the gain probes over the profile batches, sketches off; the range
        finder of a gradient-initialised grow is armed on the last batch of the last pass.
        Under torch.distributed each pass is averaged over the processes before the next one
        derives its bases, and the last before gains() (a no-op on one process)."""
        probes = [handle.gain_probe for handle in self.handles]
        for last_pass in (False, True):
            distributed.reduce_gain_probes(probes, self.ring.device)
            for handle in self.handles:
                handle.gain_probe.next_pass()
            for done, batch in enumerate(kept):
                self._set_capture(False, arm=last_pass and self._range_finder_feeds(done, len(kept)))
                self._set_probe_half(done, len(kept))
                loss = self._loss(batch, loss_fn)
                loss.backward()
        distributed.reduce_gain_probes(probes, self.ring.device)
        for handle in self.handles:
            handle.gain_probe.stop()

    def _unit_gains(self) -> list[list[float]]:
        """Per layer, the cross-fitted gains of its rank units (power per score), best first."""
        power = GAIN_SCORES[self.config.score]
        poisoned = [layer.name for layer, handle in zip(self.manager.layers, self.handles) if not all(handle.gain_probe.finite)]
        if poisoned:
            # A probe sums every batch of its half: one non-finite gradient leaves it nothing to
            # measure (zero gains, so rank 0 everywhere), unlike the sketches, which skip the step.
            raise ValueError(
                f"score={self.config.score!r} needs finite gradients on every profile batch: {len(poisoned)} "
                f"layer(s) saw NaN or Inf (first: {poisoned[0]}); find what makes the loss non-finite "
                "(learning rate, precision, data), then call profile() again with finite batches"
            )
        gains = []
        for handle in self.handles:
            gains.append([float(g) ** power for g in handle.gain_probe.gains(self._probe_halves)])
            handle.gain_probe.clear()
        return gains

    def _grows_from_gradient(self) -> bool:
        return self.config.layer_grow_init in ("gradient", "gora")

    def _range_width(self) -> int:
        """Columns of the range finder: the most directions one layer can gain at once, plus slack.

        Static mode re-initialises every layer at its new rank (up to r_max); a dynamic move
        adds at most delta_max.
        """
        return self.schedule.most_growth() + _RANGE_OVERSAMPLE

    def _reallocation_due(self, t: int) -> bool:
        """Whether ranks are re-allocated when the optimizer step count reaches t."""
        return self.schedule.reallocation_due(t, self.allocated)

    def _capture_due(self, t: int) -> bool:
        """Whether the step that runs next (index t, 0-based) must write sketches."""
        if self.manager.num_params() == 0:
            # Every rank is 0 (tight budgets start so): nothing trains, and only capture keeps the
            # backward pass running and the spectra fresh, so that layers can grow.
            return True
        return self.schedule.capture_due(t, self.allocated)

    def _set_capture(self, on: bool, arm: Optional[Union[bool, str]] = None) -> None:
        """Switch capture on or off for the step that runs next.

        arm: whether the range finder accumulates this step (grow_init="gradient"; armed afresh),
        "keep" to leave it as it is (still accumulating if armed); default: only on the last step
        before a re-allocation.
        """
        # The last generator draws of every public call happen here (arming the range finder);
        # state_dict() saves the state from before them, so a resumed run re-arms identically.
        self._generator_state = self._generator.get_state()
        self._capturing = on
        for handle in self.handles:
            handle.enabled = on
        if self._grows_from_gradient():
            if arm is None:
                arm = on and self._reallocation_due(self.step_count + 1)
            for handle in self.handles:
                if arm == "keep":
                    continue
                if arm:
                    handle.arm_range_finder(self._range_width(), self._generator)
                else:
                    handle.disarm()

    def _reallocate(self, require_optimizer: bool, skip_junk: bool = True) -> dict[str, Any]:
        """Allocate from the window. Too few finite steps: dynamic mode with skip_junk returns
        {"skipped": why} and changes nothing; otherwise ValueError."""
        cfg = self.config
        sketches, valid = self.ring.window_sketches()
        # Under torch.distributed: the window of the global gradient (a no-op on one process).
        sketches, valid = distributed.reduce_window(sketches, valid)
        junk = self._junk_window(valid)
        if junk is not None:
            return self._skip_or_refuse(junk, skip_junk)
        distributed.reduce_range_finders([h.range_finder for h in self.handles], self.ring.device)
        found = valid.sum(dim=1).cpu()
        # Every layer is scored on the same number of sketches: effective ranks are bounded by it.
        valid = equalize_valid_slots(valid)
        eigs = gram_eigenvalues(sketches, valid).cpu()
        valid = valid.cpu()
        invalid = int(self.ring.num_invalid)
        if invalid and not self._non_finite_warned:
            warnings.warn(
                f"GARD discarded {invalid} non-finite sketch slot(s) (overflowing or NaN gradients); "
                "spectra use the finite steps only",
                RuntimeWarning,
                stacklevel=3,
            )
            self._non_finite_warned = True
        old = self.manager.ranks
        window = ScoreWindow(sketches.cpu(), valid, eigs, cfg.k_out, cfg.k_in, cfg.alpha, cfg.measure, self._generator)
        statistic, target, extra = self._target_ranks(window, old)
        self.ema_statistic = statistic
        scores = spectral_scores(statistic)
        new = self.schedule.limit(old, target, self.manager.costs, cfg.budget)
        changed = self.schedule.layers_to_resize(old, new)
        if changed and require_optimizer:
            self._require_optimizer()
        discarded = self._resize_layers(changed, new)
        self.allocated = True
        return {
            "step": self.step_count,
            "old_ranks": old,
            "target_ranks": target,
            "ranks": new,
            "statistic": statistic.tolist(),
            "scores": scores.tolist(),
            "eigenvalues": eigs.tolist(),
            "valid_slots": found.tolist(),
            "scored_slots": valid.sum(dim=1).tolist(),
            "invalid_total": invalid,
            "params": self.manager.num_params(new),
            "discarded_update_norm": discarded,
            **extra,
        }

    def _skip_or_refuse(self, junk: str, skip_junk: bool) -> dict[str, Any]:
        """A window too thin to allocate from: dynamic mode (with skip_junk) skips the
        re-allocation with a warning and returns its record; otherwise ValueError."""
        if skip_junk and self.schedule.skips_thin_windows:
            message = f"GARD skipped the re-allocation at step {self.step_count}: {junk}; the ranks stay as they are"
            warnings.warn(message, RuntimeWarning, stacklevel=4)
            return {"step": self.step_count, "skipped": message}
        retry = (
            "then allocate from finite batches with gard.profile(batches)" if skip_junk
            else "then call profile() again with finite batches"
        )
        raise ValueError(
            f"GARD cannot allocate ranks at step {self.step_count}: {junk}. Find what makes the loss "
            f"non-finite (learning rate, precision, data), {retry}; GARD is as it was before the call"
        )

    def _junk_window(self, valid: torch.Tensor) -> Optional[str]:
        """Why the window's [L, M] validity is too thin to allocate from, or None when it is enough.

        A step counts when any layer's sketch of it is finite: a NaN / Inf loss leaves none.
        """
        filled = min(self.config.window, self.ring.steps)
        required = self.config.required_valid_steps(filled)
        finite = int(valid.any(dim=0).sum())
        if finite >= required:
            return None
        return (
            f"only {finite} of the window's {filled} step(s) had finite gradients (the others had NaN or Inf "
            f"losses or gradients), and an allocation needs at least {required} (GARDConfig.min_valid_steps)"
        )

    def _target_ranks(self, window: ScoreWindow, old: list[int]) -> tuple[torch.Tensor, list[int], dict[str, Any]]:
        """(per-layer statistic, target ranks, extra record fields) of this re-allocation."""
        cfg = self.config
        bounds = dict(r_min=cfg.r_min, r_max=cfg.r_max, caps=self.manager.caps)
        if cfg.score in GAIN_SCORES:
            # Marginal gain: each rank unit has its own worth; a layer's statistic is their sum.
            gains = self._unit_gains()
            statistic = torch.tensor([sum(g) for g in gains], dtype=torch.float64)
            return statistic, allocate_marginal(gains, self.manager.costs, cfg.budget, **bounds), {"gains": gains}
        statistic = self.schedule.smooth(self.ema_statistic, LAYER_SCORES[cfg.score](window))
        current, dead_band = self.schedule.hysteresis(old, self.allocated)
        target = allocate_ranks(
            spectral_scores(statistic).tolist(), self.manager.costs, cfg.budget, **bounds,
            current=current, dead_band=dead_band,
        )
        return statistic, target, {}

    def _resize_layers(self, changed: list[int], new: list[int]) -> float:
        """Resize layers `changed` to ranks `new`, all or nothing; returns the discarded update norm.

        Everything that can refuse (optimizer state, an unarmed range finder) is checked for every
        layer first; an unexpected error half-way restores the layers, their optimizer state and
        the generator to how they were.
        """
        cfg = self.config
        layers = [self.manager.layers[i] for i in changed]
        for layer in layers:
            check_remappable(self.optimizer, (layer.lora_A, layer.lora_B))
        start = {i: self.schedule.start_rank(layer) for i, layer in zip(changed, layers)}
        if self._grows_from_gradient():
            for i, layer in zip(changed, layers):
                if new[i] > start[i] and not layer.capture.armed:
                    raise RuntimeError(
                        f"grow_init={cfg.grow_init!r} must grow {layer.name!r} but its range finder was not armed "
                        "by the capture before this re-allocation"
                    )
        grows = any(new[i] > start[i] for i in changed)
        if cfg.layer_grow_init == "gora" and grows and self.optimizer is None:
            raise RuntimeError(_GORA_NEEDS_OPTIMIZER.format(self.config.grow_init))
        snapshots = [layer.snapshot(self.optimizer) for layer in layers]
        generator_state = self._generator.get_state()
        discarded = 0.0
        try:
            for i, layer in zip(changed, layers):
                discarded += self.schedule.resize(layer, new[i], self.optimizer, self._generator)
        except BaseException:
            for layer, snapshot in zip(layers, snapshots):
                layer.restore(snapshot, self.optimizer)
            self._generator.set_state(generator_state)
            raise
        return discarded

    def save_pretrained(self, path, task_type: Optional[str] = None) -> dict[str, Any]:
        """Write the adapters as a standard PEFT LoRA adapter directory; see checkpoint.save_peft_adapter
        (collective under torch.distributed: process 0 writes)."""
        return checkpoint.save_peft_adapter(self, path, task_type)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path, config: Optional[GARDConfig] = None) -> "GARD":
        """Wrap `model` with the adapters of a PEFT LoRA adapter directory, to continue training;
        see checkpoint.gard_from_peft_adapter."""
        return checkpoint.gard_from_peft_adapter(cls, model, path, config)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run; see checkpoint.run_state (collective under
        torch.distributed; fixed-shape tensors for torch.distributed.checkpoint)."""
        return checkpoint.run_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict() of the same model and config into the live adapters; load the
        optimizer's state afterwards. See checkpoint.load_run_state."""
        checkpoint.load_run_state(self, state)


def _resolve_r_max(cfg: GARDConfig, costs: list[int]) -> GARDConfig:
    """cfg with r_max=None replaced by its budget-scaled value, checked against r_init."""
    if cfg.r_max is None and cfg.r_init is not None and cfg.r_init > default_r_max(cfg.budget, costs):
        raise ValueError(
            f"r_init={cfg.r_init} is above r_max={default_r_max(cfg.budget, costs)}, which r_max=None resolves to at budget "
            f"{cfg.budget} (max(8, 4 x the average rank {cfg.budget} // {sum(costs)})); set r_max >= {cfg.r_init} "
            "or lower r_init"
        )
    return cfg.with_resolved_r_max(costs)


def _reachable_params(cfg: GARDConfig, costs: list[int], caps: list[int]) -> int:
    """The most parameters the rank bounds let GARD spend: every layer at min(r_max, min(d_in, d_out))."""
    return sum(min(cfg.r_max, cap) * cost for cost, cap in zip(costs, caps))


def _reference_rank(cfg: GARDConfig, costs: list[int], caps: list[int]) -> float:
    """r_ref of scale(r): the average rank of the budget GARD can spend, min(budget, reachable) / Σ cost.
    A budget beyond the rank bounds must not raise the scale of ranks that can never reach it."""
    return min(cfg.budget, _reachable_params(cfg, costs, caps)) / sum(costs)


# Share of the budget that the rank bounds may leave out of reach before GARD warns.
_UNSPENDABLE_SHARE = 0.10


def _warn_unspendable(cfg: GARDConfig, costs: list[int], caps: list[int]) -> None:
    """Warn when r_max (and the layers' sizes) keep a meaningful part of the budget from being spent."""
    reachable = _reachable_params(cfg, costs, caps)
    if reachable >= (1.0 - _UNSPENDABLE_SHARE) * cfg.budget:
        return
    enough = next(
        (r for r in range(cfg.r_max + 1, max(caps) + 1)
         if sum(min(r, cap) * cost for cost, cap in zip(costs, caps)) >= cfg.budget),
        None,
    )
    if cfg.r_max >= max(caps):
        why = f"the {len(costs)} target layers at full rank (min(d_in, d_out) each) hold no more; lower the budget"
    else:
        why = f"r_max={cfg.r_max} (and min(d_in, d_out) per layer) bounds the ranks of the {len(costs)} target layers; " + (
            f"raise r_max to {enough} to make the whole budget reachable, or lower the budget"
            if enough is not None else "lower the budget"
        )
    warnings.warn(
        f"GARD can spend at most {reachable} of the budget {cfg.budget} ({100.0 * reachable / cfg.budget:.0f} %): {why}",
        UserWarning,
        stacklevel=3,
    )


# Every live GARD, held weakly, and the one global optimizer step pre-hook that checks them.
_LIVE_GARDS: "weakref.WeakSet[GARD]" = weakref.WeakSet()
_FOREIGN_STEP_HOOK = None


def _guard_foreign_optimizer_steps(gard: GARD) -> None:
    """Refuse, with GARD's message, a step of an optimizer that holds GARD's LoRA factors but is
    not the attached one: only the attached optimizer's state follows a resize, so the other's
    state has the old shapes (torch would fail later with a broadcast error, or train wrongly).

    One global optimizer step pre-hook for all GARDs, registered once: a hook per GARD removed
    at its collection would change torch's hook table while a step iterates over it.
    """
    global _FOREIGN_STEP_HOOK
    _LIVE_GARDS.add(gard)
    if _FOREIGN_STEP_HOOK is None:
        _FOREIGN_STEP_HOOK = register_optimizer_step_pre_hook(_refuse_foreign_step)


def _refuse_foreign_step(optimizer, args, kwargs) -> None:
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for gard in list(_LIVE_GARDS):
        attached = gard.optimizer
        # The attached optimizer, or a wrapper sharing its state (accelerate's AcceleratedOptimizer).
        if attached is None or optimizer.state is attached.state:
            continue
        if any(id(p) in stepped for p in gard.lora_parameters()):
            kind = type(attached).__name__
            del gard  # the traceback must not keep GARD alive
            raise RuntimeError(
                f"this {type(optimizer).__name__} holds GARD's LoRA parameters but is not the optimizer "
                f"attached with gard.attach_optimizer (a {kind}); only the attached optimizer's state "
                "follows GARD's rank changes. Step the attached optimizer, or attach this one with "
                "gard.attach_optimizer(optimizer)"
            )


def _initial_rank(cfg: GARDConfig, costs: list[int]) -> int:
    cost = sum(costs)
    if cfg.r_init is not None:
        if cfg.r_init * cost > cfg.budget:
            raise ValueError(
                f"r_init={cfg.r_init} on all {len(costs)} layers costs {cfg.r_init * cost} parameters, "
                f"over the budget {cfg.budget}; lower r_init (or leave it None to fit automatically)"
            )
        return cfg.r_init
    return max(cfg.r_min, min(cfg.r_max, cfg.budget // cost))


def _check_budget_feasible(cfg: GARDConfig, names: list[str], costs: list[int], caps: list[int]) -> None:
    r_min = cfg.r_min
    small = [(name, cap) for name, cap in zip(names, caps) if cap < r_min]
    if small:
        raise ValueError(
            f"r_min={r_min} exceeds min(d_in, d_out) of {len(small)} adapted layer(s), e.g. {small[0][0]!r} "
            f"({small[0][1]}); lower r_min to {min(cap for _, cap in small)} or leave those modules out of target_modules"
        )
    cheapest = min(range(len(costs)), key=costs.__getitem__)
    if costs[cheapest] > cfg.budget:
        raise ValueError(
            f"budget {cfg.budget} is below the cost of rank 1 on the cheapest adapted layer, {names[cheapest]!r} "
            f"(d_in + d_out = {costs[cheapest]}): no layer could ever train; raise the budget to at least "
            f"{costs[cheapest]}"
        )
    floor = r_min * sum(costs)
    if floor > cfg.budget:
        raise ValueError(
            f"budget {cfg.budget} is below r_min * sum(d_in + d_out) = {floor} for "
            f"{len(costs)} adapted layers; raise the budget to at least {floor} or lower r_min"
        )
