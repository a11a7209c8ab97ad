"""Curvature blocks: one structure of curvature per variable, one interface.

As kfac-jax lays out its curvature blocks, every trainable variable gets one
block that owns its curvature state, refreshes it from the Fisher gradient
d, and turns the momentum into the variable's new value:

* `IdentityBlock`: no curvature (Adam's step in its metric, or the paper's
  m̂/γ): variables excluded from curvature;
* `VectorBlock`: the paper's block (`keras_ginger.curvature`): a rank-τ
  eigendecomposition of the curvature of the flattened variable, Woodbury
  step;
* `KroneckerBlock` (`keras_ginger.kronecker`): rank-k eigendecompositions
  of the two Kronecker factors of a matrix-shaped variable, step
  L̃^{-p} M̂ R̃^{-p}.

The interface (`CurvatureBlock`): ``build`` creates the state variables;
``state()`` reads them; a refresh runs in two halves around the
eigensolves of all blocks of an update (`eigh_each`), ``begin_refresh`` (the small
symmetric matrices to decompose, each tagged with how) and
``end_refresh`` (the new state and θ'); ``reuse`` steps with the state as
it is (`curvature_interval`). The state is returned, never assigned here,
so that the optimizer can choose between the two paths with one `cond`.

The Keras optimizer (`keras_ginger.optimizer.Ginger`) owns the momentum,
Adam's second moment, the scale rules (grafting) and the hand-over of d;
a block reads them from the `_Entry` the optimizer prepares.
"""

import math

import keras
from keras import ops

from keras_ginger import _keras_compat
from keras_ginger import curvature
from keras_ginger import kronecker

# Rows of U per block when the update walks U in place (see
# `VectorBlock.block_rows`); block sizes from 4096 to 262144 measured alike.
BLOCK_ROWS = 16384
# ... and the smallest basis (bytes of U) walked that way. JAX/CPU, τ = 8,
# ns/param: n = 5e5 (15 MiB) whole arrays 8.7, blocks 13.6; n = 1e6
# (31 MiB) whole arrays 10 or 20 from one process to the next, blocks 13-14;
# n = 2e6: whole arrays 22, blocks 14.
BLOCK_MIN_BYTES = 24 * 2**20

# How a small matrix of `begin_refresh` is decomposed: "top" with
# `curvature.top_eigh` (the vector block's k+1 → k), "all" with
# `kronecker.eigh_desc`.
TOP, ALL = "top", "all"


def _cond(pred, true_fn, false_fn):
    """`ops.cond`, or a Python branch where ``pred`` is a concrete value on
    JAX (eager JAX would trace and compile both branches at every call)."""
    if (keras.backend.backend() == "jax"
            and not _keras_compat.is_in_jax_tracing_scope(pred)):
        return true_fn() if bool(pred) else false_fn()
    return ops.cond(pred, true_fn, false_fn)


def _theta(var):
    """The variable's value, flat and in float32 (the state's dtype)."""
    return ops.reshape(ops.cast(ops.convert_to_tensor(var), "float32"), (-1,))


def eigh_each(tagged):
    """[(tag, C)] → [(λ, V)] descending, one eigensolve per matrix.

    The matrices are not stacked into batched eigensolves: jaxlib's batched
    CPU eigh (0.10) splits its batch over XLA's intra-op thread pool and
    blocks a pool thread until the pieces finish, so two batched eigh
    calls that XLA runs at once (two sizes, next to the backward pass of a
    `with_fisher` step) can take every thread of a small pool and wait for
    each other for ever (measured: char_lm's first JAX `fit()` step never
    returned on a 2-core machine). One unbatched call per matrix runs where
    it is scheduled, returns the same LAPACK result and compiled faster.
    """
    out = []
    for tag, C in tagged:
        if tag == TOP:
            out.append(curvature.top_eigh(C, C.shape[-1] - 1))
        else:
            out.append(kronecker.eigh_desc(C))
    return out


class CurvatureBlock:
    """One variable's curvature: state, refresh from d, step (module doc).

    ``optimizer`` is the `Ginger` that owns the block (its hyperparameters
    and scale rules); ``variable`` the model variable.
    """

    kind = None

    def __init__(self, optimizer, variable):
        self.optimizer = optimizer
        self.variable = variable
        self.slots = ()

    def build(self, prefix, basis_layout=None):
        """Create the state variables (``self.slots``)."""

    def state(self):
        return tuple(ops.convert_to_tensor(s) for s in self.slots)

    def begin_refresh(self, e, state):
        """([(tag, C)], context): the small matrices to decompose."""
        raise NotImplementedError

    def end_refresh(self, e, state, context, eigs):
        """(new state, θ') from the eigenpairs of `begin_refresh`'s
        matrices, in order."""
        raise NotImplementedError

    def reuse(self, e, state):
        """θ' with the state as it is."""
        raise NotImplementedError

    def factors(self):
        """[(label, U, σ)]: the eigendecompositions this block keeps."""
        return []


