"""Rank-dependent LoRA scale (GARDConfig.scaling_rule, lora/scaling.py) and the checked GoRA
initialisations (grow_init="gora_safe", "gora_mean" and "gora_search")."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import gard_kernels as gk
from gard_kernels.controller import SEARCH_INIT_STEPS
from gard_kernels.lora.layer import LoRALayer
from gard_kernels.lora.optim_state import rescale_optimizer_state
from gard_kernels.lora.scaling import RankScaling

from .models import VOCAB, batches, tiny_llama

peft = pytest.importorskip("peft")


def test_rules_follow_their_definitions():
    for rule in ("constant", "rslora", "linear"):
        assert RankScaling(2.0, rule, 8.0)(8) == pytest.approx(2.0)  # every rule is `scaling` at r_ref
    assert RankScaling(2.0, "constant", 8.0)(32) == 2.0
    assert RankScaling(2.0, "rslora", 8.0)(32) == pytest.approx(1.0)  # 2 * sqrt(8 / 32)
    assert RankScaling(2.0, "linear", 8.0)(2) == pytest.approx(8.0)  # 2 * 8 / 2
    with pytest.raises(ValueError, match="scaling_rule must be one of"):
        gk.GARDConfig(budget=100, scaling_rule="sqrt")


@pytest.mark.parametrize("rule", ["constant", "rslora", "linear"])
def test_uniform_lora_at_the_budgets_average_rank_is_the_same_under_every_rule(rule):
    model = tiny_llama()
    cost = sum(l.d_in + l.d_out for l in gk.GARD(tiny_llama(), gk.GARDConfig(budget=10_000)).manager.layers)
    gard = gk.GARD(model, gk.GARDConfig(budget=3 * cost, score="uniform", scaling_rule=rule, r_max=3,
                                        window=2, k_in=4, k_out=4, backend="torch", grow_init="zero"))
    gard.profile(batches(2), steps=2)
    assert set(gard.ranks.values()) == {3}
    assert all(layer.scaling == pytest.approx(2.0) for layer in gard.manager.layers)


@pytest.mark.parametrize("rule", ["rslora", "linear"])
def test_a_budget_r_max_cannot_spend_does_not_raise_the_scale(rule):
    """r_ref counts only the reachable budget: uniform LoRA at r_max under a budget 4 x larger has
    scale `scaling`, not scaling * 4^p (the unspendable part would otherwise inflate every layer)."""
    cost = sum(l.d_in + l.d_out for l in gk.GARD(tiny_llama(), gk.GARDConfig(budget=10_000)).manager.layers)
    with pytest.warns(UserWarning, match="GARD can spend at most"):
        gard = gk.GARD(tiny_llama(), gk.GARDConfig(budget=12 * cost, score="uniform", scaling_rule=rule, r_max=3,
                                                   window=2, k_in=4, k_out=4, backend="torch", grow_init="zero"))
    gard.profile(batches(2), steps=2)
    assert set(gard.ranks.values()) == {3}
    assert all(layer.scaling == pytest.approx(2.0) for layer in gard.manager.layers)


def _trained_layer(rank, rule, seed=0):
    torch.manual_seed(seed)
    base = torch.nn.Linear(12, 10).double()
    layer = LoRALayer(base, 0, scaling=2.0, name="l")
    layer.rank_scaling = RankScaling(2.0, rule, 4.0)
    layer.resize(rank, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=1e-2)
    x = torch.randn(16, 12, dtype=torch.float64)
    for _ in range(3):
        layer(x).square().sum().backward()
        opt.step(), opt.zero_grad()
    return layer, opt, x


@pytest.mark.parametrize("rule", ["rslora", "linear"])
def test_a_resize_under_a_rank_dependent_scale_keeps_the_output(rule):
    layer, opt, x = _trained_layer(4, rule)
    before = layer(x).detach()
    old_scale = layer.scaling
    layer.resize(8, optimizer=opt, generator=torch.Generator().manual_seed(1))  # grow: B's new columns 0
    assert layer.scaling == pytest.approx(2.0 * (4 / 8) ** (0.5 if rule == "rslora" else 1.0)) != old_scale
    torch.testing.assert_close(layer(x).detach(), before, rtol=1e-12, atol=1e-12)
    # A norm shrink drops whole directions: the output is that of the kept ones at the old scale.
    a, b = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    keep = torch.topk(a.norm(dim=1) * b.norm(dim=0), 3).indices.sort().values
    expected = layer.base(x) + layer.scaling * (x @ a[keep].T) @ b[:, keep].T
    layer.resize(3, optimizer=opt)
    torch.testing.assert_close(layer(x).detach(), expected.detach(), rtol=1e-10, atol=1e-12)


def test_rescaled_optimizer_state_stays_the_average_of_the_new_parameters_gradient():
    layer, opt, x = _trained_layer(4, "rslora")
    layer(x).square().sum().backward()
    grad_before = layer.lora_B.grad.clone()
    state = {k: v.clone() for k, v in opt.state[layer.lora_B].items()}
    layer.set_scaling(0.5, optimizer=opt)  # B <- 4 B: its gradient is divided by 4
    factor = 2.0 / 0.5
    layer.lora_B.grad = None
    layer(x).square().sum().backward()
    torch.testing.assert_close(layer.lora_B.grad, grad_before / factor, rtol=1e-10, atol=1e-14)
    new = opt.state[layer.lora_B]
    torch.testing.assert_close(new["exp_avg"], state["exp_avg"] / factor, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(new["exp_avg_sq"], state["exp_avg_sq"] / factor**2, rtol=1e-12, atol=0.0)
    assert float(new["step"]) == float(state["step"])


def test_unknown_optimizer_state_is_refused_before_anything_changes():
    layer, opt, _ = _trained_layer(4, "rslora")
    opt.state[layer.lora_B]["mystery"] = torch.ones_like(layer.lora_B)
    b = layer.lora_B.detach().clone()
    with pytest.raises(TypeError, match="scaling_rule='constant'"):
        layer.set_scaling(0.5, optimizer=opt)
    assert torch.equal(layer.lora_B.detach(), b) and layer.scaling != 0.5
    with pytest.raises(TypeError):
        rescale_optimizer_state(opt, layer.lora_B, 2.0)


def test_state_that_cannot_be_rescaled_is_refused_when_attached_not_mid_run():
    """Adamax's exp_inf is elementwise (it follows a remap) but GARD does not know how it follows
    a rescaled B: under a rank-dependent scale, attach_optimizer refuses it, before any step."""
    config = dict(budget=1_500, target_modules=["q_proj", "v_proj"], mode="dynamic", window=2, interval=2)
    gard = gk.GARD(tiny_llama(), gk.GARDConfig(**config, scaling_rule="rslora"))
    with pytest.raises(TypeError, match=r"Adamax keeps state \['exp_inf'\].*scaling_rule='constant'"):
        gard.attach_optimizer(torch.optim.Adamax(gard.lora_parameters(), lr=1e-2))
    assert gard.optimizer is None
    gard = gk.GARD(tiny_llama(), gk.GARDConfig(**config, scaling_rule="constant"))
    gard.attach_optimizer(torch.optim.Adamax(gard.lora_parameters(), lr=1e-2))


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("rule", ["rslora", "linear"])
def test_peft_export_is_exact_under_a_rank_dependent_scale(tmp_path, rule):
    model = tiny_llama()
    config = gk.GARDConfig(budget=1_500, target_modules=LLAMA_TARGETS, window=2, interval=2, warmup=2,
                           delta_max=3, r_max=6, score="random", mode="dynamic", ema=0.0, seed=2,
                           scaling=1.5, scaling_rule=rule, grow_init="zero")
    gard = gk.GARD(model, config)
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=2e-2)
    gard.attach_optimizer(opt)
    for batch in batches(6, seed=4):
        model(**batch).loss.backward()
        opt.step(), gard.step(), opt.zero_grad()
    live = [layer for layer in gard.manager.layers if layer.rank]
    assert len({layer.rank for layer in live}) > 1 and len({layer.scaling for layer in live}) > 1
    gard.save_pretrained(tmp_path)
    batch = batches(1, seed=8)[0]
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"]).logits
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()(input_ids=batch["input_ids"]).logits
        again = gk.GARD.from_pretrained(tiny_llama(), tmp_path, config)
        ours = again.model.eval()(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(theirs, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert [l.scaling for l in again.manager.layers if l.rank] == pytest.approx([l.scaling for l in live])


# --- grow_init="gora_safe" at rank 32 of a 64-wide layer --------------------------------------


def _wide_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


_TABLE = torch.randint(0, VOCAB, (VOCAB, 2), generator=torch.Generator().manual_seed(11))


def _markov(count, seed, batch=4, length=16):
    """Batches of a fixed 2-successor Markov chain: a structure LoRA can learn."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.empty(batch, length, dtype=torch.long)
        ids[:, 0] = torch.randint(0, VOCAB, (batch,), generator=gen)
        for t in range(1, length):
            ids[:, t] = _TABLE[ids[:, t - 1], torch.randint(0, 2, (batch,), generator=gen)]
        out.append({"input_ids": ids, "labels": ids})
    return out


