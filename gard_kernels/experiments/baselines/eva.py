"""EVA (Paischer et al., 2024) through PEFT: A from activation singular vectors, ranks by explained variance."""
from __future__ import annotations

import torch

from ..method import MethodRun
from .fixed_rank import FixedRankMethod, trim_to_budget
from .uniform import uniform_ranks


class EvaMethod(FixedRankMethod):
    """EVA through PEFT's `get_eva_state_dict`: A = top right-singular vectors of each layer's
    input activations, B = 0, ranks redistributed by explained variance.

    EVA budgets ranks: PEFT spreads Σ r_l units over the layers by explained variance, at most
    rho * r_l per layer (rho = 2, PEFT's default). The starting r_l are uniform LoRA's ranks
    under the same budget and bounds (so at tight budgets only uniform's modules take part).
    Moving a unit between modules of different d_in + d_out changes the parameter count, so
    units are then removed (the layer's least-variance component first, from the layer furthest
    above its starting rank) until the count is within the budget; metrics report the real count.
    The run's batches, in order, feed PEFT's incremental SVD until its convergence test passes
    (cycled if it needs more); it reads activations only (forward passes, no gradients).
    """

    RHO = 2.0

    def __init__(self, run: MethodRun):
        super().__init__(run)
        self.start, _ = uniform_ranks(self.manager.costs, self.manager.caps, self.budget, self.r_max)
        self.details = {"rho": self.RHO, "start_ranks": self.plan(self.start)}

    def prepare(self, batches, loss_fn, progress=False):
        components = self._eva_components(batches, progress)
        eva = [0 if u is None else int(u.shape[0]) for u in components]
        caps = [min(r, self.r_max, cap) for r, cap in zip(eva, self.manager.caps)]
        final = trim_to_budget(caps, self.manager.costs, self.budget, [r - p for r, p in zip(caps, self.start)], 0)
        for layer, rank, u in zip(self.manager.layers, final, components):
            layer.resize(rank, generator=self.generator)
            if rank:
                with torch.no_grad():
                    layer.lora_A.copy_(u[:rank].to(layer.lora_A.dtype))
        self.details.update({"eva_ranks": self.plan(eva), "plan": self.plan(final)})

    def _eva_components(self, batches, progress: bool) -> list:
        """PEFT's EVA components ([r_l, d_in] or None) of every adapted module, in model order."""
        from peft import EvaConfig, LoraConfig
        from peft.tuners.lora.eva import get_eva_state_dict

        targets = {f"{name}.base": rank for name, rank in zip(self.manager.names, self.start) if rank > 0}
        config = LoraConfig(
            r=max(targets.values()),
            target_modules=list(targets),
            rank_pattern=dict(targets),
            init_lora_weights="eva",
            eva_config=EvaConfig(rho=self.RHO),
        )
        # The run's batches in order: PEFT's incremental SVD stops at convergence, and fresh
        # batches (rather than the first M cycled) let it converge on the data, not on repeats.
        device = next(self.model.parameters()).device
        loader = [{"input_ids": batch.to(device)} for batch in batches]
        with torch.no_grad():
            state = get_eva_state_dict(self.model, loader, peft_config=config, show_progress_bar=progress)
        return [state.get(f"{name}.base") for name in self.manager.names]
