"""AdaLoRA (Zhang et al., 2023) through PEFT, its rank budget converted from our parameter budget."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ...lora.layer import adapter_shape
from ...lora.manager import is_all_linear, match_target_modules
from ..method import Method, MethodRun

# AdaLoRA's hyperparameters that do not depend on the run (PEFT's names): the EMA factors of its
# sensitivity scores, and its orthogonality penalty.
FIXED = {"deltaT": 1, "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.5}


class AdaLoraMethod(Method):
    """PEFT's AdaLoRA with its final parameter count held within our parameter budget.

    AdaLoRA budgets ranks, not parameters: after pruning it keeps `target_bgt` singular triplets
    in total, each costing d_in + d_out + 1 parameters (a column of A, a row of B, one entry of
    E). Which modules keep them is its choice, so the total rank is converted conservatively,
    target_bgt = floor(budget / max cost), so the final count is within the budget wherever the
    triplets land. The per-module average target_r of AdaLoraConfig is an int and cannot express
    e.g. 2 triplets over 60 modules, so target_bgt is set on the rank allocator directly.

    Schedule (adalora_schedule): init_r = ceil(1.5 * target_bgt / modules) (>= 1), tinit =
    steps // 5, tfinal = max(1, steps // 4) (>= 1 so the final masking happens inside the run),
    deltaT = 1, total_step = steps; update_and_allocate(step) after every optimizer step.
    lora_alpha = scaling * init_r, so its update scale alpha / r equals GARD's constant `scaling`.
    Before pruning ends it holds more than the budget: metrics report its mean and final counts.

    Option `parameter_budget` (presets.METHODS "options"; default False, the conversion above):
    PEFT's usual setting instead, target_r = the average rank the budget allows,
    round(B / Σ(d_in + d_out + 1)) (>= 1), and init_r = ceil(1.5 * target_r), with the pruning
    held to parameters rather than triplets (`mask_to_parameter_budget`): at every masking step
    PEFT's scheduled triplet count b_t becomes the parameter allowance B * b_t / target_bgt, and
    triplets are kept in PEFT's importance order while their d_in + d_out + 1 fits it. The final
    allowance is B itself, so the final count never exceeds the budget wherever triplets land,
    and none of it is lost to the conservative conversion.
    """

    OPTIONS = {"parameter_budget": False}

    def __init__(self, run: MethodRun):
        from peft import AdaLoraConfig, get_peft_model

        self.name = run.name
        options = {**self.OPTIONS, **run.options}
        if set(options) != set(self.OPTIONS):
            raise ValueError(f"{run.name}: unknown AdaLoRA option(s) {sorted(set(options) - set(self.OPTIONS))}; known: {sorted(self.OPTIONS)}")
        by_parameters = bool(options["parameter_budget"])
        target_modules = run.settings.value("target_modules", run.name)
        self.names = match_target_modules(run.model, target_modules)
        self._cost = {full: sum(adapter_shape(run.model.get_submodule(full))) + 1 for full in self.names}
        costs = list(self._cost.values())
        if by_parameters:
            if run.budget < min(costs):
                raise ValueError(f"{run.name}: budget {run.budget} is below one triplet of the cheapest module ({min(costs)} parameters)")
            total_rank = max(1, round(run.budget / sum(costs))) * len(self.names)
        else:
            total_rank = run.budget // max(costs)
            if total_rank < 1:
                raise ValueError(f"adalora: budget {run.budget} is below one triplet of the largest module ({max(costs)} parameters)")
        schedule = adalora_schedule(total_rank, len(self.names), run.steps, run.settings.value("scaling", run.name))
        peft_targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        if is_all_linear(target_modules):
            # The modules costed above: PEFT's own "all-linear" leaves the output layer out of
            # PreTrainedModels only, GARD's out of any model with get_output_embeddings.
            peft_targets = list(self.names)
        config = AdaLoraConfig(
            target_modules=peft_targets,
            target_r=1,
            lora_dropout=0.0,
            **schedule,
            **FIXED,
        )
        self.model = get_peft_model(run.model, config)
        allocator = self.model.base_model.rankallocator
        allocator.target_bgt = total_rank
        if by_parameters:
            budget = run.budget

            def mask(model, triplets):
                return mask_to_parameter_budget(allocator, model, budget * triplets / allocator.target_bgt)

            allocator.mask_to_budget = mask
        self.peft_config = config
        self.init_r = schedule["init_r"]
        self.details = {
            "total_rank_budget": total_rank,
            "triplet_costs": sorted(set(costs)),
            **{key: schedule[key] for key in ("init_r", "tinit", "tfinal")},
            "deltaT": FIXED["deltaT"],
            "total_step": schedule["total_step"],
            "orth_reg_weight": FIXED["orth_reg_weight"],
            "lora_alpha": schedule["lora_alpha"],
            "parameter_budget": by_parameters,
        }

    @classmethod
    def minimum_budget(cls, costs: Sequence[int], settings, name: str, options: dict) -> int:
        # One triplet (d_in + d_out + 1): of the cheapest module when the pruning counts
        # parameters, of the largest under the conservative conversion above.
        if options.get("parameter_budget"):
            return min(costs) + 1
        return max(costs) + 1

    def parameters(self):
        return [p for n, p in self.model.named_parameters() if p.requires_grad]

    def after_optimizer_step(self, step):
        self.model.base_model.update_and_allocate(step)

    def ranks(self):
        pattern = self.model.peft_config["default"].rank_pattern
        if not pattern:
            return {name: self.init_r for name in self.names}
        ranks = {}
        for key, mask in pattern.items():
            module = key.split(".lora_E")[0]
            if module not in self._cost and module.startswith("base_model.model."):
                module = module[len("base_model.model."):]
            ranks[module] = int(sum(bool(m) for m in mask))
        return {name: ranks.get(name, self.init_r) for name in self.names}

    def backprop_modules(self):
        # Masked triplets still sit in the graph: backward reaches every adapted module.
        return list(self.names)

    def num_params(self):
        return sum(rank * self._cost[name] for name, rank in self.ranks().items())


def adalora_schedule(total_rank: int, modules: int, steps: int, scaling: float) -> dict:
    """AdaLoRA's run-dependent settings (see AdaLoraMethod), by PEFT's names."""
    if steps < 3:
        raise ValueError(f"adalora needs at least 3 steps (warm-up, pruning, final phase), got {steps}")
    init_r = max(1, math.ceil(1.5 * total_rank / modules))
    if init_r * modules <= total_rank:
        init_r += 1
    tinit = steps // 5
    tfinal = max(1, steps // 4)
    if tinit >= steps - tfinal:
        tinit = 0
    return {"init_r": init_r, "tinit": tinit, "tfinal": tfinal, "total_step": steps, "lora_alpha": scaling * init_r}


def mask_to_parameter_budget(allocator, model, allowance: float) -> dict[str, list[bool]]:
    """AdaLoRA's masking step held to parameters: keep triplets in PEFT's importance order
    (its smoothed sensitivity x uncertainty of E and of A's row and B's column) while their
    d_in + d_out + 1 fits `allowance`; zero the E entry of every other triplet.

    Args:
        allocator: PEFT's RankAllocator of the model (its importance scores are read, not reset).
        model: the PEFT model.
        allowance: parameters the kept triplets may hold.
    Returns:
        PEFT's rank_pattern: lora_E parameter name -> [r] keep flags.
    """
    adapter = allocator.adapter_name
    params = dict(model.named_parameters())
    scores, costs = {}, {}
    for name in params:
        if f"lora_E.{adapter}" not in name:
            continue
        a_name, b_name = name.replace("lora_E", "lora_A"), name.replace("lora_E", "lora_B")
        # A: [r, d_in] scored per row; B: [d_out, r] per column; E: [r, 1].
        row_a = allocator._element_score(a_name).mean(dim=1)
        col_b = allocator._element_score(b_name).mean(dim=0)
        scores[name] = allocator._element_score(name).view(-1) + row_a.view(-1) + col_b.view(-1)
        costs[name] = params[a_name].shape[1] + params[b_name].shape[0] + 1
    ranked = sorted(
        ((float(score), name, i) for name, values in scores.items() for i, score in enumerate(values)),
        key=lambda item: (-item[0], costs[item[1]], item[1], item[2]),
    )
    keep = {name: [False] * len(values) for name, values in scores.items()}
    spent = 0
    for _, name, i in ranked:
        if spent + costs[name] <= allowance:
            keep[name][i] = True
            spent += costs[name]
    with torch.no_grad():
        for name, flags in keep.items():
            mask = torch.tensor(flags, device=params[name].device).view(-1, 1)
            params[name].masked_fill_(~mask, 0.0)
    return keep