def _run(grow_init, lr, profile, train=(), held=(), keep=None):
    """(loss on `held` after the profile's allocation, after the training steps, init step kept:
    gora_safe's share of the learning rate's step, or gora_search's λ); `keep` gets the GARD."""
    model = _wide_llama()
    # q_proj and v_proj are 64 x 64: uniform rank 32 on all four.
    config = gk.GARDConfig(budget=32 * 128 * 4, r_max=32, score="uniform", grow_init=grow_init, window=len(profile),
                           k_in=4, k_out=4, backend="torch")
    gard = gk.GARD(model, config)
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=lr)
    gard.attach_optimizer(opt)
    event = gard.profile(profile, steps=len(profile))
    assert set(gard.ranks.values()) == {32}

    def loss():
        with torch.no_grad():
            return sum(float(model(**b).loss) for b in held) / len(held)

    at_init = loss()
    if keep is not None:
        keep.append(gard)
    for batch in train:
        model(**batch).loss.backward()
        opt.step(), gard.step(), opt.zero_grad()
    return at_init, loss(), event.get("init_step_scale", event.get("init_step_lambda"))


@pytest.mark.parametrize("checked, unseen", [("gora_safe", slice(0, -1)), ("gora_mean", slice(0, 1)),
                                             ("gora_search", slice(0, -1))])
