"""The paper's block (`VectorBlock`): a rank-τ eigendecomposition of the
curvature of the flattened variable, Woodbury step (`keras_ginger.curvature`)."""

import math

import keras
from keras import ops

from keras_ginger import _keras_compat
from keras_ginger import curvature
from keras_ginger.blocks.base import TOP
from keras_ginger.blocks.base import CurvatureBlock
from keras_ginger.blocks.base import _cond
from keras_ginger.blocks.base import _theta

# Rows of U per block when the update walks U in place (see
# `VectorBlock.block_rows`); block sizes from 4096 to 262144 measured alike.
BLOCK_ROWS = 16384
# ... and the smallest basis (bytes of U) walked that way. JAX/CPU, τ = 8,
# ns/param: n = 5e5 (15 MiB) whole arrays 8.7, blocks 13.6; n = 1e6
# (31 MiB) whole arrays 10 or 20 from one process to the next, blocks 13-14;
# n = 2e6: whole arrays 22, blocks 14.
BLOCK_MIN_BYTES = 24 * 2**20


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

    def begin_refresh(self, e, state, decompose=True):
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
