"""SketchRing: the last M gradient sketches of every adapted layer, kept on the device.

One slot per optimizer step. Fused kernels and `add` accumulate micro-batch sketches into the
open slot, `open` [L, k], whose memory never moves: capture handles take a view of it once.
`advance` closes the step by copying it into the history and zeroing it. The history holds
M + 1 slots so that the window always has M closed steps besides the one being written. Nothing here synchronises with the GPU on the hot path:
the slot index and step count live on the host (they are known without looking at the data), the
validity mask and invalid counters live on the device and are read only when asked for.
"""
from __future__ import annotations

import numbers
from typing import Any

import torch


class SketchRing:
    """Ring buffer of per-layer gradient sketches over the last `window` optimizer steps.

    Args:
        num_layers: L, number of adapted layers (>= 1).
        window: M, number of steps kept (>= 2: one step gives no spectrum).
        k: sketch length per layer per step, k_out * k_in (>= 1).
        device: where the buffer lives; default CPU.
    """

    def __init__(self, num_layers: int, window: int, k: int, device: torch.device | str | None = None):
        for name, value, low in (("num_layers", num_layers, 1), ("window", window, 2), ("k", k, 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an int, got {value!r}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        num_layers, window, k = int(num_layers), int(window), int(k)
        self.num_layers, self.window, self.k = num_layers, window, k
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.slots = window + 1
        self._history = torch.zeros(num_layers, self.slots, k, dtype=torch.float32, device=self.device)  # [L, M+1, k]
        self.open = torch.zeros(num_layers, k, dtype=torch.float32, device=self.device)  # [L, k]
        self.valid = torch.zeros(num_layers, self.slots, dtype=torch.bool, device=self.device)  # [L, M+1]
        self._invalid_per_layer = torch.zeros(num_layers, dtype=torch.int64, device=self.device)  # [L]
        self.slot = 0
        self.steps = 0

    def to(self, device: torch.device | str) -> "SketchRing":
        """Move every slot, the validity mask and the counters to `device` (in place; returns self).

        Views from `current()` taken before point at the old memory: take them again.
        """
        for name in ("_history", "open", "valid", "_invalid_per_layer"):
            setattr(self, name, getattr(self, name).to(device))
        self.device = self.open.device
        return self

    @property
    def buffer(self) -> torch.Tensor:
        """[L, M+1, k] every slot, the open one (at index `slot`) included.

        The open step lives in `open`; reading `buffer` copies it into its slot first.
        """
        self._history[:, self.slot].copy_(self.open)
        return self._history

    def current(self, layer: int) -> torch.Tensor:
        """[k] float32 view of the open slot of `layer`; writing into it accumulates in place.

        The view stays valid for the ring's lifetime: `advance` never moves the open slot's memory.
        """
        return self.open[self._check_layer(layer)]

    def add(self, layer: int, sketch: torch.Tensor) -> None:
        """Accumulate a sketch into the open slot of `layer` (micro-batches of one step sum).

        Args:
            layer: layer index in [0, L).
            sketch: any shape with k elements (e.g. [k_out, k_in]), any float dtype; cast to float32.
        """
        slot = self.current(layer)
        if sketch.numel() != self.k:
            raise ValueError(f"sketch has {sketch.numel()} elements, ring expects k={self.k}")
        slot.add_(sketch.reshape(-1).to(device=self.device, dtype=torch.float32))

    def advance(self) -> None:
        """Close the open step and open the next slot (zeroed, invalid until it is closed).

        Layers whose closed sketch holds NaN/Inf get the slot marked invalid, counted, and zeroed,
        so a consumer that ignores `valid` still never sees non-finite values.
        """
        closed = self._history[:, self.slot]  # [L, k]
        closed.copy_(self.open)
        finite = torch.isfinite(closed).all(dim=-1)  # [L]
        self.valid[:, self.slot] = finite
        self._invalid_per_layer += (~finite).to(torch.int64)
        closed.masked_fill_(~finite[:, None], 0.0)
        self.slot = (self.slot + 1) % self.slots
        self.open.zero_()
        self._history[:, self.slot].zero_()
        self.valid[:, self.slot] = False
        self.steps += 1

    def window_sketches(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The M most recently closed sketches and their validity, oldest first (a copy).

        Returns:
            sketches: [L, M, k] float32.
            valid: [L, M] bool (slots never filled yet are invalid).
        """
        order = torch.tensor(
            [(self.slot + 1 + i) % self.slots for i in range(self.window)], device=self.device
        )
        return self._history.index_select(1, order), self.valid.index_select(1, order)

    def reset(self) -> None:
        """Forget the window, including the open slot (e.g. for a fresh window after reallocation).

        `steps` and the invalid counters are lifetime statistics and are kept.
        """
        self._history.zero_()
        self.open.zero_()
        self.valid.zero_()
        self.slot = 0

    @property
    def num_invalid_per_layer(self) -> torch.Tensor:
        """[L] int64 device tensor: closed layer-slots rejected for NaN/Inf since construction."""
        return self._invalid_per_layer

    @property
    def num_invalid(self) -> int:
        """Total rejected layer-slots; reading it synchronises with the device."""
        return int(self._invalid_per_layer.sum().item())

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: buffer, validity, counters, slot, steps."""
        return {
            "buffer": self.buffer.clone(),
            "valid": self.valid.clone(),
            "invalid_per_layer": self._invalid_per_layer.clone(),
            "slot": self.slot,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()` output, copying onto this ring's device.

        Args:
            state: dict with keys buffer [L, M+1, k], valid [L, M+1], invalid_per_layer [L], slot, steps;
                shapes must match this ring's (num_layers, window, k).
        """
        missing = {"buffer", "valid", "invalid_per_layer", "slot", "steps"} - set(state)
        if missing:
            raise ValueError(f"SketchRing state is missing keys {sorted(missing)}")
        expected = {
            "buffer": (self.num_layers, self.slots, self.k),
            "valid": (self.num_layers, self.slots),
            "invalid_per_layer": (self.num_layers,),
        }
        for key, shape in expected.items():
            got = tuple(state[key].shape)
            if got != shape:
                raise ValueError(
                    f"SketchRing state {key!r} has shape {got}, expected {shape} "
                    f"(num_layers={self.num_layers}, window={self.window}, k={self.k})"
                )
        slot, steps = int(state["slot"]), int(state["steps"])
        if not 0 <= slot < self.slots:
            raise ValueError(f"SketchRing state slot {slot} outside [0, {self.slots})")
        if steps < 0:
            raise ValueError(f"SketchRing state steps must be >= 0, got {steps}")
        self._history.copy_(state["buffer"])
        self.open.copy_(self._history[:, slot])
        self.valid.copy_(state["valid"])
        self._invalid_per_layer.copy_(state["invalid_per_layer"])
        self.slot, self.steps = slot, steps

    def _check_layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 0 <= layer < self.num_layers:
            raise IndexError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return int(layer)

    def __repr__(self) -> str:
        return (
            f"SketchRing(num_layers={self.num_layers}, window={self.window}, k={self.k}, "
            f"device={self.device}, slot={self.slot}, steps={self.steps})"
        )
