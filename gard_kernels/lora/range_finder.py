"""RangeFinder: the top input directions of a layer's weight gradient, G never formed.

A single-pass randomized range finder (Halko, Martinsson, Tropp 2011, sec. 5.5) fed with the
same (X, dY) pairs the capture sketches: it accumulates Z = G^T Omega_out and Y = G Omega_in for
G = sum_tokens dY^T X, and `top_input_directions` turns them into the leading right singular
vectors of G. A gradient-initialised grow ("gradient" grow_init) starts new LoRA A rows there.
"""
from __future__ import annotations

import torch

__all__ = ["RangeFinder"]


class RangeFinder:
    """Accumulates Z = G^T Omega_out [d_in, p] and Y = G Omega_in [d_out, p] while armed.

    Args:
        d_in, d_out: the layer's input and output sizes.
    """

    def __init__(self, d_in: int, d_out: int):
        self.d_in, self.d_out = d_in, d_out
        self._omega_in: torch.Tensor | None = None
        self._omega_out: torch.Tensor | None = None
        self._z: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        # Tokens accumulated since arm(); distributed.reduce_range_finders sums it over processes.
        self.tokens = 0

    def __repr__(self) -> str:
        width = "off" if self._z is None else self._z.shape[1]
        return f"RangeFinder(d_in={self.d_in}, d_out={self.d_out}, p={width}, tokens={self.tokens})"

    @property
    def armed(self) -> bool:
        """Whether backward passes feed it."""
        return self._z is not None

    @property
    def sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Z [d_in, p], Y [d_out, p]), the running sums; reducible in place (e.g. all_reduce).

        Raises:
            RuntimeError: not armed.
        """
        if self._z is None:
            raise RuntimeError("RangeFinder.sums: not armed")
        return self._z, self._y

    def arm(self, p: int, generator: torch.Generator | None = None) -> None:
        """Start accumulating over the next backward passes; discards what was accumulated.

        Args:
            p: sketch width; `top_input_directions(r)` needs r <= p (a few extra columns of
                oversampling, p = r + 5 or more, make the estimate accurate).
            generator: torch.Generator for the Gaussian test matrices (on its own device; they
                move to the activations' device on the first backward pass).
        """
        if not isinstance(p, int) or isinstance(p, bool) or p <= 0:
            raise ValueError(f"arm_range_finder: p must be a positive int, got {p!r}")
        device = generator.device if generator is not None else torch.device("cpu")
        self._omega_in = torch.randn(self.d_in, p, generator=generator, device=device)
        self._omega_out = torch.randn(self.d_out, p, generator=generator, device=device)
        self._z = torch.zeros(self.d_in, p, device=device)
        self._y = torch.zeros(self.d_out, p, device=device)
        self.tokens = 0

    def disarm(self) -> None:
        """Stop and free the accumulators."""
        self._omega_in = self._omega_out = self._z = self._y = None
        self.tokens = 0

    def accumulate(self, x: torch.Tensor, dy: torch.Tensor) -> None:
        """Add one backward pass: Z += X^T (dY Omega_out), Y += dY^T (X Omega_in); O(N d p).

        Args:
            x: [..., d_in] layer input. dy: [..., d_out] gradient of the layer output.
        """
        if self._z.device != x.device:
            self._omega_in, self._omega_out, self._z, self._y = (
                t.to(x.device) for t in (self._omega_in, self._omega_out, self._z, self._y)
            )
        x2 = x.reshape(-1, self.d_in).float()  # [N, d_in]
        dy2 = dy.reshape(-1, self.d_out).float()  # [N, d_out]
        self._z.addmm_(x2.T, dy2 @ self._omega_out)
        self._y.addmm_(dy2.T, x2 @ self._omega_in)
        self.tokens += x2.shape[0]

    def top_input_directions(
        self, r: int, exclude: torch.Tensor | None = None, with_gradient: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Estimated top right singular vectors of G (or of G (I - P_exclude)).

        Q = orth(Z) spans the row space of G; G Q ~ Y (Q^T Omega_in)^+; the SVD of that, rotated
        back by Q, gives the directions. With `exclude`, G is first restricted to the orthogonal
        complement of the rows of `exclude` (the layer's existing A rows), so new directions are
        complementary.

        Args:
            r: number of directions, 0 <= r <= p.
            exclude: optional [m, d_in] rows whose span the directions must avoid.
            with_gradient: also return G V^T [d_out, r'], the gradient along the directions V.
        Returns:
            [r', d_in] float32 orthonormal rows V on the activations' device, strongest first;
            r' = r unless the complement of `exclude` inside span(Q) has fewer dimensions
            (r' = 0 when a backward pass since arming had non-finite gradients). With
            `with_gradient`, the pair (V, G V^T).
        """
        if self._z is None:
            raise RuntimeError(
                "top_input_directions: the range finder is not armed; call arm_range_finder(p) and "
                "run backward passes with capture on before a gradient-initialised grow"
            )
        p = self._z.shape[1]
        if not 0 <= r <= p:
            raise ValueError(f"top_input_directions: r={r} must lie in [0, p={p}]; arm with a larger p")
        if self.tokens == 0:
            raise RuntimeError(
                "top_input_directions: no backward pass reached this layer since arm_range_finder; "
                "the gradient is unknown"
            )
        if not (torch.isfinite(self._z).all() and torch.isfinite(self._y).all()):
            # An overflowing or NaN backward pass poisoned the estimate: no direction is known.
            none = torch.zeros(0, self.d_in, device=self._z.device)
            return (none, torch.zeros(self.d_out, 0, device=self._z.device)) if with_gradient else none
        z, y = self._z.double(), self._y.double()
        omega_in = self._omega_in.double()
        q, _ = torch.linalg.qr(z)  # [d_in, p]
        # G Q ~ Y (Q^T Omega_in)^+  (exact when span(Q) holds the row space of G).
        g_q = y @ torch.linalg.pinv(q.T @ omega_in)  # [d_out, p]
        basis = q
        if exclude is not None and exclude.shape[0] > 0:
            e = _orthonormal_rows(exclude.detach().to(device=q.device, dtype=torch.float64))  # [m', d_in]
            # G (I - P) ~ (G Q) ((I - P) Q)^T; write (I - P) Q = U_c S_c V_c^T and keep S_c > 0.
            u_c, s_c, vh_c = torch.linalg.svd(q - e.T @ (e @ q), full_matrices=False)
            keep = s_c > 1e-6
            basis = u_c[:, keep]  # [d_in, k], orthogonal to exclude
            g_q = g_q @ (vh_c[keep].T * s_c[keep])  # [d_out, k]
        _, _, vh = torch.linalg.svd(g_q, full_matrices=False)
        vh = vh[:r]
        vh = vh * positive_largest_entry(vh @ basis.T)[:, None]
        directions = vh @ basis.T  # [r', d_in]
        if with_gradient:
            # G V^T = (G basis) vh^T, with G basis ~ g_q.
            return directions.to(torch.float32), (g_q @ vh.T).to(torch.float32)
        return directions.to(torch.float32)


def positive_largest_entry(rows: torch.Tensor) -> torch.Tensor:
    """[k] signs (+-1, rows' dtype) that make each row's largest-magnitude entry positive.

    Singular vectors are defined up to sign and LAPACK builds return different ones (a 16-core
    machine's torch flipped a grown direction that this project's machines did not); fixing the
    sign makes resizes, and so whole runs, reproduce across machines.
    """
    if rows.shape[0] == 0:
        return rows.new_ones(0)
    pick = rows.gather(1, rows.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    return torch.where(pick < 0, -1.0, 1.0).to(rows.dtype)


def _orthonormal_rows(m: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis [k, d] of the row space of m [n, d] (rank-revealing, via SVD)."""
    _, s, vh = torch.linalg.svd(m, full_matrices=False)
    return vh[s > s.max() * max(m.shape) * torch.finfo(m.dtype).eps]
