"""GARD on bitsandbytes-quantised bases (QLoRA's NF4, LLM.int8) and with 8-bit optimizers.

The quantised layers run on the CPU (bitsandbytes 0.50, pinned in the dev extra); conftest sets HF_HUB_OFFLINE so that
importing bitsandbytes never reaches for the model hub. GARD on a quantised base is compared with
PEFT on the same quantised base (NF4 itself is several per cent off the dense model).
"""
import pytest
import torch
from torch import nn

import bitsandbytes as bnb
import gard_kernels as gk
from gard_kernels.lora.base_layers import adapter_shape, dense_weight, dequantized_bases
from gard_kernels.lora.layer import LoRALayer

from .models import batches, tiny_llama
from .util import rel_error

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from gard_kernels.integrations import GARDCallback  # noqa: E402

# Non-square layers; the last one's B factor [520, r] reaches bitsandbytes' min_8bit_size (4096
# elements) at r = 8, the size at which 8-bit optimizers switch to quantised state.
DIMS = ((40, 72), (72, 24), (24, 520))
TARGETS = ["layers.0", "layers.1", "layers.2"]
KINDS = ("nf4", "int8")
# Rank 8 of the last layer (8 * (24 + 520) = 4352 parameters) fits.
BUDGET = 5_000


class _MLP(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.layers = nn.ModuleList(make(d_in, d_out) for d_in, d_out in DIMS)

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


def _dense(dtype=torch.float32) -> _MLP:
    torch.manual_seed(0)
    return _MLP(lambda d_in, d_out: nn.Linear(d_in, d_out)).to(dtype)


def _model(kind: str, compute_dtype=torch.float32) -> nn.Module:
    """The same random MLP, in bf16 ("bf16") or quantised ("nf4", "int8"); equal calls give equal models."""
    if kind == "bf16":
        return _dense(torch.bfloat16)
    if kind == "nf4":
        make = lambda d_in, d_out: bnb.nn.Linear4bit(d_in, d_out, compute_dtype=compute_dtype, quant_type="nf4")  # noqa: E731
    else:
        make = lambda d_in, d_out: bnb.nn.Linear8bitLt(d_in, d_out, has_fp16_weights=False)  # noqa: E731
    model = _MLP(make)
    model.load_state_dict(_dense().state_dict())
    return model.to("cpu")  # bitsandbytes quantises the weights on the move to a device


def _data(count: int, seed: int = 1, dtype=torch.float32) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {"x": torch.randn(6, DIMS[0][0], generator=generator).to(dtype),
         "y": torch.randn(6, DIMS[-1][1], generator=generator).to(dtype)}
        for _ in range(count)
    ]


def _loss(model, batch):
    return (model(batch["x"]).float() - batch["y"].float()).square().mean()


def _config(mode: str, **overrides) -> gk.GARDConfig:
    fields = dict(
        budget=BUDGET, target_modules=TARGETS, mode=mode, window=2, interval=2, warmup=2, r_max=8, r_init=2,
        grow_init="gradient", k_in=8, k_out=8, backend="torch", seed=3,
    )
    return gk.GARDConfig(**(fields | overrides))


