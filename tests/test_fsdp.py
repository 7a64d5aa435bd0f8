"""GARD on FSDP2 (fully_shard): two gloo processes against one process that sees both halves.

One spawn runs every scenario of a live run (a two-block module in dynamic mode, a tiny Llama in
static mode through GARDCallback, the refusals); a second spawn, fresh processes, resumes the
first run from its torch.distributed.checkpoint. The parent compares with single-process runs.
The checks that need no process group (stale optimizer, ZeRO-3, state layout) run in-process.
"""
import os
import types

import pytest
import torch
import torch.distributed as dist
from torch import nn

import gard_kernels as gk
from gard_kernels import fsdp

from . import gloo_processes

WORLD = 2
MICRO = 2  # micro-batches per process and optimizer step
SAMPLES = 2  # per micro-batch
STEPS = 14
SAVE_AT = 10  # inside the window of the re-allocation at step 12: the checkpoint holds sketches
NET_TARGETS = ["up", "down", "head", "spare"]
NET_CONFIG = dict(
    budget=520, target_modules=NET_TARGETS, mode="dynamic", score="spectral", window=3, interval=4, warmup=4,
    r_init=2, r_max=6, delta_max=2, ema=0.0, grow_init="gradient", shrink="norm", backend="torch", seed=5,
)
LLAMA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
# The earlier defaults (a layer score, GoRA's start): static profiling inside training. The
# current default (marginal gain, profiled in on_train_begin) is _llama_default_run's.
LLAMA_CONFIG = dict(
    budget=900, target_modules=LLAMA_TARGETS, window=3, score="update_nuclear", grow_init="gora", backend="torch", seed=7,
)
LLAMA_STEPS = 5  # static allocation at step 3 (the window), inside training as under a Trainer
# The defaults but the budget (q_proj / v_proj; unequal ranks), the test backend and the seed.
DEFAULT_CONFIG = dict(budget=500, backend="torch", seed=3)


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


class TwoBlockNet(nn.Module):
    """Two shardable blocks and a head; `spare`'s output is multiplied by 0, so GARD takes it to rank 0."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(12), Block(12)])
        self.head, self.spare = nn.Linear(12, 6), nn.Linear(12, 6)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x) + 0.0 * self.spare(x)


def _shard(model: nn.Module, blocks, **kwargs) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _net_batches(step: int, rank=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Micro-batches of one optimizer step: this process's MICRO, or (rank None) every process's."""
    g = torch.Generator().manual_seed(1000 + step)
    teacher = torch.randn(3, 12, generator=torch.Generator().manual_seed(7))
    mix = torch.randn(6, 3, generator=torch.Generator().manual_seed(8))
    x = torch.randn(WORLD * MICRO * SAMPLES, 12, generator=g)
    y = torch.tanh(x @ teacher.T) @ mix.T + 0.1 * torch.randn(x.shape[0], 6, generator=g)
    pairs = list(zip(x.split(SAMPLES), y.split(SAMPLES)))
    return pairs if rank is None else pairs[rank * MICRO : (rank + 1) * MICRO]


def _net_step(model, opt, gard, batches) -> None:
    for x, y in batches:
        (nn.functional.mse_loss(model(x), y) / len(batches)).backward()
    opt.step()
    gard.step()
    opt.zero_grad()


def _llama_batch(step: int, rank=None) -> dict:
    from .models import VOCAB

    ids = torch.randint(0, VOCAB, (WORLD * 2, 10), generator=torch.Generator().manual_seed(500 + step))
    if rank is not None:
        ids = ids[rank * 2 : (rank + 1) * 2]
    return {"input_ids": ids, "labels": ids}


def _factors(gard) -> list[torch.Tensor]:
    return [p.detach().clone() for p in gard.lora_parameters()]


def _start_net(sharded: bool = True):
    model = TwoBlockNet()
    if sharded:
        _shard(model, model.blocks)
    gard = gk.GARD(model, gk.GARDConfig(**NET_CONFIG))
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=2e-2)
    gard.attach_optimizer(opt)
    return model, gard, opt


def _run_worker(rank: int, out_dir: str) -> None:
    result = {}
    result["net"] = _net_run(rank, out_dir)
    result["llama"] = _llama_run(rank, out_dir)
    result["default"] = _llama_default_run(rank, out_dir)
    _mixed_precision_run(rank)
    _refusals(rank)
    torch.save(result, os.path.join(out_dir, f"run{rank}.pt"))


