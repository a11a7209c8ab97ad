"""The Kronecker block (`KroneckerBlock`): Ginger's damped, EMA-updated
eigendecomposition on each Kronecker factor of a matrix-shaped variable
(`keras_ginger.kronecker` holds the math)."""

from keras import ops

from keras_ginger import kronecker
from keras_ginger.blocks.base import ALL
from keras_ginger.blocks.base import CurvatureBlock
from keras_ginger.blocks.base import _theta


def _rows_layout(layout, rows):
    """``layout`` (rows sharded over one mesh axis, the vector block's basis
    layout) for an (rows, k) basis, or None (replicated) where that axis's
    size does not divide ``rows`` (L's m is not the flattened variable's
    length the layout was chosen for)."""
    axes = getattr(layout, "axes", None)
    if not axes or axes[0] is None:
        return None
    mesh = layout.device_mesh
    size = mesh.shape[list(mesh.axis_names).index(axes[0])]
    return layout if rows % size == 0 else None


class KroneckerBlock(CurvatureBlock):
    """Kronecker factors of a matrix-shaped variable (`keras_ginger.kronecker`).

    The variable is read as a matrix (m, n) (`kronecker.as_matrix_shape`).
    Each side s (m for L, n for R) is *full* (U (s, s): the exact factor,
    eigh of s×s) when s ≤ `kronecker_full_size`, else low-rank with k =
    min(`kronecker_rank`, s) columns and a tail level ρ. State per side:
    U, σ, and ρ for a low-rank side; with `kronecker_interval` > 1 a full
    side also keeps its factor F (s, s), which takes d at every refresh
    while (U, σ), its eigendecomposition, is recomputed every
    `kronecker_interval` refreshes. The side's new columns Y are D itself
    (exact) when the other side is at most `sketch_size` long,
    else D's projection on the other side's basis (a sketch; the energy it
    misses goes to the tail level).

    The direction is L̃^{-p} M̂ R̃^{-p} (p = `kronecker_exponent`), in the
    optimizer's metric (with ``metric="adam"``: of D^{-1/2}d and
    D^{-1/2}m̂, multiplied by D^{-1/2}), scaled by the optimizer's graft
    (its norm is that of Adam's step, both in the metric) or by η_t.
    """

    kind = "kronecker"
    # How the tail level is kept (`kronecker.lowrank_finish`), and the
    # longest other side whose D is taken whole (else sketched): measured
    # in benchmarks/kronecker_tracking.py.
    tail = "accumulate"
    sketch_size = 1024

    def __init__(self, optimizer, variable):
        super().__init__(optimizer, variable)
        self.shape = kronecker.as_matrix_shape(variable.shape)
        self.full = tuple(s <= optimizer.kronecker_full_size
                          for s in self.shape)
        self.ranks = tuple(s if full else min(optimizer.kronecker_rank, s)
                           for s, full in zip(self.shape, self.full))
        # Full sides keep F only where it outlives a refresh.
        self.keeps_factor = optimizer.kronecker_interval > 1

    def build(self, prefix, basis_layout=None):
        opt = self.optimizer
        slots = []
        for side, (s, k, full) in enumerate(zip(self.shape, self.ranks,
                                                self.full)):
            label = ("left", "right")[side]
            slots.append(opt.add_variable(
                (s, k), initializer="identity", dtype="float32",
                name=f"{prefix}_kronecker_{label}_basis",
                layout=_rows_layout(basis_layout, s) if side == 0 else None))
            slots.append(opt.add_variable(
                (k,), dtype="float32",
                name=f"{prefix}_kronecker_{label}_eigenvalues"))
            if not full:
                slots.append(opt.add_variable(
                    (), dtype="float32",
                    name=f"{prefix}_kronecker_{label}_tail"))
            elif self.keeps_factor:
                slots.append(opt.add_variable(
                    (s, s), dtype="float32",
                    name=f"{prefix}_kronecker_{label}_factor"))
        self.slots = tuple(slots)

    def sides(self, state):
        """[(U, σ, ρ or None, full)] for the left and the right side."""
        return [side[:4] for side in self._sides(state)]

    def _sides(self, state):
        """[(U, σ, ρ or None, full, F or None)]: `sides` and the kept
        factor of a full side (`kronecker_interval` > 1)."""
        out, i = [], 0
        for full in self.full:
            if full and self.keeps_factor:
                out.append((state[i], state[i + 1], None, True, state[i + 2]))
                i += 3
            elif full:
                out.append((state[i], state[i + 1], None, True, None))
                i += 2
            else:
                out.append((state[i], state[i + 1], state[i + 2], False,
                            None))
                i += 3
        return out

    def factors(self):
        return [(label, U, sigma) for label, (U, sigma, _, _)
                in zip(("left", "right"), self.sides(self.state()))]

    def _matrix(self, x):
        return ops.reshape(x, self.shape)

    def _columns(self, D, sides):
        """Y for each side: D (left) and Dᵀ (right), or their sketches on
        the other side's basis, with the energy a sketch misses (or None)."""
        out = []
        for side, (Dm, other) in enumerate(((D, sides[1]),
                                            (ops.transpose(D), sides[0]))):
            width = self.shape[1 - side]
            if width <= self.sketch_size:
                out.append((Dm, None))
                continue
            Y = ops.matmul(Dm, other[0])
            out.append((Y, ops.sum(Dm * Dm) - ops.sum(Y * Y)))
        return out

    def begin_refresh(self, e, state, decompose=True):
        opt = self.optimizer
        scale = opt._metric_scale(e)
        d = e.d if scale is None else e.d * scale
        D = self._matrix(ops.where(e.d_ok, d, 0.0))
        sides = self._sides(state)
        columns = self._columns(D, sides)
        tagged, context = [], []
        for (U, sigma, _, full, F), (Y, _) in zip(sides, columns):
            if full:
                F = kronecker.full_factor(U, sigma, Y, opt.beta_2, F)
                if decompose:
                    tagged.append((ALL, F))
                context.append(F)
            else:
                Q, C = kronecker.lowrank_small(U, sigma, Y, opt.beta_2)
                tagged.append((ALL, C))
                context.append(Q)
        return tagged, (context, [u for _, u in columns], decompose)

    def end_refresh(self, e, state, context, eigs):
        opt = self.optimizer
        qs, unsketched, decompose = context
        eigs = iter(eigs)
        new = []
        for (U, sigma, rho, full, F), Q, u, k in zip(
                self._sides(state), qs, unsketched, self.ranks):
            if full:
                # Q is the new factor F' here.
                side = (next(eigs) if decompose else (sigma, U))[::-1]
                old = (U, sigma)
                if F is not None:
                    side, old = side + (Q,), old + (F,)
            else:
                lam, V = next(eigs)
                side = kronecker.lowrank_finish(
                    Q, lam, V, rho, k, opt.beta_2, self.tail, u)
                old = (U, sigma, rho)
            # A non-finite d leaves the factor as it was.
            new.extend(ops.where(e.d_ok, a, b) for a, b in zip(side, old))
        new = tuple(new)
        return new, self._step(e, new)

    def reuse(self, e, state):
        return self._step(e, state)

    def _step(self, e, state):
        opt = self.optimizer
        scale = opt._metric_scale(e)
        m = e.m if scale is None else e.m * scale
        left, right = self.sides(state)
        direction = ops.reshape(kronecker.kronecker_direction(
            self._matrix(m), left, right, opt.kronecker_damping,
            opt.kronecker_exponent), (-1,))
        if opt.graft is None:
            eta = e.eta
        else:
            eta = opt._graft_rate(e, ops.sqrt(ops.sum(direction * direction)))
        step = direction if scale is None else scale * direction
        return _theta(e.var) - eta * step
