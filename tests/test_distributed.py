"""Data-parallel GARD on CPU: two gloo processes against one process that sees both halves."""
import contextlib
import os

import pytest
import torch
from torch import nn

import gard_kernels as gk
from gard_kernels import distributed

from . import gloo_processes

WORLD = 2
STEPS = 14
MICRO = 2  # micro-batches per process and step; the first runs under no_sync
SAMPLES = 2  # per micro-batch
TARGETS = ["inp", "mid", "out", "spare"]
# Capture is off one step in four (window 3 < interval 4): rank-0 factors are then unused.
CONFIG = dict(
    budget=260, target_modules=TARGETS, mode="dynamic", score="spectral", window=3, interval=4, warmup=4, r_init=2, r_max=6,
    delta_max=2, ema=0.0, grow_init="gradient", shrink="norm", backend="torch", seed=5,
)
REALLOCATIONS = 3  # at steps 4, 8, 12


class Net(nn.Module):
    """Three Linear layers, and a fourth whose output is multiplied by 0: its gradient is zero,
    so GARD takes it to rank 0 (zero-size factors that DDP must skip)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.mid, self.out, self.spare = nn.Linear(12, 16), nn.Linear(16, 10), nn.Linear(10, 6), nn.Linear(10, 6)

    def forward(self, x):
        h = torch.tanh(self.mid(torch.tanh(self.inp(x))))
        return self.out(h) + 0.0 * self.spare(h)


def _model() -> Net:
    return Net()


def _global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[WORLD * MICRO * SAMPLES, 12] inputs, [.., 6] targets of one optimizer step: a rank-2 teacher plus noise."""
    g = torch.Generator().manual_seed(1000 + step)
    teacher = torch.randn(2, 12, generator=torch.Generator().manual_seed(7))
    mix = torch.randn(6, 2, generator=torch.Generator().manual_seed(8))
    x = torch.randn(WORLD * MICRO * SAMPLES, 12, generator=g)
    y = torch.tanh(x @ teacher.T) @ mix.T + 0.1 * torch.randn(x.shape[0], 6, generator=g)
    return x, y


def _micro_batches(step: int, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = _global_batch(step)
    per_rank = MICRO * SAMPLES
    x, y = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
    return list(zip(x.split(SAMPLES), y.split(SAMPLES)))


def _adapters(gard: gk.GARD) -> list[torch.Tensor]:
    return [t.detach().clone() for layer in gard.manager.layers for t in (layer.lora_A, layer.lora_B)]


def _events(gard: gk.GARD) -> list[dict]:
    return [r["reallocation"] for r in gard.history if "reallocation" in r]


def _worker(rank: int, out_dir: str) -> None:
    _check_reduce_window(rank)
    model = _model()
    with pytest.raises(TypeError, match="rebuild_ddp"):
        gk.GARD(nn.parallel.DistributedDataParallel(_model()), gk.GARDConfig(**CONFIG))
    gard = gk.GARD(model, gk.GARDConfig(**CONFIG))
    ddp = distributed.wrap_ddp(model)
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=2e-2)
    gard.attach_optimizer(opt)
    after_resize = []
    for step in range(STEPS):
        batches = _micro_batches(step, rank)
        for index, (x, y) in enumerate(batches):
            last = index == len(batches) - 1
            with ddp.no_sync() if not last else contextlib.nullcontext():
                loss = nn.functional.mse_loss(ddp(x), y) / len(batches)
                loss.backward()
        opt.step()
        event = gard.step()
        opt.zero_grad()
        if event is not None:
            ddp = distributed.rebuild_ddp(ddp)
        elif _events(gard) and _events(gard)[-1]["step"] == step:
            # The first step after a resize went through the rebuilt wrapper.
            after_resize.append(_adapters(gard))
    # A wrapper built directly (not by wrap_ddp) is rebuilt with its own arguments.
    plain = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True, bucket_cap_mb=1)
    rebuilt = distributed.rebuild_ddp(plain)
    assert rebuilt.find_unused_parameters and rebuilt.bucket_bytes_cap == 1024 * 1024
    torch.save(
        {"history": gard.history, "adapters": _adapters(gard), "after_resize": after_resize},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    torch.save(_stale_wrapper_run(rank), os.path.join(out_dir, f"stale{rank}.pt"))
    _profile_marginal_gain(rank, out_dir)


def _stale_wrapper_run(rank: int) -> dict:
    """The loop above without rebuild_ddp: the wrapper built before the first re-allocation keeps
    averaging the old parameters only, and the resized adapters drift apart. GARD's first step
    after the resize refuses on every process."""
    model = _model()
    gard = gk.GARD(model, gk.GARDConfig(**CONFIG))
    ddp = distributed.wrap_ddp(model)
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=2e-2)
    gard.attach_optimizer(opt)
    for step in range(STEPS):
        for x, y in _micro_batches(step, rank):
            (nn.functional.mse_loss(ddp(x), y) / MICRO).backward()
        opt.step()
        try:
            gard.step()
        except RuntimeError as refused:
            return {"step": step, "message": str(refused), "events": _events(gard)}
        opt.zero_grad()
    return {"step": None, "message": "", "events": _events(gard)}


