import pytest
import torch

from gard_kernels.ring import SketchRing

L, M, K = 5, 7, 123


def _fill_step(ring: SketchRing, gen: torch.Generator, micro_batches: int = 2) -> torch.Tensor:
    """Add `micro_batches` random sketches per layer; returns their sums [L, K]."""
    total = torch.zeros(ring.num_layers, ring.k)
    for _ in range(micro_batches):
        for layer in range(ring.num_layers):
            s = torch.randn(ring.k, generator=gen)
            ring.add(layer, s)
            total[layer] += s
    return total


@pytest.mark.parametrize("kwargs", [dict(num_layers=0, window=4, k=3), dict(num_layers=2, window=1, k=3),
                                    dict(num_layers=2, window=4, k=0), dict(num_layers=2.5, window=4, k=3)])
def test_constructor_rejects_bad_args(kwargs):
    with pytest.raises(ValueError):
        SketchRing(**kwargs)


def test_accumulate_and_advance_match_sums():
    gen = torch.Generator().manual_seed(1)
    ring = SketchRing(L, M, K)
    expected = []
    for step in range(M + 3):
        expected.append(_fill_step(ring, gen))
        ring.advance()
    assert ring.steps == M + 3 and ring.slot == (M + 3) % (M + 1)
    # The open slot is zero and outside the window, which holds the last M steps, oldest first.
    assert torch.equal(ring.buffer[:, ring.slot], torch.zeros(L, K))
    sketches, valid = ring.window_sketches()
    assert sketches.shape == (L, M, K) and valid.all()
    torch.testing.assert_close(sketches, torch.stack(expected[-M:], dim=1), rtol=0, atol=0)
    assert ring.num_invalid == 0


def test_unfilled_slots_invalid():
    ring = SketchRing(2, 4, 3)
    assert not ring.valid.any()
    ring.add(0, torch.ones(3))
    ring.advance()
    assert ring.valid.tolist() == [[True, False, False, False, False]] * 2
    # Oldest first: three slots never filled, then the closed step.
    assert ring.window_sketches()[1].tolist() == [[False, False, False, True]] * 2


def test_current_is_in_place_view_and_add_accepts_any_shape():
    ring = SketchRing(3, 4, 6)
    ring.current(1).view(2, 3).add_(torch.ones(2, 3))
    ring.add(1, torch.arange(6, dtype=torch.float64).view(3, 2))
    assert torch.equal(ring.buffer[1, 0], 1 + torch.arange(6, dtype=torch.float32))
    assert ring.buffer[[0, 2]].abs().sum() == 0
    with pytest.raises(ValueError, match="k=6"):
        ring.add(0, torch.ones(5))
    with pytest.raises(IndexError):
        ring.current(3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_slot_marked_invalid_counted_and_zeroed(bad):
    ring = SketchRing(3, 4, 5)
    for step in range(6):
        for layer in range(3):
            ring.add(layer, torch.ones(5))
        if step in (1, 4):
            ring.current(2)[3] = bad
        ring.advance()
    assert ring.num_invalid == 2
    assert ring.num_invalid_per_layer.tolist() == [0, 0, 2]
    sketches, valid = ring.window_sketches()
    assert torch.isfinite(sketches).all()
    # The window holds steps 2..5, oldest first; steps 1 and 4 of layer 2 were non-finite.
    assert valid.tolist() == [[True] * 4, [True] * 4, [True, True, False, True]]
    assert sketches[2, 2].abs().sum() == 0


def test_reset_clears_window_keeps_counters():
    ring = SketchRing(2, 3, 4)
    ring.add(0, torch.full((4,), float("nan")))
    ring.advance()
    ring.add(1, torch.ones(4))
    ring.reset()
    assert ring.buffer.abs().sum() == 0 and not ring.valid.any() and ring.slot == 0
    assert ring.steps == 1 and ring.num_invalid == 1


def test_state_dict_round_trip_is_exact():
    gen = torch.Generator().manual_seed(2)
    ring = SketchRing(L, M, K)
    for step in range(M + 2):
        _fill_step(ring, gen, micro_batches=1)
        if step == 3:
            ring.current(1)[0] = float("nan")
        ring.advance()
    _fill_step(ring, gen, micro_batches=1)  # an open, partly accumulated step survives too
    state = ring.state_dict()
    other = SketchRing(L, M, K)
    other.load_state_dict(state)
    for name in ("buffer", "valid", "num_invalid_per_layer"):
        assert torch.equal(getattr(other, name), getattr(ring, name))
    assert (other.slot, other.steps, other.num_invalid) == (ring.slot, ring.steps, ring.num_invalid)
    # The state is a snapshot: continuing the original must not change it.
    ring.advance()
    assert not torch.equal(state["buffer"], ring.buffer)
    other.advance()
    assert torch.equal(other.buffer, ring.buffer) and torch.equal(other.valid, ring.valid)


def test_load_state_dict_rejects_mismatch():
    state = SketchRing(2, 4, 6).state_dict()
    with pytest.raises(ValueError, match="window=5"):
        SketchRing(2, 5, 6).load_state_dict(state)
    with pytest.raises(ValueError, match="'buffer'"):
        SketchRing(2, 4, 7).load_state_dict(state)
    with pytest.raises(ValueError, match="missing keys"):
        SketchRing(2, 4, 6).load_state_dict({"buffer": state["buffer"]})
    with pytest.raises(ValueError, match="slot"):
        SketchRing(2, 4, 6).load_state_dict({**state, "slot": 5})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_advance_does_not_synchronise_on_gpu():
    ring = SketchRing(L, M, K, device="cuda")
    sketch = torch.randn(K, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(M + 1):
            for layer in range(L):
                ring.add(layer, sketch)
            ring.advance()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # M + 1 slots, all closed once: M valid per layer, the open one not.
    assert ring.num_invalid == 0 and ring.valid.sum().item() == L * M