class IdentityBlock(CurvatureBlock):
    """No curvature: Adam's step lr·m̂/(√v̂+ε) where Adam's v is kept
    (`graft="adam"` or `metric="adam"`), else the paper's η_t·m/γ. The
    optimizer subtracts `delta` from the variable (as Adam does)."""

    kind = "identity"

    def delta(self, e):
        opt = self.optimizer
        if e.adam is not None:
            return ops.where(e.g_ok, e.lr, 0.0) * e.adam.step
        return (e.eta / opt.damping) * e.m


class VectorBlock(CurvatureBlock):
    """The paper's block: U (n, k), σ (k,) of the flattened variable,
    k = min(τ, n); one rank-one eigen-update per refresh and the Woodbury
    step (`keras_ginger.curvature`), with the optimizer's damping rule
    (γ or γ·σ₁), metric and grafting."""

    kind = "vector"

    def build(self, prefix, basis_layout=None):
        opt = self.optimizer
        n = math.prod(self.variable.shape)
        k = min(opt.tau, n)
        self.slots = (
            opt.add_variable((n, k), initializer="identity", dtype="float32",
                             name=f"{prefix}_curvature_basis",
                             layout=basis_layout),
            opt.add_variable((k,), dtype="float32",
                             name=f"{prefix}_curvature_eigenvalues"),
        )

    def factors(self):
        U, sigma = self.state()
        return [("", U, sigma)]

    @staticmethod
    def block_rows(U):
        """Block size for an in-place walk over U, or None for whole arrays.

        On JAX/CPU a large temporary costs more than the arithmetic (writing
        a fresh 4e6 x 8 float32 buffer: 9-15 ns per row of U, against 1.5
        for a 1e6 x 8 one, whose pages get reused): there, for a U of at
        least `BLOCK_MIN_BYTES`, the update walks U in blocks and XLA writes
        U' over the donated U. TensorFlow, torch and GPU runtimes cache
        their buffers, and whole-array products are faster there; so are
        sharded arrays (a `keras.distribution` is set), which a blocked walk
        would gather, and eager JAX, which would compile the loop anew at
        every call.
        """
        if (keras.backend.backend() != "jax"
                or 4 * math.prod(U.shape) < BLOCK_MIN_BYTES
                or keras.distribution.distribution() is not None
                or not _keras_compat.is_in_jax_tracing_scope(U)):
            return None
        devices = keras.distribution.list_devices()
        if devices and not str(devices[0]).lower().startswith("cpu"):
            return None
        return BLOCK_ROWS

    def damping_for(self, sigma):
        """The damping rule: γ, or with `relative_damping` γ·σ₁ (σ₁ the
        variable's largest curvature eigenvalue; γ itself while σ₁ = 0,
        when the direction is m̂ whatever the damping)."""
        opt = self.optimizer
        if not opt.relative_damping:
            return opt.damping
        top = sigma[0]
        return opt.damping * ops.where(top > 0.0, top, 1.0)

    def ungrafted_rate(self, e, damping):
        """η_t = lr/(1-β₁ᵗ) (paper), η_t·γₜ in Adam's metric (so that with
        M̃ = 0 the step is Adam's)."""
        return e.eta if self.optimizer.metric is None else e.eta * damping

    def rate(self, e, w, sigma, damping, complete):
        """The scale rule: the η that multiplies the Woodbury direction of
        the raw momentum m (in the metric: D^{-1/2}(γₜI + M̃)⁻¹D^{-1/2}m).

        Paper: η_t = lr/(1-β₁ᵗ); in Adam's metric without grafting η_t·γₜ,
        so that with M̃ = 0 the step is Adam's. Grafting: the step gets the
        norm of Adam's step for this variable, measured in the metric,
        lr·‖Adam's step‖/‖direction‖, with ‖direction‖ from
        `curvature.step_norm` (small space: in Adam's metric D^{1/2}·
        direction = (γₜI + M̃)⁻¹D^{-1/2}m, whose norm that gives too)."""
        opt = self.optimizer
        if opt.graft is None:
            return self.ungrafted_rate(e, damping)
        return opt._graft_rate(e, curvature.step_norm(
            e.adam.m_sq, w, sigma, damping, complete))

    def begin_refresh(self, e, state):
        U, sigma = state
        complete = U.shape[0] == U.shape[1]
        block_rows = self.block_rows(U)
        proj = curvature.project(U, e.d, e.m, complete=complete,
                                 block_rows=block_rows, valid=e.d_ok,
                                 scale=self.optimizer._metric_scale(e))
        # A non-finite d leaves M unchanged: α = 1 and d = 0.
        beta_2 = ops.where(e.d_ok, self.optimizer.beta_2, 1.0)
        C, scale = curvature.small_matrix(sigma, proj, beta_2)
        return [(TOP, C)], (proj, scale, complete, block_rows)

    def end_refresh(self, e, state, context, eigs):
        U, _ = state
        proj, scale, complete, block_rows = context
        (lam, V), = eigs
        sigma = lam * scale
        damping = self.damping_for(sigma)
        A, b, w, a1 = curvature.rotation(proj, sigma, V, damping, complete)
        U_new, theta = self._rotate_and_step(
            e, (U, proj.p, A, b, e.m, w, a1, damping, complete, block_rows),
            w, sigma, damping, complete)
        return (U_new, sigma), theta

    def _rotate_and_step(self, e, args, w, sigma, damping, complete):
        """(U', θ') from the pass over U (`curvature.rotate`, args as it
        takes them), θ' written in that pass at the rate known in small
        space. Where grafting's small-space norm is not accurate
        (`curvature.step_norm_is_accurate`), θ' is then corrected to the
        rate from the exact norm of the step, formed again from U' (a rare
        branch: it only reads U', so U' is still written in place)."""
        opt = self.optimizer
        theta, scale = _theta(e.var), opt._metric_scale(e)
        if opt.graft is None or complete:
            return curvature.rotate(
                *args, theta=theta, scale=scale,
                eta=self.rate(e, w, sigma, damping, complete))
        norm = curvature.step_norm(e.adam.m_sq, w, sigma, damping)
        rate = opt._graft_rate(e, norm)
        U_new, theta = curvature.rotate(*args, theta=theta, scale=scale,
                                        eta=rate)
        m = e.m if scale is None else e.m * scale

        def exact():
            step = curvature.woodbury_step(U_new, sigma, m, damping, w=w)
            fix = opt._graft_rate(e, ops.sqrt(ops.sum(step * step))) - rate
            return theta - fix * (step if scale is None else scale * step)

        return U_new, _cond(
            curvature.step_norm_is_accurate(e.adam.m_sq, norm, damping),
            lambda: theta, exact)

    def reuse(self, e, state):
        """The step with the curvature as it is (the step is formed, so
        grafting takes its exact norm)."""
        opt = self.optimizer
        U, sigma = state
        complete = U.shape[0] == U.shape[1]
        damping = self.damping_for(sigma)
        scale = opt._metric_scale(e)
        m = e.m if scale is None else e.m * scale
        step = curvature.woodbury_step(U, sigma, m, damping, complete)
        if opt.graft is None:
            eta = self.ungrafted_rate(e, damping)
        else:
            eta = opt._graft_rate(e, ops.sqrt(ops.sum(step * step)))
        return _theta(e.var) - eta * (step if scale is None else scale * step)


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

    The variable is read as a matrix (m, n) (`kronecker.as_matrix_shape`). Each side s
    (m for L, n for R) is *full* (U (s, s): the exact factor, eigh of s×s)
    when s ≤ `kronecker_full_size`, else low-rank with k =
    min(`kronecker_rank`, s) columns and a tail level ρ. State per side:
    U, σ, and ρ for a low-rank side. The side's new columns Y are D itself
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
        self.slots = tuple(slots)

    def sides(self, state):
        """[(U, σ, ρ or None, full)] for the left and the right side."""
        out, i = [], 0
        for full in self.full:
            if full:
                out.append((state[i], state[i + 1], None, True))
                i += 2
            else:
                out.append((state[i], state[i + 1], state[i + 2], False))
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

    def begin_refresh(self, e, state):
        opt = self.optimizer
        scale = opt._metric_scale(e)
        d = e.d if scale is None else e.d * scale
        D = self._matrix(ops.where(e.d_ok, d, 0.0))
        sides = self.sides(state)
        columns = self._columns(D, sides)
        tagged, context = [], []
        for (U, sigma, _, full), (Y, _) in zip(sides, columns):
            if full:
                tagged.append((ALL, kronecker.full_factor(
                    U, sigma, Y, opt.beta_2)))
                context.append(None)
            else:
                Q, C = kronecker.lowrank_small(U, sigma, Y, opt.beta_2)
                tagged.append((ALL, C))
                context.append(Q)
        return tagged, (context, [u for _, u in columns])

    def end_refresh(self, e, state, context, eigs):
        opt = self.optimizer
        qs, unsketched = context
        sides = self.sides(state)
        new = []
        for (U, sigma, rho, full), Q, u, (lam, V), k in zip(
                sides, qs, unsketched, eigs, self.ranks):
            if full:
                U_new, sigma_new = V, lam
                side = (U_new, sigma_new)
            else:
                U_new, sigma_new, rho_new = kronecker.lowrank_finish(
                    Q, lam, V, rho, k, opt.beta_2, self.tail, u)
                side = (U_new, sigma_new, rho_new)
            # A non-finite d leaves the factor as it was.
            old = (U, sigma) if full else (U, sigma, rho)
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