def _check_reduce_window(rank: int) -> None:
    sketches = torch.full((2, 3, 4), float(rank + 1))
    valid = torch.tensor([[True, True, rank == 0], [True, rank == 1, True]])
    mean, both = distributed.reduce_window(sketches, valid)
    assert both.tolist() == [[True, True, False], [True, False, True]]
    expected = torch.where(both[..., None], torch.tensor(1.5), 0.0).expand(2, 3, 4)
    assert torch.equal(mean, expected)
    assert torch.equal(sketches, torch.full((2, 3, 4), float(rank + 1)))  # input untouched


def _single_process_run() -> gk.GARD:
    """One process, every step over all WORLD * MICRO micro-batches with gradient accumulation."""
    model = _model()
    gard = gk.GARD(model, gk.GARDConfig(**CONFIG))
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=2e-2)
    gard.attach_optimizer(opt)
    for step in range(STEPS):
        batches = [b for rank in range(WORLD) for b in _micro_batches(step, rank)]
        for x, y in batches:
            (nn.functional.mse_loss(model(x), y) / len(batches)).backward()
        opt.step(), gard.step(), opt.zero_grad()
    return gard


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """One spawn of two gloo processes for every test of this file: each one is seconds of imports."""
    out = tmp_path_factory.mktemp("ddp")
    gloo_processes.run(_worker, str(out), world=WORLD)
    load = lambda name: [torch.load(out / f"{name}{r}.pt", weights_only=False) for r in range(WORLD)]  # noqa: E731
    return {"run": load("rank"), "profile": load("profile"), "stale": load("stale")}


