"""GainProbe: cross-fitted singular values of a layer's mean gradient over a profile, G never formed.

The marginal-gain allocator (marginal_gain.py) needs, per layer, the j-th singular value of the
mean gradient over the profile for j up to r_max. The 16 x 16 sketch cannot give them: a sketch
of a flat spectrum concentrates its energy in a few values (the top 4 of 16 hold about 65 % of
it where the gradient's top 4 of 192 hold 2 %). The probe is a randomized SVD with oversampling
and one power step (Halko, Martinsson, Tropp 2011, Alg. 4.3 with q = 1 and Alg. 5.1; the
multi-pass form of lora/range_finder.py's single-pass estimate), run on each half of the
profile over the same batches three times, and cross-fitted:

  pass 1 ("range"):   Y_h = G_h Omega            [d_out, p]  (h = the half a batch belongs to)
  pass 2 ("power"):   Z_h = G_h^T orth(Y_h)      [d_in, p];  Q_h = orth(Z_h) spans G_h's leading rows
  pass 3 ("project"): P_h = G_h [Q_0, Q_1]        [d_out, 2p] exactly

G_h Q_h = U_h S_h W_h^T gives half h's directions u_{h,j}, v_{h,j} = Q_h w_{h,j} (and S_h / n_h
its singular values, without the leak of a single-pass estimate on flat spectra); the gain of
direction j is measured on the other half, u_{h,j}^T (G_h' / n_h') v_{h,j}, and averaged over the
two splits. Noise that is independent between the halves has zero mean along directions chosen
on the other half, so a short profile's noise floor (the singular values every noisy mean has)
drops out, while a direction the gradient keeps across the profile keeps its singular value.
The power step matters when the gradient's spectrum has a long flat tail: without it, p random
columns capture the leading directions only partly and the gains come out low (about 25 % below
the exact cross-fit on tests/test_marginal_gain.py's planted signal).
"""
from __future__ import annotations

import torch

__all__ = ["GainProbe"]

PHASES = ("range", "power", "project")


