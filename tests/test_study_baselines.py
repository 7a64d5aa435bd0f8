"""The all-linear study's baselines at their best: faithful GoRA (budget filled, its own step,
rank-stabilised scaling), LoRA-GA and AdaLoRA held to a parameter budget, all through PEFT or
GARD's layers on a tiny in-process Llama; and the profile's peak-memory columns."""
import itertools
import math
import random

import pytest
import torch

from gard_kernels.experiments import data, runner
from gard_kernels.experiments.baselines import adalora, gora
from gard_kernels.experiments.baselines.gradient_profile import mean_weight_gradients
from gard_kernels.experiments.evaluation import lm_loss
from gard_kernels.experiments.method import MethodRun
from gard_kernels.experiments.presets import build_method, method_options
from gard_kernels.experiments.settings import GardSettings, TrainSettings
from gard_kernels.experiments.workspace import make_workspace

from .models import VOCAB, tiny_llama

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Tiny Llama, 2 layers: q 64, k 48, v 48, o 64, gate 80, up 80, down 80 per rank unit: 464 per
# layer, 928 for one rank unit on all 14 modules.
UNIT = 928
SETTINGS = GardSettings(target_modules=ALL_LINEAR, r_max=16, window=2, backend="torch")
TRAIN = TrainSettings(steps=6, batch_size=2, max_len=16, eval_blocks=8, eval_batch_size=4, test_blocks=6)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace():
    return make_workspace(tiny_llama(), data.ByteTokenizer(VOCAB), "tiny-llama", "pydoc-topics", 16, progress=False)


def _batches(count=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 16), generator=generator) for _ in range(count)]


def _built(method, budget, lr=1e-2, seed=0):
    model = tiny_llama()
    model.requires_grad_(False)
    run = MethodRun(method, model, budget, SETTINGS, seed, TRAIN.steps, lr, method_options(method))
    return build_method(run)


# gora_fill


def test_gora_fill_never_exceeds_the_budget_and_leaves_no_unit_that_fits():
    rng = random.Random(0)
    for _ in range(300):
        layers = rng.randint(1, 7)
        costs = [rng.randint(3, 40) for _ in range(layers)]
        caps = [rng.randint(0, 9) for _ in range(layers)]
        importance = [rng.choice([0.0, rng.random(), 10 * rng.random()]) for _ in range(layers)]
        budget = rng.randint(0, 400)
        r_max = rng.randint(1, 9)
        ranks = gora.gora_fill(importance, costs, caps, budget, 0, r_max)
        spent = sum(r * c for r, c in zip(ranks, costs))
        assert spent <= budget
        assert all(0 <= r <= min(r_max, cap) for r, cap in zip(ranks, caps))
        left = budget - spent
        assert not any(c <= left and r < min(r_max, cap) for r, c, cap in zip(ranks, costs, caps)), (ranks, costs, caps, budget)
        # Only ever adds to the paper's formula.
        formula = gora.gora_ranks(importance, costs, caps, budget, 0, r_max)
        assert all(f <= r for f, r in zip(formula, ranks))


def test_gora_fill_tops_up_by_largest_remainder():
    # Shares of 1000: exact ranks 3.4, 3.3 and 3.3 at cost 100 -> rounding gives 3, 3, 3 (900);
    # the remaining 100 goes to the largest remainder, the first layer.
    assert gora.gora_ranks([34, 33, 33], [100] * 3, [9] * 3, 1000, 0, 8) == [3, 3, 3]
    assert gora.gora_fill([34, 33, 33], [100] * 3, [9] * 3, 1000, 0, 8) == [4, 3, 3]


# faithful GoRA


def test_faithful_gora_spends_its_budget_scales_by_rank_and_never_starts_worse_than_zero():
    budget = 2 * UNIT + 500
    method = _built("gora-faithful", budget)
    batches = _batches()
    method.prepare(batches, lm_loss)
    details = method.details
    assert details["spent"] <= budget and budget - details["spent"] < 80  # no unit of the cheapest module (48) was left
    ranks = method.ranks()
    average = budget / sum(method.manager.costs)
    for layer in method.manager.layers:
        if layer.rank:
            assert layer.scaling == pytest.approx(2.0 * math.sqrt(average / layer.rank))
    chosen = details["adaptive_xi"]
    assert chosen["loss_chosen"] <= chosen["loss_at_zero"]
    assert chosen["lambda"] == 0.0 or chosen["lambda"] in gora.adaptive_candidates()
    # The loss on the first batch is the chosen one: B was left at the chosen step.
    with torch.no_grad():
        assert float(lm_loss(method.model, batches[0])) == pytest.approx(chosen["loss_chosen"], rel=1e-5)
    assert sum(ranks.values()) > 0