def test_checked_gora_never_starts_worse_than_zero_where_gora_does(checked, unseen):
    # Random tokens: the gradient of some profile batches is noise for the others, and GoRA's step
    # along it raises their loss; the checked step keeps B = 0 there (on the batches it did not see).
    profile = batches(4, batch=4, length=16, seed=1)
    held = profile[unseen]
    zero, _, _ = _run("zero", 1e-2, profile, held=held)
    gora, _, _ = _run("gora", 1e-2, profile, held=held)
    safe, _, scale = _run(checked, 1e-2, profile, held=held)
    assert gora > zero and safe <= zero
    if checked != "gora_search":  # the search's λ is not a share of the learning rate's step
        assert scale < 1.0


def test_gora_safe_keeps_a_useful_step_and_trains_no_worse_than_zero():
    profile, train, held = _markov(4, seed=1), _markov(5, seed=3), _markov(2, seed=9)
    zero_init, zero_trained, _ = _run("zero", 1e-2, profile, train, held)
    safe_init, safe_trained, scale = _run("gora_safe", 1e-2, profile, train, held)
    assert scale == 1.0 and safe_init < zero_init and safe_trained <= zero_trained


def _held_out_loss(gard, held, factor):
    """Mean loss on `held` with every B scaled by `factor` (then put back)."""
    saved = [layer.lora_B.detach().clone() for layer in gard.manager.layers]
    with torch.no_grad():
        for layer in gard.manager.layers:
            layer.lora_B.mul_(factor)
        loss = sum(float(gard.model(**b).loss) for b in held) / len(held)
        for layer, b in zip(gard.manager.layers, saved):
            layer.lora_B.copy_(b)
    return loss


@pytest.mark.parametrize("lr", [1e-2, 1e-5])
def test_gora_search_keeps_the_step_with_the_lowest_loss_on_the_unseen_batches(lr):
    # A learnable chain: GoRA's step helps. At lr 1e-5 the learning rate's step is far too small,
    # so gora_safe keeps almost nothing of what the step can give; the search is not tied to lr.
    profile, held = _markov(4, seed=1), _markov(2, seed=9)
    unseen = profile[:-1]
    safe, search = [], []
    safe_init, _, scale = _run("gora_safe", lr, profile, held=held, keep=safe)
    search_init, _, lam = _run("gora_search", lr, profile, held=held, keep=search)
    assert scale == 1.0 and lam in SEARCH_INIT_STEPS
    # The same directions, B of the step λ sqrt(d_in / r) instead of lr sqrt(d_in / r).
    for a, b in zip(safe[0].manager.layers, search[0].manager.layers):
        torch.testing.assert_close(b.lora_A, a.lora_A)
        torch.testing.assert_close(b.lora_B, a.lora_B * (lam / lr), rtol=1e-5, atol=1e-7)
    # The kept λ is the best of the grid (and of B = 0) on the batches the step did not come from.
    gard = search[0]
    chosen = _held_out_loss(gard, unseen, 1.0)
    others = [_held_out_loss(gard, unseen, other / lam) for other in (0.0, *SEARCH_INIT_STEPS) if other != lam]
    assert chosen <= min(others) + 1e-6
    if lr == 1e-5:
        assert search_init < safe_init - 0.05  # on batches neither saw