class GainProbe:
    """Accumulates the two passes of one layer; `gains()` turns them into per-unit gains.

    Args:
        d_in, d_out: the layer's input and output sizes.
    """

    def __init__(self, d_in: int, d_out: int):
        self.d_in, self.d_out = d_in, d_out
        self.phase: str | None = None
        self.half = 0
        self._test: torch.Tensor | None = None  # what the current pass multiplies by
        self._acc: torch.Tensor | None = None  # [2, rows, p]: the current pass's sums per half
        self._q: torch.Tensor | None = None  # [d_in, 2p'] = [Q_0, Q_1] once pass 3 runs
        self.tokens = [0, 0]  # tokens per half in the current pass
        self.finite = [True, True]  # every pass of the half was finite

    def __repr__(self) -> str:
        width = "off" if self._acc is None else self._acc.shape[-1]
        return f"GainProbe(d_in={self.d_in}, d_out={self.d_out}, p={width}, phase={self.phase!r})"

    @property
    def recording(self) -> bool:
        """Whether backward passes feed it now."""
        return self.phase is not None

    @property
    def sums(self) -> torch.Tensor:
        """[2, rows, p'] the current pass's running sums per half; reducible in place (e.g. all_reduce).

        Every pass is linear in G and every process draws the same Omega, so the processes' mean
        of these sums, taken before each next_pass() and before gains(), is the probe of their
        mean gradient (distributed.reduce_gain_probes); `finite` is then the same everywhere.

        Raises:
            RuntimeError: not recording.
        """
        if self.phase is None:
            raise RuntimeError("GainProbe.sums: not recording; call start() first")
        return self._acc

    def start(self, p: int, generator: torch.Generator | None = None) -> None:
        """Begin pass 1 with p columns (p = the most gains wanted + oversampling); discards any estimate."""
        if not isinstance(p, int) or isinstance(p, bool) or p <= 0:
            raise ValueError(f"GainProbe.start: p must be a positive int, got {p!r}")
        device = generator.device if generator is not None else torch.device("cpu")
        self._test = torch.randn(self.d_in, p, generator=generator, device=device)  # Omega
        self._acc = torch.zeros(2, self.d_out, p, device=device)
        self._q = None
        self.tokens = [0, 0]
        self.finite = [True, True]
        self.phase, self.half = "range", 0

    def set_half(self, half: int) -> None:
        """Which half of the profile the next backward passes belong to (0 or 1)."""
        if half not in (0, 1):
            raise ValueError(f"GainProbe.set_half: half must be 0 or 1, got {half!r}")
        self.half = half

    def next_pass(self) -> None:
        """Close the current pass and begin the next one over the same batches."""
        if self.phase not in PHASES[:2]:
            raise RuntimeError(f"GainProbe.next_pass: pass 1 or 2 must be running (phase {self.phase!r})")
        acc = self._acc.double()
        # A non-finite pass poisons the half: its basis is empty of information (zeros), gains() says so.
        finite = [bool(torch.isfinite(acc[h]).all()) for h in range(2)]
        bases = [torch.linalg.qr(acc[h] if finite[h] else torch.zeros_like(acc[h]))[0].float() for h in range(2)]
        self.finite = [a and b for a, b in zip(self.finite, finite)]
        if self.phase == "range":
            # Pass 2 multiplies G_h^T by half h's own column basis: one [d_out, p] basis per half.
            self._test = torch.stack(bases)  # [2, d_out, p']
            self._acc = self._acc.new_zeros(2, self.d_in, self._test.shape[-1])
            self.phase = "power"
        else:
            self._test = torch.cat(bases, dim=1)  # [d_in, 2p'] = [Q_0, Q_1]
            self._q = self._test
            self._acc = self._acc.new_zeros(2, self.d_out, self._test.shape[1])
            self.phase = "project"
        self.tokens = [0, 0]

    def stop(self) -> None:
        """Stop recording (the estimate, if pass 3 ran, is kept for gains())."""
        self.phase = None

    def clear(self) -> None:
        """Free everything."""
        self.phase = None
        self._test = self._acc = self._q = None
        self.tokens = [0, 0]
        self.finite = [True, True]

    def accumulate(self, x: torch.Tensor, dy: torch.Tensor) -> None:
        """Add one backward pass to the current half (G = dY^T X, never formed):
        pass 1 Y_h += dY^T (X Omega), pass 2 Z_h += X^T (dY B_h), pass 3 P_h += dY^T (X [Q_0, Q_1]).

        Args:
            x: [..., d_in] layer input. dy: [..., d_out] gradient of the layer output.
        """
        if self.phase is None:
            raise RuntimeError("GainProbe.accumulate: not recording; call start() first")
        x2 = x.reshape(-1, self.d_in).float()  # [N, d_in]
        dy2 = dy.reshape(-1, self.d_out).float()  # [N, d_out]
        if self._acc.device != x2.device:
            self._test, self._acc = self._test.to(x2.device), self._acc.to(x2.device)
        if self.phase == "power":
            self._acc[self.half].addmm_(x2.T, dy2 @ self._test[self.half])
        else:
            self._acc[self.half].addmm_(dy2.T, x2 @ self._test)
        self.tokens[self.half] += x2.shape[0]

    def _halves(self, steps: tuple[int, int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(bases Q_h [d_in, p'], panels P_h / n_h [d_out, 2p']) in float64 on the CPU."""
        if self._q is None:
            raise RuntimeError("GainProbe: pass 3 has not run; start(), then feed three passes with next_pass() between them")
        if min(steps) < 1:
            raise ValueError(f"GainProbe: each half needs at least one step, got {steps}")
        q = self._q.double().cpu()
        width = q.shape[1] // 2
        panels = [self._acc[h].double().cpu() / steps[h] for h in range(2)]
        return [q[:, :width], q[:, width:]], panels

    def singular_values(self, half: int, steps: int) -> torch.Tensor:
        """[p'] singular values of half `half`'s mean gradient (two-pass estimate, not cross-fitted).

        Args:
            half: 0 or 1.
            steps: the number of optimizer steps (batches) in that half.
        """
        counts = (steps, steps)
        _, panels = self._halves(counts)
        width = panels[half].shape[1] // 2
        block = panels[half][:, half * width:(half + 1) * width]  # G_h Q_h / n_h
        return torch.linalg.svdvals(block)

    def gains(self, steps: tuple[int, int]) -> torch.Tensor:
        """[min(p', d_out)] cross-fitted gains of the mean gradient, >= 0, non-increasing.

        Gain j = mean over the two splits of u_{h,j}^T (G_h' / n_h') v_{h,j}, clipped at 0 and
        sorted (the allocator takes a layer's best directions first). Non-finite gradients in
        either pass give zeros: nothing is known about the layer.

        Args:
            steps: (n_0, n_1), the number of batches in each half.
        """
        bases, panels = self._halves(steps)
        width = bases[0].shape[1]
        if not (all(self.finite) and all(bool(torch.isfinite(p).all()) for p in panels)):
            return torch.zeros(min(self.d_out, width), dtype=torch.float64)
        cross = torch.zeros(min(self.d_out, width), dtype=torch.float64)
        for h in range(2):
            other = 1 - h
            own = panels[h][:, h * width:(h + 1) * width]  # G_h Q_h / n_h   [d_out, p']
            seen = panels[other][:, h * width:(h + 1) * width]  # G_h' Q_h / n_h'   [d_out, p']
            u, _, wh = torch.linalg.svd(own, full_matrices=False)  # own = U S W^T
            # u_j^T (G_h' Q_h) w_j for every j: the diagonal of U^T (G_h' Q_h) W.
            cross += ((u.T @ seen) * wh).sum(dim=1)
        return (cross / 2).clamp_min(0.0).sort(descending=True).values