def test_gora_steps_are_descent_steps_of_the_projected_mean_gradient():
    torch.manual_seed(0)
    method = _built("gora-faithful", 2 * UNIT)
    method.options = {**method.options, "xi": 0.05}
    batches = _batches(2, seed=3)
    model_copy = tiny_llama()
    bases = [model_copy.get_submodule(name) for name in method.manager.names]
    means = mean_weight_gradients(model_copy, bases, batches, lm_loss)
    method.prepare(batches, lm_loss)
    for layer, grad in zip(method.manager.layers, means):
        if not layer.rank:
            continue
        a = layer.lora_A.detach().double()
        projector = a.T @ torch.linalg.pinv(a @ a.T) @ a
        expected = -(0.05 / math.sqrt(layer.rank)) * grad @ projector
        got = layer.scaling * layer.lora_B.detach().double() @ a
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-9), layer.name


def test_unknown_gora_option_is_refused():
    model = tiny_llama()
    run = MethodRun("gora", model, UNIT, SETTINGS, 0, 4, 1e-2, {"xi": "fast"})
    with pytest.raises(ValueError, match="xi must be"):
        gora.GoraMethod(run)


# LoRA-GA


def test_lora_ga_starts_at_the_base_model_with_gradient_aligned_adapters():
    method = _built("lora-ga", 2 * UNIT)
    batches = _batches()
    reference = tiny_llama()
    with torch.no_grad():
        before = reference(batches[0]).logits
    method.prepare(batches, lm_loss)
    with torch.no_grad():
        after = method.model(input_ids=batches[0]).logits
    # W - scaling B A + scaling B A: the base model's function (float32 rounding only).
    assert torch.allclose(after, before, atol=1e-4), (after - before).abs().max()
    bases = [reference.get_submodule(name) for name in method.names]
    means = mean_weight_gradients(reference, bases, batches, lm_loss)
    layers = method._lora_layers()
    for (name, layer), grad in zip(layers.items(), means):
        rank = method.ranks()[name]
        a = layer.lora_A["default"].weight.detach().double()
        assert a.shape[0] == rank and a.abs().sum() > 0
        # A's rows are PEFT's randomised estimate (4 power iterations) of the top right-singular
        # directions of the mean gradient (direction ArB2r): most of the best rank-r share of its
        # energy (random rows here: ~0.25 of it), and far more than r / d_in of the total.
        projector = torch.linalg.pinv(a) @ a
        captured = torch.linalg.matrix_norm(grad @ projector) ** 2
        best = torch.linalg.svdvals(grad)[:rank].square().sum()
        assert captured / best > 0.6, (name, float(captured / best))
        assert captured / grad.square().sum() > 2 * rank / grad.shape[1], name
    assert method.num_params() == sum(r * c for r, c in zip(method.ranks().values(), method._cost.values())) <= 2 * UNIT


# AdaLoRA held to parameters


class _Scores:
    """A stand-in for PEFT's RankAllocator: fixed element scores per parameter name."""

    adapter_name = "default"

    def __init__(self, scores):
        self.scores = scores

    def _element_score(self, name):
        return self.scores[name]