@pytest.mark.parametrize("checked", ["gora_safe", "gora_mean", "gora_search"])
def test_checked_gora_needs_the_profile_and_static_mode(checked):
    with pytest.raises(ValueError, match=checked):
        gk.GARDConfig(budget=1000, mode="dynamic", grow_init=checked)
    gard = gk.GARD(tiny_llama(), gk.GARDConfig(budget=1000, grow_init=checked, backend="torch"))
    with pytest.raises(RuntimeError, match=f"profile.*grow_init='{checked}'|grow_init='{checked}'.*profile"):
        gard.step()


def _mean_weight_gradients(profile: list[dict]) -> dict[str, torch.Tensor]:
    """float64 mean over `profile` of every q_proj / v_proj weight's gradient in the base model
    (GARD's adapters start with B = 0, so its layers see exactly these gradients)."""
    model = tiny_llama().double()
    weights = {name: module.weight for name, module in model.named_modules() if name.endswith(("q_proj", "v_proj"))}
    for param in model.parameters():
        param.requires_grad_(False)
    for weight in weights.values():
        weight.requires_grad_(True)
    for batch in profile:
        model(**batch).loss.backward()
    return {name: weight.grad / len(profile) for name, weight in weights.items()}


@pytest.mark.parametrize("score", ["uniform", "marginal_gain"])  # one profile pass, or three
def test_gora_mean_steps_along_the_mean_gradient_of_every_profile_batch_but_the_first(score):
    # Batches of 3 tokens: each gradient has rank <= 3, so the range finder (2 + 8 columns) holds
    # the span of three batches' gradients exactly. The first batch repeats the second, so the
    # check (on the first) keeps a non-zero share t of the step.
    profile = batches(4, batch=1, length=3, seed=5)
    profile[0] = profile[1]
    lr, rank = 1e-2, 2
    config = gk.GARDConfig(budget=rank * (32 + 32 + 32 + 16) * 2, r_max=rank, score=score, grow_init="gora_mean",
                           scaling_rule="constant", k_in=4, k_out=4, backend="torch")
    gard = gk.GARD(tiny_llama(), config)
    gard.attach_optimizer(torch.optim.AdamW(gard.lora_parameters(), lr=lr))
    t = gard.profile(profile)["init_step_scale"]
    assert t > 0
    for which, gradients in (("mean", _mean_weight_gradients(profile[1:])), ("last", _mean_weight_gradients(profile[-1:]))):
        for name, layer in zip(gard.names, gard.manager.layers):
            g = gradients[name]
            _, _, vh = torch.linalg.svd(g)
            top = vh[: layer.rank]
            # GoRA's step: B A = -(lr sqrt(d_in / r) / scale) G V^T V, whatever the signs of V.
            expected = -t * lr * (layer.d_in / layer.rank) ** 0.5 / layer.scaling * g @ top.T @ top
            got = (layer.lora_B.detach() @ layer.lora_A.detach()).double()
            close = torch.allclose(got, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))
            assert close == (which == "mean"), (which, name)


def test_a_failing_check_of_gora_s_step_leaves_gard_as_it_was():
    # The check runs after the allocation's resize: a loss that fails there must undo that too.
    model = tiny_llama()
    config = gk.GARDConfig(budget=1000, grow_init="gora_safe", window=3, k_in=4, k_out=4, backend="torch")
    gard = gk.GARD(model, config)
    gard.attach_optimizer(torch.optim.AdamW(gard.lora_parameters(), lr=1e-2))
    before = {name: (layer.rank, layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
              for name, layer in zip(gard.names, gard.manager.layers)}
    calls = {"n": 0}

    def loss(m, batch):
        calls["n"] += 1
        if calls["n"] > 3:  # the three profile passes succeed, the step check fails
            raise RuntimeError("loss failed")
        return m(**batch).loss

    with pytest.raises(RuntimeError, match="loss failed"):
        gard.profile(batches(3), loss_fn=loss)
    assert not gard.allocated and gard.step_count == 0 and not gard.history
    for name, layer in zip(gard.names, gard.manager.layers):
        rank, a, b = before[name]
        assert layer.rank == rank and torch.equal(layer.lora_A.detach(), a) and torch.equal(layer.lora_B.detach(), b)
    event = gard.profile(batches(3))
    assert 0.0 <= event["init_step_scale"] <= 1.0