def test_two_processes_allocate_like_one_process_seeing_both_halves(spawned):
    results = spawned["run"]
    single = _single_process_run()

    ranks = [[h["ranks"] for h in r["history"]] for r in results]
    assert ranks[0] == ranks[1]
    assert ranks[0] == [h["ranks"] for h in single.history]
    events = [r["history"][i]["reallocation"] for r in results for i in range(STEPS) if "reallocation" in r["history"][i]]
    n = REALLOCATIONS
    assert len(events) == 2 * n and events[:n] == events[n:]  # records bit-identical across processes
    # The run exercises growth (with gradient-initialised directions) and shrinkage.
    grew = any(b > a for e in events for a, b in zip(e["old_ranks"], e["ranks"]))
    shrank = any(0 < b < a for e in events for a, b in zip(e["old_ranks"], e["ranks"]))
    assert grew and shrank and ranks[0][-1][TARGETS.index("spare")] == 0
    for mine, theirs in zip(events[:n], _events(single)):
        assert torch.allclose(torch.tensor(mine["eigenvalues"]), torch.tensor(theirs["eigenvalues"]), rtol=1e-4, atol=1e-9)
        assert mine["statistic"] == theirs["statistic"]

    # Adapters stay synchronised across processes after every resize (DDP rebuilt), and follow
    # the single-process run.
    assert len(results[0]["after_resize"]) == n
    for a, b in zip(results[0]["after_resize"] + [results[0]["adapters"]], results[1]["after_resize"] + [results[1]["adapters"]]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    for x, y in zip(results[0]["adapters"], _adapters(single)):
        assert x.shape == y.shape and torch.allclose(x, y, rtol=1e-3, atol=1e-4)


# --- the static default (score="marginal_gain") profiled under torch.distributed ---------------

# The defaults but the budget (q_proj / v_proj of tiny_llama; unequal ranks), the test backend and the seed.
PROFILE_CONFIG = dict(budget=500, backend="torch", seed=3)
PROFILE_STEPS = 4  # the default window


def _profile_batches(rank: int) -> list[dict]:
    from .models import batches

    return batches(PROFILE_STEPS, batch=2, length=12, seed=20 + rank)


def _scaled_loss(model, batch) -> torch.Tensor:
    """The model's loss times the batch's "scale" (NaN poisons the batch)."""
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss * batch["scale"]


def _default_gard(model) -> gk.GARD:
    """GARD with the static defaults on `model`, its optimizer attached: grow_init="gora_safe"
    takes the optimizer's learning rate at the profile."""
    gard = gk.GARD(model, gk.GARDConfig(**PROFILE_CONFIG))
    gard.attach_optimizer(torch.optim.AdamW(gard.lora_parameters(), lr=3e-2))
    return gard


def _profile_marginal_gain(rank: int, out_dir: str) -> None:
    """The static default profiled on this process's batches; then a NaN loss on process 1 only.
    (A process left waiting in a collective fails the test at the process group's timeout.)"""
    from .models import tiny_llama

    config = gk.GARDConfig(**PROFILE_CONFIG)
    assert config.mode == "static" and config.score == "marginal_gain"
    gard = _default_gard(tiny_llama(seed=0))
    event = gard.profile(_profile_batches(rank))

    # A NaN loss on one batch of process 1 only: both processes refuse, and stay usable.
    poisoned = _default_gard(tiny_llama(seed=0))
    scales = [float("nan") if rank == 1 and i == 1 else 1.0 for i in range(PROFILE_STEPS)]
    with pytest.raises(ValueError, match="needs finite gradients on every profile batch") as refused:
        poisoned.profile([dict(b, scale=s) for b, s in zip(_profile_batches(rank), scales)], loss_fn=_scaled_loss)
    unallocated = not poisoned.allocated and not poisoned.history
    # Pieces of 100 floats (a probe's sums are larger): every probe in a collective of its own.
    distributed._GAIN_BUCKET_FLOATS = 100
    again = poisoned.profile([dict(b, scale=1.0) for b in _profile_batches(rank)], loss_fn=_scaled_loss)
    # GoRA's step checked on the profile batches: the losses are averaged over the processes.
    checked, checked_event = _gora_safe_profile(_gora_safe_batches(rank))
    # ... and from the mean gradient of the profile batches but the first (grow_init="gora_mean").
    mean, mean_event = _gora_safe_profile(_gora_safe_batches(rank), "gora_mean")
    # ... and with the step's size searched (grow_init="gora_search").
    search, search_event = _gora_safe_profile(_gora_safe_batches(rank), "gora_search")
    torch.save(
        {"event": event, "refused": str(refused.value), "unallocated": unallocated, "again": again,
         "checked_event": checked_event, "checked_b": [layer.lora_B.detach().clone() for layer in checked.manager.layers],
         "mean_event": mean_event, "mean_b": [layer.lora_B.detach().clone() for layer in mean.manager.layers],
         "search_event": search_event, "search_b": [layer.lora_B.detach().clone() for layer in search.manager.layers]},
        os.path.join(out_dir, f"profile{rank}.pt"),
    )


def _gora_safe_batches(rank: int) -> list[dict]:
    """Process 0: one repeated pattern (GoRA's step helps its other batches; alone it keeps the
    whole step); process 1: random tokens (alone it drops the step). Only the mean over both
    decides the same for both."""
    if rank == 1:
        return _profile_batches(1)
    generator = torch.Generator().manual_seed(20)
    pattern = (torch.arange(12) * 7) % 11
    out = []
    for _ in range(PROFILE_STEPS):
        ids = pattern.repeat(2, 1).clone()
        ids[:, torch.randint(0, 12, (2,), generator=generator)] = torch.randint(0, 11, (2,), generator=generator)
        out.append({"input_ids": ids, "labels": ids})
    return out


def _gora_safe_profile(batches_: list, grow_init: str = "gora_safe") -> tuple:
    from .models import tiny_llama

    gard = gk.GARD(tiny_llama(seed=0), gk.GARDConfig(**PROFILE_CONFIG, grow_init=grow_init, scaling_rule="rslora"))
    gard.attach_optimizer(torch.optim.AdamW(gard.lora_parameters(), lr=3e-2))
    return gard, gard.profile(batches_)


def test_a_wrapper_not_rebuilt_after_a_resize_is_refused_at_the_next_step(spawned):
    stale = spawned["stale"]
    resized = stale[0]["events"][0]["step"]  # GARD counts steps from 1: the loop's index `resized` - 1
    # Refused at the next optimizer step (loop index `resized`), on every process, with what to do.
    assert [r["step"] for r in stale] == [resized] * WORLD
    assert stale[0]["message"] == stale[1]["message"]
    assert f"resized at step {resized}" in stale[0]["message"] and "rebuild_ddp(ddp)" in stale[0]["message"]


def test_marginal_gain_profile_of_two_processes_equals_one_process_seeing_both(spawned, one_thread):
    from .models import tiny_llama

    events = [r["event"] for r in spawned["profile"]]
    assert events[0] == events[1]  # bit-identical: every process allocates from the same reduced probes
    # One process whose every batch joins the two processes' batches: with the same number of
    # tokens and every label valid, its mean loss is the mean of theirs, so its gradient is DDP's.
    joint = [{key: torch.cat([a[key], b[key]]) for key in a} for a, b in zip(_profile_batches(0), _profile_batches(1))]
    single = _default_gard(tiny_llama(seed=0)).profile(joint)
    assert events[0]["ranks"] == single["ranks"]
    assert len(set(single["ranks"])) > 1
    for mine, theirs in zip(events[0]["gains"], single["gains"]):
        assert torch.allclose(torch.tensor(mine), torch.tensor(theirs), rtol=1e-4, atol=1e-8)
    # The process's own batches alone give other gains: the reduction is what makes them agree.
    alone = _default_gard(tiny_llama(seed=0)).profile(_profile_batches(0))
    assert not torch.allclose(torch.tensor(alone["gains"][1]), torch.tensor(single["gains"][1]), rtol=1e-2)


def test_a_nan_loss_on_one_process_refuses_the_profile_on_every_process(spawned):
    profile_runs = spawned["profile"]
    assert profile_runs[0]["refused"] == profile_runs[1]["refused"]
    assert all(r["unallocated"] for r in profile_runs)
    # Refused together, the processes stay in step: the next profile, on finite batches, is the clean
    # one (its collectives split in pieces, one per probe, as a model too large for one piece is).
    assert profile_runs[0]["again"] == profile_runs[1]["again"] == profile_runs[0]["event"]


def test_gora_safe_check_of_two_processes_equals_one_process_seeing_both(spawned, one_thread):
    """grow_init="gora_safe" under torch.distributed: every process keeps the same share of GoRA's
    step (the mean loss over all processes' batches decides) and the same B, as one process
    profiling the joined batches does."""
    runs = spawned["profile"]
    assert runs[0]["checked_event"] == runs[1]["checked_event"]
    assert all(torch.equal(a, b) for a, b in zip(runs[0]["checked_b"], runs[1]["checked_b"]))
    joint = [{key: torch.cat([a[key], b[key]]) for key in a} for a, b in zip(_gora_safe_batches(0), _gora_safe_batches(1))]
    single, event = _gora_safe_profile(joint)
    # Alone, the two processes would decide differently (1 and 0): the reduction is what agrees.
    assert {_gora_safe_profile(_gora_safe_batches(rank))[1]["init_step_scale"] for rank in (0, 1)} == {0.0, 1.0}
    assert runs[0]["checked_event"]["init_step_scale"] == event["init_step_scale"]
    assert runs[0]["checked_event"]["ranks"] == event["ranks"]
    for mine, theirs in zip(runs[0]["checked_b"], [layer.lora_B.detach() for layer in single.manager.layers]):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-7)
    assert any(b.abs().sum() > 0 for b in runs[0]["checked_b"])  # a step was kept, not dropped