def _net_run(rank: int, out_dir: str) -> dict:
    """Dynamic GARD built after fully_shard; a DCP checkpoint at SAVE_AT; the full state dict at the end."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model, gard, opt = _start_net()
    per_step = []
    for step in range(STEPS):
        _net_step(model, opt, gard, _net_batches(step, rank))
        per_step.append(_factors(gard))
        if step + 1 == SAVE_AT:
            # The optimizer holds only the replicated factors: its own state_dict, written once.
            dcp.save({"gard": gard.state_dict()}, checkpoint_id=os.path.join(out_dir, "dcp"))
            if rank == 0:
                torch.save(opt.state_dict(), os.path.join(out_dir, "optimizer.pt"))
    # Rank-0 (zero-size) adapters do not break a full state dict; the factors are plain tensors.
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    lora = {k: v for k, v in full.items() if "lora_" in k}
    assert len(lora) == 2 * len(gard.names) and full["spare.lora_A"].numel() == 0, (sorted(lora), gard.ranks)
    for name, layer in zip(gard.names, gard.manager.layers):
        assert all(torch.equal(lora[f"{name}.{f}"], getattr(layer, f).detach()) for f in ("lora_A", "lora_B"))
    return {"history": gard.history, "per_step": per_step}


def _llama_run(rank: int, out_dir: str) -> dict:
    """Static GARD through GARDCallback on a sharded Llama: the profile runs under sharding."""
    from gard_kernels.integrations.hf_trainer import GARDCallback

    from .models import tiny_llama

    model = tiny_llama(seed=0)
    _shard(model, model.model.layers)
    callback = GARDCallback(gk.GARDConfig(**LLAMA_CONFIG))
    callback.prepare(model)
    gard = callback.gard
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=1e-2)
    args, state = types.SimpleNamespace(output_dir=out_dir), types.SimpleNamespace(global_step=0)
    callback.on_train_begin(args, state, None, model=model, optimizer=opt)

    # The sketch of a sharded model equals an unsharded copy's on the same batch.
    copy = tiny_llama(seed=0)
    copy_gard = gk.GARD(copy, gk.GARDConfig(**LLAMA_CONFIG))
    batch = _llama_batch(0, rank)
    copy(**batch).loss.backward()
    model(**batch).loss.backward()
    sketch_equal = torch.equal(gard.ring.open, copy_gard.ring.open) and bool(gard.ring.open.abs().sum() > 0)
    opt.step(), opt.zero_grad()
    state.global_step = 1
    callback.on_step_end(args, state, None)
    for step in range(1, LLAMA_STEPS):
        model(**_llama_batch(step, rank)).loss.backward()
        opt.step(), opt.zero_grad()
        state.global_step = step + 1
        callback.on_step_end(args, state, None)
    gard.save_pretrained(os.path.join(out_dir, "peft"))
    with torch.no_grad():
        logits = model.eval()(input_ids=_llama_batch(99)["input_ids"]).logits
    return {"history": gard.history, "factors": _factors(gard), "sketch_equal": sketch_equal, "logits": logits}


def _default_batches(rank=None) -> list[dict]:
    """The profile's window of batches: this process's, or (rank None) both processes' joined per batch."""
    return [_llama_batch(100 + step, rank) for step in range(4)]


def _llama_default_run(rank: int, out_dir: str) -> dict:
    """The default config (static, marginal gain) through GARDCallback on a sharded Llama: the
    callback profiles this process's dataloader in on_train_begin, the gain probes are averaged."""
    from gard_kernels.integrations.hf_trainer import GARDCallback

    from .models import tiny_llama

    model = tiny_llama(seed=0)
    _shard(model, model.model.layers)
    config = gk.GARDConfig(**DEFAULT_CONFIG)
    assert config.mode == "static" and config.score == "marginal_gain"
    callback = GARDCallback(config)
    callback.prepare(model)
    opt = torch.optim.AdamW(callback.gard.lora_parameters(), lr=1e-2)
    args = types.SimpleNamespace(output_dir=out_dir, device=torch.device("cpu"))
    callback.on_train_begin(
        args, types.SimpleNamespace(global_step=0), None, model=model, optimizer=opt, train_dataloader=_default_batches(rank),
    )
    return {"history": callback.gard.history}