def _train(model, mode: str, steps: int = 5, optimizer=torch.optim.AdamW, **overrides):
    """GARD on `model`: static mode profiles first; returns the controller after `steps` steps."""
    gard = gk.GARD(model, _config(mode, **overrides))
    data = _data(steps + 2)
    if mode == "static":
        gard.profile(data[:2], loss_fn=_loss)
    opt = optimizer(gard.lora_parameters(), lr=1e-2)
    gard.attach_optimizer(opt)
    for batch in data[2:]:
        _loss(model, batch).backward()
        opt.step()
        gard.step()
        opt.zero_grad()
    return gard


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_come_from_the_declared_features(kind, one_thread):
    model = _model(kind)
    dense = _dense()
    if kind == "nf4":
        # Two 4-bit codes per byte in a column: the shape the old reading took for [d_out, d_in].
        assert model.layers[0].weight.shape == (DIMS[0][0] * DIMS[0][1] // 2, 1)
    x = torch.randn(5, 24)
    for (d_in, d_out), layer, reference in zip(DIMS, model.layers, dense.layers):
        assert adapter_shape(layer) == (d_in, d_out)
        weight = dense_weight(layer)
        assert weight.shape == (d_out, d_in) and weight.is_floating_point()
        # Quantisation error only: NF4 ~10 %, int8 < 1 %.
        assert rel_error(weight, reference.weight) < (0.15 if kind == "nf4" else 0.01)
    # NF4's CPU forward is the dequantised weight's matmul, so dense_weight is exactly what it uses.
    if kind == "nf4":
        layer = model.layers[2]
        expected = x.double() @ dense_weight(layer).double().T + layer.bias.double()
        assert rel_error(layer(x), expected) < 1e-5


def test_dense_weight_reads_codes_repacked_for_cpu_inference(one_thread):
    # An eval-mode forward without gradients on a CPU with AVX512-BF16 repacks the codes of a layer
    # with in_features >= 64 and out_features divisible by 32 (elsewhere nothing changes).
    torch.manual_seed(0)
    dense = nn.Linear(64, 96)
    layer = bnb.nn.Linear4bit(64, 96, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")
    before = dense_weight(layer)
    with torch.no_grad():
        layer.eval()(torch.randn(3, 64))
    assert adapter_shape(layer) == (64, 96)
    # The repacking keeps the block scales in bf16 (relative rounding 2^-9); a misread layout
    # would be off by ~100 %.
    assert rel_error(dense_weight(layer), before) < 5e-3


def test_unknown_quantised_layers_are_refused_by_name():
    class QuantLinear(nn.Module):
        """A GPTQ-style layer: packed int32 codes, not an nn.Linear."""

        def __init__(self):
            super().__init__()
            self.in_features, self.out_features = 40, 72
            self.register_buffer("qweight", torch.zeros(5, 72, dtype=torch.int32))

        def forward(self, x):
            return x.new_zeros(*x.shape[:-1], 72)

    class PackedLinear(nn.Linear):
        """An nn.Linear subclass whose weight holds packed codes GARD cannot read."""

        def __init__(self):
            super().__init__(40, 72)
            self.weight = nn.Parameter(torch.zeros(40 * 72 // 2, 1, dtype=torch.uint8), requires_grad=False)

    model = _dense()
    model.layers[0] = QuantLinear()
    with pytest.raises(ValueError, match=r"layers\.0.*QuantLinear.*GPTQ"):
        gk.GARD(model, _config("dynamic"))
    model.layers[0] = PackedLinear()
    with pytest.raises(TypeError, match=r"PackedLinear.*\(1440, 1\) torch.uint8.*\[72, 40\]"):
        gk.GARD(model, _config("dynamic"))
    assert not any(isinstance(m, LoRALayer) for m in model.modules())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_gard_trains_on_a_quantised_base_and_peft_reloads_it(kind, mode, one_thread, tmp_path):
    model = _model(kind)
    gard = _train(model, mode)
    ranks = list(gard.ranks.values())
    assert ranks != [2, 2, 2] and 0 < gard.num_lora_params <= BUDGET
    # The adapter's forward on the quantised base, against float64.
    x = _data(1, seed=9)[0]["x"]
    layer = gard.manager.layers[2]
    hidden = torch.relu(model.layers[1](torch.relu(model.layers[0](x)))).detach()
    with torch.no_grad():
        lora = (hidden.double() @ layer.lora_A.double().T) @ layer.lora_B.double().T * layer.scaling
        assert rel_error(layer(hidden) - layer.base(hidden), lora) < 1e-5
    # PEFT on a fresh copy of the same quantised base computes the same outputs.
    gard.save_pretrained(tmp_path)
    # Both in training mode: an eval-mode NF4 forward on the CPU may take bitsandbytes' repacked
    # kernel, which needs out_features divisible by 32.
    reloaded = peft.PeftModel.from_pretrained(_model(kind), tmp_path).train()
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    # GARD reads the adapter back onto a quantised base (its shape check reads the declared features).
    continued = _model(kind)
    again = gk.GARD.from_pretrained(continued, tmp_path, gard.config)
    assert again.ranks == gard.ranks
    with torch.no_grad():
        assert torch.equal(continued(x), model(x))


def test_sketches_on_a_quantised_base_match_the_float64_reference(one_thread):
    model = _model("nf4")
    gard = gk.GARD(model, _config("dynamic", window=3, interval=3, warmup=3))
    inputs, grads = {}, {}

    def keep(layer, args, out):
        inputs[layer.name] = args[0].detach()
        out.register_hook(lambda g: grads.__setitem__(layer.name, g.detach()))

    for layer in gard.manager.layers:
        layer.register_forward_hook(keep)
    _loss(model, _data(1)[0]).backward()
    for index, (layer, handle) in enumerate(zip(gard.manager.layers, gard.handles)):
        # G = dY^T X, the weight gradient the quantised weight itself cannot hold.
        g = grads[layer.name].double().T @ inputs[layer.name].double()
        sketch = handle.sketch
        expected = sketch.p_out.double().T @ g @ sketch.p_in.double()
        got = gard.ring.buffer[index, gard.ring.slot].view(gard.config.k_out, gard.config.k_in)
        assert rel_error(got, expected) < 1e-5


@pytest.mark.parametrize("kind, compute_dtype", [("bf16", None), ("nf4", torch.bfloat16), ("int8", None)])
def test_peft_reload_gives_the_same_low_precision_outputs(kind, compute_dtype, tmp_path, one_thread):
    """PEFT adds the float32 LoRA term to a bf16 output before rounding (plain Linear), or rounds
    the term first (bitsandbytes layers); GARD adds it the same way, so the outputs are equal."""
    model = _model(kind, compute_dtype or torch.float32)
    gard = gk.GARD(model, _config("dynamic"))
    with torch.no_grad():
        for layer in gard.manager.layers:
            layer.lora_B.normal_(0.0, 0.3)
    gard.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(_model(kind, compute_dtype or torch.float32), tmp_path).train()
    x = _data(1, seed=5, dtype=torch.bfloat16 if kind == "bf16" else torch.float32)[0]["x"]
    with torch.no_grad():
        ours, theirs = model(x), reloaded(x)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def test_8bit_optimizers_are_refused_before_a_resize_can_meet_their_state(one_thread):
    model = _model("nf4")
    # Static mode profiling in the loop: the allocation at step `window` meets the optimizer's state.
    for mode, options in (("dynamic", {}), ("static", {"score": "update_nuclear"})):
        gard = gk.GARD(model, _config(mode, **options))
        for optimizer in (bnb.optim.AdamW8bit, bnb.optim.PagedAdamW8bit):
            # The trial parameter has the largest factor's size: a small one would get 32-bit state.
            with pytest.raises(TypeError, match=rf"{optimizer.__name__} .*torch\.optim\.AdamW.*gard\.profile"):
                gard.attach_optimizer(optimizer(gard.lora_parameters(), lr=1e-3))
            assert gard.optimizer is None
        gard.manager.unwrap()


def test_8bit_optimizer_below_its_8bit_size_follows_resizes(one_thread):
    # min_8bit_size lives in bitsandbytes' `args`, not in `defaults`: the trial must use it.
    unquantised = lambda ps, lr: bnb.optim.AdamW8bit(ps, lr=lr, min_8bit_size=10**6)  # noqa: E731
    # Its 32-bit state ("state1", "state2") is remapped but GARD does not know how it follows a
    # rescaled B: a rank-dependent scale is refused when the optimizer is attached, not mid-run.
    with pytest.raises(TypeError, match=r"AdamW8bit keeps state \['state1', 'state2'\].*scaling_rule='constant'"):
        _train(_model("nf4"), "dynamic", steps=6, optimizer=unquantised, scaling_rule="rslora")
    gard = _train(_model("nf4"), "dynamic", steps=6, optimizer=unquantised, scaling_rule="constant")
    moved = [r for r in gard.history if "reallocation" in r and r["reallocation"]["old_ranks"] != r["ranks"]]
    assert moved
    state = gard.optimizer.state[gard.manager.layers[2].lora_B]
    assert state["state1"].dtype == torch.float32 and state["state1"].shape == gard.manager.layers[2].lora_B.shape


@pytest.mark.parametrize("optimizer", ["AdamW8bit", "PagedAdamW8bit"])
def test_default_static_config_takes_an_8bit_optimizer_attached_before_profiling(optimizer, one_thread):
    """The defaults (gora_safe takes the optimizer's lr at the profile, rslora rescales B at the
    allocation): the one resize comes before the optimizer's first step, with no state to carry."""
    model = _model("nf4")
    gard = gk.GARD(model, gk.GARDConfig(budget=BUDGET, target_modules=TARGETS, window=2, r_max=8, backend="torch", seed=3))
    assert (gard.config.grow_init, gard.config.scaling_rule) == ("gora_safe", "rslora")
    opt = getattr(bnb.optim, optimizer)(gard.lora_parameters(), lr=1e-2, min_8bit_size=256)
    gard.attach_optimizer(opt)
    data = _data(6)
    event = gard.profile(data[:2], loss_fn=_loss)
    assert "init_step_scale" in event and len(set(gard.ranks.values())) > 1
    for batch in data[2:]:
        _loss(model, batch).backward()
        opt.step(), gard.step(), opt.zero_grad()
    assert gard.step_count == 4 and all("reallocation" not in r for r in gard.history[1:])
    assert torch.uint8 in {state["state1"].dtype for state in opt.state.values()}


def test_profile_refuses_an_8bit_optimizer_that_stepped_before_it(one_thread):
    """Attached unchecked as holding no state, the optimizer stepped before gard.profile: the
    allocation would meet quantised state, so profile refuses before it takes a batch."""
    model = _model("nf4")
    gard = gk.GARD(model, gk.GARDConfig(budget=BUDGET, target_modules=TARGETS, window=2, r_max=8, backend="torch", seed=3))
    opt = bnb.optim.AdamW8bit(gard.lora_parameters(), lr=1e-2, min_8bit_size=256)
    gard.attach_optimizer(opt)
    data = _data(3)
    _loss(model, data[0]).backward()
    opt.step(), opt.zero_grad()
    ranks = dict(gard.ranks)
    batches_left = iter(data[1:])
    with pytest.raises(TypeError, match=r"AdamW8bit keeps state\['state1'\] as torch.uint8"):
        gard.profile(batches_left, loss_fn=_loss)
    assert gard.ranks == ranks and not gard.allocated and len(list(batches_left)) == 2


def test_static_mode_takes_an_8bit_optimizer_after_profiling(one_thread):
    # Quantised state from 256 elements on, whatever ranks the allocation chose.
    paged = lambda ps, lr: bnb.optim.PagedAdamW8bit(ps, lr=lr, min_8bit_size=256)  # noqa: E731
    gard = _train(_model("nf4"), "static", steps=5, optimizer=paged)
    assert gard.step_count == 5 and all("reallocation" not in r for r in gard.history[1:])
    kinds = {state["state1"].dtype for state in gard.optimizer.state.values()}
    assert torch.uint8 in kinds


def test_gora_baseline_profiles_a_quantised_base(one_thread):
    from gard_kernels.experiments.method import MethodRun
    from gard_kernels.experiments.presets import build_method
    from gard_kernels.experiments.settings import GardSettings

    model = _model("nf4")
    bases = list(model.layers)
    settings = GardSettings(target_modules=TARGETS, window=2, backend="torch")
    method = build_method(MethodRun("gora", model, BUDGET, settings, 0, 4, 1e-2))
    method.prepare(_data(2), _loss)
    assert [layer.base for layer in method.manager.layers] == bases
    assert all(layer.base.weight.dtype == torch.uint8 for layer in method.manager.layers)
    importance = method.details["importance"]
    assert all(value > 0 for value in importance) and sum(method.manager.ranks) > 0


def test_dequantized_bases_gives_dense_gradients_and_puts_the_layers_back(one_thread):
    model = _model("nf4")
    gard = gk.GARD(model, _config("dynamic"))
    layers = gard.manager.layers
    bases = [layer.base for layer in layers]
    data = _data(1)[0]
    with dequantized_bases(layers):
        weights = [layer.base.weight for layer in layers]
        for weight in weights:
            weight.requires_grad_(True)
        loss = _loss(model, data)
        grads = torch.autograd.grad(loss, weights)
    assert [layer.base for layer in layers] == bases
    # The dense copy computes what the quantised layer computes.
    with torch.no_grad():
        assert rel_error(_loss(model, data), loss) < 1e-5
    assert all(g.shape == (d_out, d_in) and g.abs().sum() > 0 for g, (d_in, d_out) in zip(grads, DIMS))


@pytest.mark.parametrize("kind", KINDS)
def test_suggest_lora_config_on_a_quantised_base_matches_static_gard(kind, one_thread):
    model = _model(kind)
    config = gk.suggest_lora_config(
        model, _data(2), budget=BUDGET, target_modules=TARGETS, loss_fn=_loss, window=2, r_max=8, k_in=8, k_out=8,
        backend="torch", seed=3,
    )
    assert not any(isinstance(m, LoRALayer) for m in model.modules())
    static = gk.GARD(_model(kind), _config("static", grow_init="zero", r_init=None))
    static.profile(_data(2), loss_fn=_loss)
    live = {name: rank for name, rank in static.ranks.items() if rank}
    assert config.rank_pattern == live
    peft_model = peft.get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == static.num_lora_params
    _loss(peft_model, _data(1)[0]).backward()


# --- a Hugging Face model loaded quantised through from_pretrained -------------------------------

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    return path


def _load(path, kind):
    """The tiny Llama loaded quantised. from_pretrained returns it in eval mode, where a 4-bit
    forward on a CPU with AVX512-BF16 repacks the codes for a kernel that needs in_features of at
    least 64 and out_features divisible by 32: run it in training mode."""
    if kind == "nf4":
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    else:
        quantization = transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization, device_map="cpu", dtype=torch.float32
    )


class _Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.cat([b["input_ids"] for b in batches(8, seed=6)])

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(path, model, callback, optim="adamw_torch", max_steps=4):
    args = transformers.TrainingArguments(
        output_dir=str(path), per_device_train_batch_size=2, max_steps=max_steps, learning_rate=1e-2, optim=optim,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, logging_steps=1,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[callback])


@pytest.mark.parametrize("kind", KINDS)
def test_trainer_callback_on_a_model_loaded_quantised(kind, llama_dir, tmp_path, one_thread):
    model = _load(llama_dir, kind)
    assert model.is_quantized and type(model.model.layers[0].self_attn.k_proj).__module__.startswith("bitsandbytes")
    if kind == "nf4":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    config = gk.GARDConfig(
        budget=1_500, target_modules=LLAMA_TARGETS, mode="dynamic", window=2, interval=2, warmup=2, r_max=6,
        grow_init="gradient", backend="torch", seed=4,
    )
    callback = GARDCallback(config)
    callback.prepare(model)
    trainer = _trainer(tmp_path / "run", model, callback)
    trainer.train()
    gard = callback.gard
    assert gard.step_count == 4 and any("reallocation" in r for r in gard.history)
    assert gard.optimizer is trainer.optimizer.optimizer
    # PEFT on a fresh quantised load computes the trained model's logits.
    gard.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(_load(llama_dir, kind), tmp_path / "adapter").train()
    ids = batches(1, seed=9)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model.train()(input_ids=ids).logits)


def test_trainer_refuses_a_paged_8bit_optimizer_before_the_first_step(llama_dir, tmp_path, one_thread):
    model = _load(llama_dir, "nf4")
    config = gk.GARDConfig(budget=1_500, target_modules=LLAMA_TARGETS, mode="dynamic", window=2, backend="torch")
    callback = GARDCallback(config)
    callback.prepare(model)
    trainer = _trainer(tmp_path, model, callback, optim="paged_adamw_8bit")
    with pytest.raises(TypeError, match=r"bitsandbytes\.optim\..*AdamW is a paged optimizer.*adamw_torch"):
        trainer.train()
    assert trainer.state.global_step == 0 and callback.gard.step_count == 0



def test_trainer_keeps_a_paged_8bit_optimizer_in_static_mode_after_profiling(llama_dir, tmp_path, one_thread):
    model = _load(llama_dir, "nf4")
    config = gk.GARDConfig(
        budget=1_500, target_modules=LLAMA_TARGETS, mode="static", window=2, grow_init="gradient", backend="torch"
    )
    callback = GARDCallback(config)
    callback.prepare(model)
    model.train()  # as the Trainer will (see _load)
    event = callback.gard.profile(batches(2, seed=2))  # the one allocation, before the optimizer exists
    trainer = _trainer(tmp_path, model, callback, optim="paged_adamw_8bit", max_steps=3)
    trainer.train()
    gard = callback.gard
    assert gard.step_count == 3 and gard.manager.ranks == event["ranks"]
    assert getattr(gard.optimizer, "is_paged", False) and gard.optimizer.state