def test_gora_mean_of_two_processes_equals_one_process_seeing_both(spawned, one_thread):
    """grow_init="gora_mean" under torch.distributed: the mean gradient of each process's batches
    but the first, averaged over the processes, and the check on every process's first batch, as
    one process profiling the joined batches."""
    runs = spawned["profile"]
    assert runs[0]["mean_event"] == runs[1]["mean_event"]
    assert all(torch.equal(a, b) for a, b in zip(runs[0]["mean_b"], runs[1]["mean_b"]))
    joint = [{key: torch.cat([a[key], b[key]]) for key in a} for a, b in zip(_gora_safe_batches(0), _gora_safe_batches(1))]
    single, event = _gora_safe_profile(joint, "gora_mean")
    assert runs[0]["mean_event"]["init_step_scale"] == event["init_step_scale"] > 0
    assert runs[0]["mean_event"]["ranks"] == event["ranks"]
    for mine, theirs in zip(runs[0]["mean_b"], [layer.lora_B.detach() for layer in single.manager.layers]):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-7)
    # Not the last batch's step: gora_safe's B on the same batches differs.
    assert not all(torch.allclose(a, b, rtol=1e-2) for a, b in zip(runs[0]["mean_b"], runs[0]["checked_b"]))


def test_gora_search_of_two_processes_equals_one_process_seeing_both(spawned, one_thread):
    """grow_init="gora_search" under torch.distributed: every process keeps the same λ (the
    mean loss over all processes' batches decides) and the same B, as one process profiling the
    joined batches does."""
    runs = spawned["profile"]
    assert runs[0]["search_event"] == runs[1]["search_event"]
    assert all(torch.equal(a, b) for a, b in zip(runs[0]["search_b"], runs[1]["search_b"]))
    joint = [{key: torch.cat([a[key], b[key]]) for key in a} for a, b in zip(_gora_safe_batches(0), _gora_safe_batches(1))]
    single, event = _gora_safe_profile(joint, "gora_search")
    alone = {_gora_safe_profile(_gora_safe_batches(rank), "gora_search")[1]["init_step_lambda"] for rank in (0, 1)}
    assert runs[0]["search_event"]["init_step_lambda"] == event["init_step_lambda"] > 0
    assert len(alone) == 2  # alone, the two processes would keep different steps
    for mine, theirs in zip(runs[0]["search_b"], [layer.lora_B.detach() for layer in single.manager.layers]):
        # B is λ / lr times gora_safe's: so is the float noise of the two reductions' orders.
        largest = float(theirs.abs().amax()) if theirs.numel() else 0.0  # rank-0 layers: empty
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4 * largest)


def test_single_process_is_a_no_op():
    assert not distributed.is_distributed()
    sketches, valid = torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    out = distributed.reduce_window(sketches, valid)
    assert out[0] is sketches and out[1] is valid


def test_data_parallel_wrapper_is_rejected():
    with pytest.raises(TypeError, match="GARD first"):
        gk.GARD(nn.DataParallel(_model()), gk.GARDConfig(**CONFIG))