def test_parameter_budget_mask_keeps_the_best_triplets_that_fit():
    torch.manual_seed(0)
    shapes = {"m1": (5, 7, 3), "m2": (11, 2, 4), "m3": (3, 3, 2)}  # d_in, d_out, r
    params, scores = {}, {}
    for module, (d_in, d_out, r) in shapes.items():
        for part, shape in (("lora_A", (r, d_in)), ("lora_B", (d_out, r)), ("lora_E", (r, 1))):
            name = f"{module}.{part}.default"
            params[name] = torch.nn.Parameter(torch.ones(shape))
            scores[name] = torch.rand(shape)
    model = torch.nn.Module()
    for name, p in params.items():
        model.register_parameter(name.replace(".", "_"), p)
    model.named_parameters = lambda: iter(params.items())
    triplets = []
    for module, (d_in, d_out, r) in shapes.items():
        e, a, b = (scores[f"{module}.{part}.default"] for part in ("lora_E", "lora_A", "lora_B"))
        for i in range(r):
            triplets.append((float(e[i, 0] + a[i].mean() + b[:, i].mean()), f"{module}.lora_E.default", i, d_in + d_out + 1))
    for allowance in (0, 12, 30, 47, 100):
        keep = adalora.mask_to_parameter_budget(_Scores(scores), model, allowance)
        kept = [t for t in triplets if keep[t[1]][t[2]]]
        assert sum(t[3] for t in kept) <= allowance
        # Brute force: the kept set is what walking the triplets in score order and taking each
        # that still fits gives.
        spent, expected = 0, set()
        for score, name, i, cost in sorted(triplets, key=lambda t: -t[0]):
            if spent + cost <= allowance:
                expected.add((name, i))
                spent += cost
        assert {(t[1], t[2]) for t in kept} == expected
        for name, flags in keep.items():
            e = params[name].detach().view(-1)
            assert all((e[i] == 0) != flag for i, flag in enumerate(flags))
        for p in params.values():
            p.data.fill_(1.0)


def test_adalora_params_ends_within_the_budget(workspace):
    budget = 2 * UNIT
    train = TrainSettings(steps=8, batch_size=2, max_len=16, eval_blocks=4, eval_batch_size=4, test_blocks=0)
    metrics = runner.finetune("adalora-params", budget, 0, workspace.model, workspace.data, train, SETTINGS)
    details = metrics["method_details"]
    assert details["parameter_budget"] and details["init_r"] == math.ceil(1.5 * 2)
    assert metrics["lora_params_final"] <= budget
    assert metrics["lora_params_final"] > budget - 2 * 81  # nothing lost to a conservative conversion (max cost 81)
    assert metrics["lora_params_mean"] > budget  # it trains wide first, as AdaLoRA does


def test_new_baselines_record_their_options_and_profile_memory(workspace):
    train = TrainSettings(steps=3, batch_size=2, max_len=16, eval_blocks=4, eval_batch_size=4, test_blocks=0)
    metrics = runner.finetune("gora-faithful", 2 * UNIT, 0, workspace.model, workspace.data, train, SETTINGS)
    assert metrics["method_details"]["options"] == {"fill": True, "xi": "adaptive", "rank_scaling": "rslora", "ranks_from": None}
    assert metrics["profile_peak_rss_mib"] is None or metrics["profile_peak_rss_mib"] > 0
    assert metrics["profile_extra_rss_mib"] is None or metrics["profile_extra_rss_mib"] >= 0
    from gard_kernels.experiments import io

    spec_old = io.run_spec("gora", 2 * UNIT, 0, train, SETTINGS, {})
    spec_new = io.run_spec("gora-faithful", 2 * UNIT, 0, train, SETTINGS, {})
    assert "method_options" not in spec_old and spec_new["method_options"]["xi"] == "adaptive"


def test_gora_on_another_runs_ranks_uses_them_and_refuses_what_it_cannot(tmp_path):
    import json

    method = _built("gora", 2 * UNIT)
    names = method.manager.names
    pattern = {name: (i % 3) for i, name in enumerate(names)}
    run_dir = tmp_path / f"adalora_b{2 * UNIT}_s0_lr0.03"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"final_ranks": pattern}))
    template = str(tmp_path / "adalora_b{budget}_s{seed}_lr*" / "metrics.json")

    def run(budget, options):
        model = tiny_llama()
        model.requires_grad_(False)
        return gora.GoraMethod(MethodRun("gora", model, budget, SETTINGS, 0, 4, 1e-2, options))

    method = run(2 * UNIT, {"ranks_from": template})
    method.prepare(_batches(2), lm_loss)
    assert method.ranks() == pattern and method.details["ranks_from"].endswith("metrics.json")
    with pytest.raises(ValueError, match="must match exactly one"):
        run(3 * UNIT, {"ranks_from": template}).prepare(_batches(2), lm_loss)
    cost = sum(r * c for r, c in zip(pattern.values(), method.manager.costs))
    (tmp_path / f"adalora_b{cost - 1}_s0_lr0.03").mkdir()
    (tmp_path / f"adalora_b{cost - 1}_s0_lr0.03" / "metrics.json").write_text(json.dumps({"final_ranks": pattern}))
    with pytest.raises(ValueError, match="over the budget"):
        run(cost - 1, {"ranks_from": template}).prepare(_batches(2), lm_loss)
