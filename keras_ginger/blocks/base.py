"""The curvature-block interface (`CurvatureBlock`), the identity block and
the eigensolve that every refresh of an update shares (`eigh_each`); see
`keras_ginger.blocks`."""

import keras
from keras import ops

from keras_ginger import _keras_compat
from keras_ginger import curvature
from keras_ginger import kronecker

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

    def begin_refresh(self, e, state, decompose=True):
        """([(tag, C)], context): the small matrices to decompose.
        ``decompose=False`` (`kronecker_interval`): a block may take d
        without an eigensolve; the vector block ignores it."""
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