def _mixed_precision_run(rank: int) -> None:
    """bf16 compute (MixedPrecisionPolicy) with float32 adapters that train and stay identical."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model = TwoBlockNet()
    _shard(model, model.blocks, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    gard = gk.GARD(model, gk.GARDConfig(**NET_CONFIG))
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=2e-2)
    gard.attach_optimizer(opt)
    for step in range(5):
        for x, y in _net_batches(step, rank):
            (nn.functional.mse_loss(model(x), y) / MICRO).backward()
        # Averaged before clipping, so that the clip is the global gradient's; the step does not average again.
        fsdp.average_lora_gradients(gard)
        _assert_same_everywhere(torch.cat([p.grad.reshape(-1) for p in gard.lora_parameters() if p.grad is not None]))
        torch.nn.utils.clip_grad_norm_(gard.lora_parameters(), 0.05)
        opt.step(), gard.step(), opt.zero_grad()
    factors = torch.cat([p.reshape(-1) for p in gard.lora_parameters()])
    assert factors.dtype == torch.float32 and gard.manager.layers[0].lora_B.abs().sum() > 0
    _assert_same_everywhere(factors)


def _assert_same_everywhere(values: torch.Tensor) -> None:
    gathered = [torch.empty_like(values) for _ in range(WORLD)]
    dist.all_gather(gathered, values)
    assert all(torch.equal(gathered[0], other) for other in gathered[1:])


def _refusals(rank: int) -> None:
    from torch.distributed.fsdp import fully_shard

    # A config (here the seed) that differs between the processes.
    with pytest.raises(ValueError, match="seed: process 0 has 5, process 1 has 6"):
        gk.GARD(TwoBlockNet(), gk.GARDConfig(**(NET_CONFIG | {"seed": 5 + rank})))

    # GARD built before fully_shard, the optimizer too: fully_shard replaces (and shards) the
    # factors, the optimizer trains nothing, and a load would miss the live shards.
    model, gard, opt = _start_net(sharded=False)
    saved = gard.state_dict()
    _shard(model, model.blocks)
    x, y = _net_batches(0, rank)[0]
    nn.functional.mse_loss(model(x), y).backward()
    for call in (opt.step, gard.step, lambda: gard.profile([{}, {}]), lambda: gard.load_state_dict(saved)):
        with pytest.raises(RuntimeError, match="fully_shard sharded GARD's LoRA factors"):
            call()

    # The same with ignored_params: the factors stay GARD's, and training keeps them identical.
    model, gard, opt = _start_net(sharded=False)
    ignored = set(gard.lora_parameters())
    for block in model.blocks:
        fully_shard(block, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)
    for step in range(2):
        _net_step(model, opt, gard, _net_batches(step, rank))
    _assert_same_everywhere(torch.cat([p.reshape(-1) for p in gard.lora_parameters()]))

    # Sharded without an attached optimizer: GARD cannot reduce the gradients.
    model = _shard(TwoBlockNet(), [])
    gard = gk.GARD(model, gk.GARDConfig(**NET_CONFIG))
    with pytest.raises(RuntimeError, match="no optimizer is attached"):
        gard.step()

    # The Trainer / Accelerate order: the callback wraps at Trainer(...), Accelerate shards in train().
    from gard_kernels.integrations.hf_trainer import GARDCallback

    model = TwoBlockNet()
    callback = GARDCallback(gk.GARDConfig(**NET_CONFIG))
    callback.prepare(model)
    _shard(model, model.blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(RuntimeError, match="apply fully_shard to the model yourself before Trainer"):
        callback.on_train_begin(None, types.SimpleNamespace(global_step=0), None, model=model, optimizer=opt)

    # FSDP1 wrappers.
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped = FullyShardedDataParallel(TwoBlockNet(), device_id=torch.device("cpu"))
    with pytest.raises(TypeError, match="FSDP1"):
        gk.GARD(wrapped, gk.GARDConfig(**NET_CONFIG))


def _resume_worker(rank: int, out_dir: str) -> None:
    """Fresh processes: GARD's state into a fresh GARD in place, then the optimizer's, as documented."""
    import torch.distributed.checkpoint as dcp

    model, gard, opt = _start_net()
    state = {"gard": gard.state_dict()}
    dcp.load(state, checkpoint_id=os.path.join(out_dir, "dcp"))
    gard.load_state_dict(state["gard"])
    opt.load_state_dict(torch.load(os.path.join(out_dir, "optimizer.pt")))
    gard.attach_optimizer(opt)
    for step in range(SAVE_AT, STEPS):
        _net_step(model, opt, gard, _net_batches(step, rank))
    torch.save({"history": gard.history, "factors": _factors(gard)}, os.path.join(out_dir, f"resumed{rank}.pt"))


def _single_net_run() -> gk.GARD:
    model, gard, opt = _start_net(sharded=False)
    for step in range(STEPS):
        _net_step(model, opt, gard, _net_batches(step))
    return gard


def _single_llama_run() -> gk.GARD:
    from .models import tiny_llama

    model = tiny_llama(seed=0)
    gard = gk.GARD(model, gk.GARDConfig(**LLAMA_CONFIG))
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=1e-2)
    gard.attach_optimizer(opt)
    for step in range(LLAMA_STEPS):
        # Both processes' sequences in one batch: the mean loss over the same tokens.
        model(**_llama_batch(step)).loss.backward()
        opt.step(), gard.step(), opt.zero_grad()
    return gard


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not fsdp.fully_shard_available():
        pytest.skip("this torch has no torch.distributed.fsdp.fully_shard (FSDP2)")
    out = tmp_path_factory.mktemp("fsdp")
    gloo_processes.run(_run_worker, str(out), world=WORLD)
    gloo_processes.run(_resume_worker, str(out), world=WORLD)
    load = lambda name: [torch.load(out / f"{name}{r}.pt", weights_only=False) for r in range(WORLD)]  # noqa: E731
    return {"run": load("run"), "resumed": load("resumed"), "dir": out}


def _ranks(history) -> list[list[int]]:
    return [record["ranks"] for record in history]


def test_dynamic_gard_after_fully_shard_equals_one_process_on_the_joint_batch(runs, one_thread):
    nets = [r["net"] for r in runs["run"]]
    single = _single_net_run()
    assert _ranks(nets[0]["history"]) == _ranks(nets[1]["history"]) == _ranks(single.history)
    events = [r["reallocation"] for r in nets[0]["history"] if "reallocation" in r]
    assert len(events) == 3 and any(a != b for e in events for a, b in zip(e["old_ranks"], e["ranks"]))
    assert nets[0]["history"][-1]["ranks"][-1] == 0  # spare, the last adapted module
    # Identical on both processes after every step (main drifted apart: nothing reduced the gradients).
    for mine, theirs in zip(nets[0]["per_step"], nets[1]["per_step"]):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    for a, b in zip(nets[0]["per_step"][-1], _factors(single)):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-3, atol=1e-5)


def test_static_gard_profiles_under_sharding_through_the_callback(runs, one_thread):
    llamas = [r["llama"] for r in runs["run"]]
    assert all(r["sketch_equal"] for r in llamas)
    single = _single_llama_run()
    assert _ranks(llamas[0]["history"]) == _ranks(llamas[1]["history"]) == _ranks(single.history)
    assert llamas[0]["history"][2]["reallocation"]["step"] == 3
    assert all(torch.equal(a, b) for a, b in zip(llamas[0]["factors"], llamas[1]["factors"]))
    for a, b in zip(llamas[0]["factors"], _factors(single)):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-3, atol=1e-5)


def test_default_marginal_gain_profiles_under_sharding_like_one_process(runs, one_thread):
    from .models import tiny_llama

    events = [r["default"]["history"][-1]["reallocation"] for r in runs["run"]]
    assert events[0] == events[1]
    # One unsharded process on the joined batches (same token count per process: its mean loss is theirs).
    single = gk.GARD(tiny_llama(seed=0), gk.GARDConfig(**DEFAULT_CONFIG))
    # As the callback attaches the Trainer's: grow_init="gora_safe" takes its learning rate.
    single.attach_optimizer(torch.optim.AdamW(single.lora_parameters(), lr=1e-2))
    single = single.profile(_default_batches())
    assert events[0]["ranks"] == single["ranks"] and len(set(single["ranks"])) > 1
    for mine, theirs in zip(events[0]["gains"], single["gains"]):
        assert torch.allclose(torch.tensor(mine), torch.tensor(theirs), rtol=1e-4, atol=1e-8)


def test_peft_export_of_the_sharded_model_reproduces_it(runs, one_thread):
    peft = pytest.importorskip("peft")
    from .models import tiny_llama

    restored = peft.PeftModel.from_pretrained(tiny_llama(seed=0), str(runs["dir"] / "peft")).eval()
    with torch.no_grad():
        logits = restored(input_ids=_llama_batch(99)["input_ids"]).logits
    expected = runs["run"][0]["llama"]["logits"]
    assert not torch.equal(logits, tiny_llama(seed=0)(input_ids=_llama_batch(99)["input_ids"]).logits)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_dcp_checkpoint_resumes_in_fresh_processes_like_the_uninterrupted_run(runs):
    whole = runs["run"][0]["net"]
    for resumed in runs["resumed"]:
        assert _ranks(resumed["history"]) == _ranks(whole["history"])
        assert [r.get("reallocation") for r in resumed["history"]] == [r.get("reallocation") for r in whole["history"]]
        for a, b in zip(resumed["factors"], whole["per_step"][-1]):
            assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_an_optimizer_without_the_current_factors_is_caught_at_step_and_profile():
    model, gard, opt = _start_net(sharded=False)
    layer = gard.manager.layers[1]
    # What fully_shard or a wrapper does after attach_optimizer: new Parameter objects.
    layer.lora_B = nn.Parameter(layer.lora_B.detach().clone())
    x, y = _net_batches(0, 0)[0]
    nn.functional.mse_loss(model(x), y).backward()
    message = r"does not hold GARD's current LoRA parameters \(1 of 12, e.g. 'blocks.0.down.lora_B'\)"
    for call in (opt.step, gard.step, lambda: gard.profile([(x, y)] * 3, loss_fn=lambda m, b: m(b[0]).sum())):
        with pytest.raises(RuntimeError, match=message):
            call()
    assert gard.step_count == 0 and gard.history == []
    gard.attach_optimizer(torch.optim.AdamW(gard.lora_parameters(), lr=1e-2))
    gard.step()


def test_zero3_partitioned_weights_are_refused_before_the_model_changes():
    model = TwoBlockNet()
    # What DeepSpeed ZeRO-3 leaves on each process: an empty local partition tagged with ds_id.
    model.head.weight = nn.Parameter(torch.empty(0))
    model.head.weight.ds_id = 4
    with pytest.raises(ValueError, match="'head' is partitioned .*DeepSpeed ZeRO-3 is not supported"):
        gk.GARD(model, gk.GARDConfig(**NET_CONFIG))
    assert isinstance(model.blocks[0].up, nn.Linear) and model.blocks[0].up.weight.requires_grad


def test_state_dict_tensors_keep_their_shapes_whatever_the_ranks():
    """torch.distributed.checkpoint loads into a fresh GARD's state_dict() in place: same shapes."""
    model, gard, opt = _start_net(sharded=False)
    fresh = gard.state_dict()
    for step in range(STEPS):
        _net_step(model, opt, gard, _net_batches(step))
    trained = gard.state_dict()
    assert gard.manager.ranks != [NET_CONFIG["r_init"]] * len(gard.names)

    def shapes(state):
        out = {}
        for key, value in state.items():
            if isinstance(value, dict):
                out |= {f"{key}.{k}": v for k, v in shapes(value).items()}
            elif torch.is_tensor(value):
                out[key] = (value.shape, value.dtype)
        return out

    assert shapes(fresh) == shapes(trained) and isinstance(trained["history"], tuple)
    copy = gk.GARD(TwoBlockNet(), gk.GARDConfig(**NET_CONFIG))
    copy.load_state_dict(trained)
    assert copy.ranks == gard.ranks and copy.history == gard.history
    assert all(torch.equal(a, b) for a, b in zip(copy.lora_parameters(), gard.lora_parameters()))
    # A state saved before the flat layout (per-layer factors, a list history) still loads.
    legacy = dict(trained, history=list(gard.history), ema_statistic=None)
    del legacy["adapter_values"], legacy["has_ema_statistic"]
    legacy["adapters"] = [{"lora_A": layer.lora_A.detach(), "lora_B": layer.lora_B.detach()} for layer in gard.manager.layers]
    old = gk.GARD(TwoBlockNet(), gk.GARDConfig(**NET_CONFIG))
    old.load_state_dict(legacy)
    assert old.ranks == gard.ranks and old.ema_statistic is None
    assert all(torch.equal(a, b) for a, b in zip(old.lora_parameters(), gard.lora_parameters()))
