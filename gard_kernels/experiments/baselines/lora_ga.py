"""LoRA-GA (Wang et al., 2024, arXiv:2407.05000) through PEFT: gradient-aligned initialisation at
uniform LoRA's ranks."""
from __future__ import annotations

from ...lora.layer import adapter_shape
from ...lora.manager import match_target_modules
from ..method import Method, MethodRun
from .fixed_rank import method_r_max
from .gradient_profile import mean_weight_gradients
from .uniform import uniform_ranks


class LoraGaMethod(Method):
    """PEFT's LoRA with `init_lora_weights="lora_ga"`, at uniform LoRA's ranks.

    The strongest "initialisation only" baseline: every module keeps uniform LoRA's rank (same
    budget, same bounds, `uniform_ranks`), and A, B start from the SVD of the module's mean
    gradient over the run's first `window` batches (PEFT's LoraGAConfig defaults: direction
    "ArB2r", scale "stable", gamma 16), with W - scaling B A so the model starts where the base
    model is. lora_alpha = scaling * r, so PEFT's alpha / r equals GARD's constant `scaling`.

    PEFT's recipe profiles before `get_peft_model`; the training loop builds the optimizer from
    the adapter's parameters before prepare(), so this wraps the model first (B = 0, so the
    gradient of W is the base model's) and lets PEFT's `lora_ga_init` rewrite the same
    parameters in place once the gradients are known.
    """

    def __init__(self, run: MethodRun):
        from peft import LoraConfig, get_peft_model

        self.name, self.budget = run.name, run.budget
        settings = run.settings
        self.names = match_target_modules(run.model, settings.value("target_modules", run.name))
        shapes = [adapter_shape(run.model.get_submodule(name)) for name in self.names]
        costs = [d_in + d_out for d_in, d_out in shapes]
        caps = [min(shape) for shape in shapes]
        plan, fallback = uniform_ranks(costs, caps, run.budget, method_r_max(run, costs))
        if not any(plan):
            raise ValueError(f"{run.name}: budget {run.budget} is below one rank unit of every target module")
        self.plan = dict(zip(self.names, plan))
        self._cost = dict(zip(self.names, costs))
        self.window = settings.value("window", run.name)
        scaling = settings.value("scaling", run.name)
        adapted = {name: rank for name, rank in self.plan.items() if rank}
        self.peft_config = LoraConfig(
            r=max(adapted.values()),
            lora_alpha=scaling * max(adapted.values()),
            target_modules=list(adapted),
            rank_pattern=dict(adapted),
            alpha_pattern={name: scaling * rank for name, rank in adapted.items()},
            lora_dropout=0.0,
        )
        self.model = get_peft_model(run.model, self.peft_config)
        self.details = {"uniform_rank": max(plan), "last_layers_fallback": fallback, "plan": dict(self.plan), "profile_batches": self.window}

    def _lora_layers(self) -> dict:
        """Adapted module name -> PEFT's LoRA layer wrapping it."""
        from peft.tuners.lora import LoraLayer

        prefix = "base_model.model."
        return {
            name[len(prefix):] if name.startswith(prefix) else name: module
            for name, module in self.model.named_modules()
            if isinstance(module, LoraLayer)
        }

    def prepare(self, batches, loss_fn, progress=False):
        from peft import LoraGAConfig

        layers = self._lora_layers()
        bases = [layer.get_base_layer() for layer in layers.values()]
        means = mean_weight_gradients(self.model, bases, batches[: self.window], loss_fn, progress, "lora-ga profiling")
        config = LoraGAConfig()
        for layer, base, grad in zip(layers.values(), bases, means):
            # PEFT reads the gradient in the weight's own layout ([d_out, d_in] for Linear).
            base._peft_loraga_grad = (grad if not layer.fan_in_fan_out else grad.T).float()
            layer.lora_ga_init("default", config)
        self.details["lora_ga"] = {"direction": config.direction, "scale": config.scale, "stable_gamma": config.stable_gamma}

    def parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def num_params(self):
        return sum(rank * self._cost[name] for name, rank in self.plan.items())

    def ranks(self):
        return dict(self.plan)
