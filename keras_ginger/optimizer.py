"""The Ginger optimizer: Keras glue around `keras_ginger.curvature`."""

import collections
import contextlib
import math
import numbers
import os
import re
import sys
import threading
import warnings

import keras
import numpy as np
from keras import ops

from keras_ginger import _keras_compat
from keras_ginger import blocks


def _check_positive_float(name, value):
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or value <= 0):
        raise ValueError(
            f"Argument `{name}` must be a finite float > 0. "
            f"Received: {name}={value!r}")


def _check_hyperparameters(tau, beta_1, beta_2, damping):
    if isinstance(tau, bool) or not isinstance(tau, numbers.Integral) or tau < 1:
        raise ValueError(
            f"Argument `tau` must be a positive integer. Received: tau={tau!r}"
        )
    for name, value in (("beta_1", beta_1), ("beta_2", beta_2)):
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not 0.0 <= value < 1.0
        ):
            raise ValueError(
                f"Argument `{name}` must be a float in [0, 1). "
                f"Received: {name}={value!r}"
            )
    _check_positive_float("damping", damping)


CURVATURES = ("auto", "vector")


def _check_kronecker_arguments(curvature, rank, full_size, exponent,
                               damping, interval):
    if curvature not in CURVATURES:
        raise ValueError(
            f"Argument `curvature` must be one of {CURVATURES}. Received: "
            f"curvature={curvature!r}")
    _check_positive_int("kronecker_rank", rank)
    _check_positive_int("kronecker_full_size", full_size)
    if (isinstance(exponent, bool) or not isinstance(exponent, numbers.Real)
            or not 0.0 < exponent <= 1.0):
        raise ValueError(
            "Argument `kronecker_exponent` must be a float in (0, 1]. "
            f"Received: kronecker_exponent={exponent!r}")
    _check_positive_float("kronecker_damping", damping)
    _check_positive_int("kronecker_interval", interval)


_BLOCKS = {"identity": blocks.IdentityBlock, "vector": blocks.VectorBlock,
           "kronecker": blocks.KroneckerBlock}

GRAFTS = (None, "adam")
METRICS = (None, "adam")


def _check_scale_arguments(graft, relative_damping, graft_beta_2,
                           graft_epsilon, metric=None):
    if graft not in GRAFTS:
        raise ValueError(
            f"Argument `graft` must be one of {GRAFTS}. Received: "
            f"graft={graft!r}")
    if metric not in METRICS:
        raise ValueError(
            f"Argument `metric` must be one of {METRICS}. Received: "
            f"metric={metric!r}")
    if not isinstance(relative_damping, bool):
        raise ValueError(
            "Argument `relative_damping` must be a bool. Received: "
            f"relative_damping={relative_damping!r}")
    if (isinstance(graft_beta_2, bool)
            or not isinstance(graft_beta_2, numbers.Real)
            or not 0.0 <= graft_beta_2 < 1.0):
        raise ValueError(
            "Argument `graft_beta_2` must be a float in [0, 1). "
            f"Received: graft_beta_2={graft_beta_2!r}")
    _check_positive_float("graft_epsilon", graft_epsilon)


# Packages whose frames sit between the user's call and Ginger.apply (fit's
# train function, the backends' tracing machinery).
_LIBRARY_ROOTS = tuple(
    os.path.dirname(os.path.abspath(m.__file__)) + os.sep
    for m in (keras, np) if getattr(m, "__file__", None)
) + (os.path.dirname(os.path.abspath(__file__)) + os.sep,)
_LIBRARY_NAMES = ("tensorflow", "jax", "jaxlib", "torch", "contextlib",
                  "threading")


def _user_stacklevel():
    """`warnings.warn` stacklevel of the innermost frame outside Keras,
    keras-ginger, NumPy and the backends: the user's `fit()` or `apply()`
    line, so that a warning points there."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        parts = path.split(os.sep)
        inside = (path.startswith(_LIBRARY_ROOTS)
                  or any(p in _LIBRARY_NAMES for p in parts)
                  or path.endswith(("contextlib.py", "threading.py"))
                  or frame.f_code.co_filename.startswith("<"))
        if not inside:
            return level
        frame = frame.f_back
        level += 1
    return 2


def _check_positive_int(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or value < 1):
        raise ValueError(
            f"Argument `{name}` must be a positive integer"
            f"{' or None' if allow_none else ''}. Received: {name}={value!r}"
        )


def _check_patterns(patterns):
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    for p in patterns:
        if not isinstance(p, str):
            raise ValueError(
                "Argument `exclude_from_curvature` must be a list of strings "
                f"(regular expressions). Received: {patterns!r}"
            )
        re.compile(p)
    return patterns


def _shape_compatible(shape, expected):
    """Equal shapes, where an unknown (None) dimension matches any size.

    (TF's gradient of an embedding lookup is an IndexedSlices whose static
    shape can have an unknown first dimension while the graph is traced.)
    """
    shape, expected = tuple(shape), tuple(expected)
    return len(shape) == len(expected) and all(
        a is None or a == b for a, b in zip(shape, expected))


def _basis_layout(layout):
    """U (n, k) is sharded along n by the variable's first sharded mesh axis.

    (For a variable sharded on its first axis this is exactly the flattened
    variable's own sharding.) None where the variable is not sharded.
    """
    axes = getattr(layout, "axes", None)
    first = next((a for a in axes or () if a is not None), None)
    if first is None:
        return None
    return keras.distribution.TensorLayout((first, None), layout.device_mesh)


def _sharded_state_layouts(shape, layout):
    """(state layout, basis layout) for `shard_state=True` and a variable
    that is not sharded itself: m and v sharded along their first axis, U
    (n, k) along n, over the distribution's data-parallel (batch) mesh axis,
    each where that axis's size divides the dimension (else replicated:
    `layout` and None). No distribution: (layout, None)."""
    dist = keras.distribution.distribution()
    axis = getattr(dist, "batch_dim_name", None)
    mesh = getattr(dist, "device_mesh", None)
    if axis is None or mesh is None or axis not in mesh.axis_names:
        return layout, None
    size = mesh.shape[list(mesh.axis_names).index(axis)]
    n = int(np.prod(shape))
    state = layout
    if shape and shape[0] % size == 0:
        state = keras.distribution.TensorLayout(
            (axis,) + (None,) * (len(shape) - 1), mesh)
    basis = (keras.distribution.TensorLayout((axis, None), mesh)
             if n % size == 0 else None)
    return state, basis


_Entry = collections.namedtuple(
    "_Entry", "var idx d_ok d m eta g_ok lr adam")
_Entry.__doc__ = "One variable's inputs to the update (flat float32)."
_Adam = collections.namedtuple("_Adam", "v step norm inv_sqrt_d m_sq")
_Adam.__doc__ = (
    "Adam's second moment v, its step m̂/D, that step's norm in the metric "
    "(‖m̂/D‖, or ‖D^{-1/2}m̂‖ = ‖D^{1/2}·m̂/D‖ with `metric='adam'`), "
    "D^{-1/2}, and ‖m‖² in the metric (‖m‖² or ‖D^{-1/2}m‖²).")


class _PerReplica:
    """A value per thread, and under tf.distribute per replica: Keras's
    LossScaleOptimizer applies each replica's update in a thread of its own
    (`call_for_each_replica` inside a merge call), not in the thread that
    ran the replica's train step, so the replica id is the key there."""

    def __init__(self, optimizer):
        self._optimizer = optimizer
        self._values = {}

    def _key(self):
        if self._optimizer._replicas() > 1:
            from keras_ginger import tf_distribute  # imports TensorFlow

            replica = tf_distribute.replica_id()
            if replica is not None:
                return ("replica", replica)
        return ("thread", threading.get_ident())

    def get(self):
        return self._values.get(self._key())

    @contextlib.contextmanager
    def holding(self, value):
        key = self._key()
        previous = self._values.get(key)
        self._values[key] = value
        try:
            yield
        finally:
            if previous is None:
                self._values.pop(key, None)
            else:
                self._values[key] = previous


@keras.saving.register_keras_serializable(package="keras_ginger")
class Ginger(keras.optimizers.Optimizer):
    """Ginger: rank-τ Fisher curvature with a Woodbury step.

    Ginger (Hao, Cao, Mou, arXiv 2402.03295) keeps for every trainable
    variable (flattened to n entries) an exponential moving average of the
    Fisher / generalized Gauss–Newton matrix, as its best rank-k
    eigendecomposition U diag(σ) Uᵀ with k = min(τ, n), and steps with the
    damped inverse through the Woodbury identity (Algorithm 1):

        m_t = β₁ m_{t-1} + (1 - β₁) g_t,        m̂_t = m_t / (1 - β₁ᵗ)
        M_t = α M_{t-1} + (1 - α) d_t d_tᵀ      (kept at rank k)
        θ_t = θ_{t-1} - η_t s_t (γ_t I + M_t)⁻¹ m̂_t

    The paper's step (``graft=None, relative_damping=False, metric=None``)
    has s_t = 1 and γ_t = γ: outside span(U) it is m̂/γ, SGD at rate η/γ,
    so its outcome depends on the scale of the loss. By default the
    curvature is taken in Adam's diagonal metric and the step's scale made
    independent of the loss scale:

    * ``metric="adam"``: M_t is the curvature of D^{-1/2}d_t, D Adam's
      denominator (√v_t + ε)/√(1-β₂'ᵗ), and the direction is
      D^{-1/2}(γ_t I + M_t)⁻¹D^{-1/2}m̂_t: Adam's m̂/D where M_t = 0, bent
      away from the directions of large curvature;
    * ``relative_damping=True``: γ_t = γ·σ₁, σ₁ the variable's largest
      curvature eigenvalue (γ while M = 0), so (γ_t I + M_t)⁻¹ only sees the
      shape of the spectrum;
    * ``graft="adam"`` (distributed Shampoo's grafting, per variable): s_t
      gives the step the norm of Keras Adam's step m̂_t/D for that variable,
      D = (√v_t + ε)/√(1-β₂'ᵗ) with v_t = β₂' v_{t-1} + (1-β₂') g_t²
      (β₂' = ``graft_beta_2``, ε = ``graft_epsilon``), both norms measured
      in the metric: ‖D^{1/2}x‖ in Adam's (where the step is
      D^{-1/2}(γ_t I + M_t)⁻¹D^{-1/2}m̂ and Adam's D^{-1/2}·D^{-1/2}m̂: the
      Euclidean grafting of Ginger and Adam in the whitened coordinates
      D^{1/2}θ), ‖x‖ in the Euclidean one. Either norm of the Woodbury step
      is known in small space (`curvature.step_norm`), so the pass that
      writes U' writes θ' too; where that norm would lose float32 accuracy
      (m̂ mostly in span(U) with σ ≫ γ, `curvature.step_norm_is_accurate`)
      the step is formed again from U' and its exact norm taken.

    Together, a loss multiplied by c gives the same updates (only Adam's ε
    breaks this), the learning rate means what it means for Adam, and a
    variable without curvature (`exclude_from_curvature`,
    `max_curvature_size`) takes exactly Adam's step; with the curvature
    switched off for every variable Ginger *is* `keras.optimizers.Adam`.

    g_t is the loss gradient; d_t the Fisher gradient, computed from labels
    sampled from the model's own predictions (see `keras_ginger.with_fisher`)
    and passed as ``fisher_grads``. Without it, d_t = g_t (the empirical
    Fisher) and a one-time warning says how to get the sampled Fisher.
    Curvature is block-diagonal across variables. Memory: (τ+1)·n floats per
    preconditioned variable (U and the momentum) plus k for σ; n for one with
    the identity preconditioner; n more for Adam's v (`graft="adam"` or
    `metric="adam"`, the defaults). Time is linear in n. The state is
    float32 whatever the variable dtype.

    Non-finite values never enter the state: a variable whose g_t has a
    non-finite entry keeps its momentum and its value for that step; a
    non-finite d_t leaves (U, σ) unchanged for that step. The last such
    event is recorded (`nonfinite_report()` says which variable and step).

    Args:
        learning_rate: η. A float, a `keras.optimizers.schedules` schedule,
            or a callable. Defaults to `1e-3` (Adam's: with grafting the
            step has Adam's norm; chosen with benchmarks/convergence.py, see
            benchmarks/README.md).
        tau: τ, the rank of the curvature approximation (a positive int).
            Defaults to `8`.
        beta_1: β₁, the momentum decay rate in [0, 1); 0 disables momentum.
            Defaults to `0.9`.
        beta_2: α in the paper, the decay rate of the curvature EMA, in
            [0, 1). Defaults to `0.99`.
        damping: γ > 0, added to every eigenvalue of the curvature: relative
            to the largest eigenvalue σ₁ with `relative_damping` (the
            default), absolute otherwise (then the step outside the rank-k
            subspace is m̂/γ, and learning_rate/damping acts as an SGD
            learning rate there unless grafted). Defaults to `0.3`.
        exclude_from_curvature: list of regular expressions; a variable
            whose path matches one (`re.search`) gets the identity
            preconditioner (Adam's step when Adam's v is kept, else m̂/γ)
            and no curvature state. Like
            `exclude_from_weight_decay`, e.g. `["embeddings", "bias"]`.
        max_curvature_size: int or None. Variables with more entries get the
            identity preconditioner, so that e.g. a 32k-token embedding need
            not carry τ copies of itself. Defaults to None (no limit).
        curvature_interval: int ≥ 1. The curvature takes d_t every this many
            updates; on the other updates the step reuses (U, σ) and the
            Fisher pass can be skipped (see `fisher_due()`). Defaults to 1.
        graft: how the preconditioned direction is scaled: `"adam"` (the
            default) gives each variable's step the norm of Adam's step and
            keeps Adam's second moment v (one more float per parameter);
            None does not rescale (with ``metric=None``, the paper's η times
            the Woodbury step; with ``metric="adam"``, the metric's own
            scale, see ``metric``).
        relative_damping: bool; True (the default) uses γ·σ₁ as the damping
            of each variable, False the paper's absolute γ. The paper's
            algorithm, bit for bit: ``graft=None, relative_damping=False,
            metric=None``.
        graft_beta_2: β₂' of Adam's second moment for grafting, in [0, 1).
            Defaults to `0.999` (Adam's).
        graft_epsilon: ε of Adam's step for grafting, > 0. Defaults to
            `1e-7` (Keras Adam's).
        metric: `"adam"` (the default): Ginger in Adam's diagonal metric.
            The curvature is kept for d̃ = D^{-1/2}d, D = (√v + ε)/√(1-β₂'ᵗ)
            (Adam's denominator), and the step is
            γₜ·D^{-1/2}(γₜI + M̃)⁻¹D^{-1/2}m̂, which is exactly Adam's step
            where the curvature is zero; with ``graft="adam"`` it is
            rescaled per variable to the norm of Adam's step, both measured
            as ‖D^{1/2}x‖. None: the Euclidean metric (the paper's),
            direction (γₜI + M)⁻¹m̂.
        shard_state: bool, for `keras.distribution` (JAX). True shards the
            state of every variable that is not sharded itself (ZeRO-1): U
            (n, k) along n, m and v along their first axis, over the
            distribution's data-parallel mesh axis (its `batch_dim_name`),
            wherever that axis's size divides the dimension (else that piece
            stays replicated). Per-device optimizer memory then falls by the
            number of data-parallel devices; XLA inserts the collectives (an
            all-reduce of k-vectors for Uᵀd̃ and Uᵀm̃, an all-gather of each
            variable's step). No effect without a distribution. Defaults to
            False.
        curvature: which curvature block a variable gets
            (`keras_ginger.blocks`): `"vector"` (the default, the paper's
            rank-τ block of the flattened variable, for every variable) or
            `"auto"`: the Kronecker block for every variable of two or more
            axes whose name does not end in "bias" (kernels, embeddings),
            the vector block for the rest. `exclude_from_curvature` and
            `max_curvature_size` still give the identity block.
        kronecker_rank: k, the rank kept on a side of a Kronecker block
            longer than `kronecker_full_size` (positive int). Defaults to
            `32`.
        kronecker_full_size: the longest side whose factor is kept in full
            (exact eigendecomposition of an s×s matrix at each refresh).
            Defaults to `256`.
        kronecker_exponent: p of the step L̃^{-p} M̂ R̃^{-p}, in (0, 1].
            Defaults to `0.5` (measured against Shampoo's 0.25 on the
            suite: lower tuned loss on 6 of 7 tasks, benchmarks/README.md).
        kronecker_damping: γ of a Kronecker side, relative to its largest
            eigenvalue σ₁: eigenvalues below max(tail level, γ·σ₁) are
            raised to it. Defaults to `1e-3`.
        kronecker_interval: int ≥ 1, Shampoo's preconditioning frequency
            for the full sides of Kronecker blocks: each such factor F
            takes d at every refresh (F ← αF + (1-α)DDᵀ, a matmul), and its
            eigendecomposition (the s×s eigh that dominates a refresh)
            runs every this many refreshes, the step using the last one in
            between. With more than 1, each full side also keeps F (s×s
            floats). Low-rank sides update at every refresh. Defaults to
            `1` (every refresh decomposes; F is not kept).
        {{base_optimizer_keyword_args}}
    """

    accepts_fisher_grads = True

    def __init__(
        self,
        learning_rate=1e-3,
        tau=8,
        beta_1=0.9,
        beta_2=0.99,
        damping=0.3,
        exclude_from_curvature=None,
        max_curvature_size=None,
        curvature_interval=1,
        graft="adam",
        relative_damping=True,
        graft_beta_2=0.999,
        graft_epsilon=1e-7,
        metric="adam",
        shard_state=False,
        curvature="vector",
        kronecker_rank=32,
        kronecker_full_size=256,
        kronecker_exponent=0.5,
        kronecker_damping=1e-3,
        kronecker_interval=1,
        weight_decay=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name="ginger",
        **kwargs,
    ):
        _check_hyperparameters(tau, beta_1, beta_2, damping)
        _check_positive_int("max_curvature_size", max_curvature_size,
                            allow_none=True)
        _check_positive_int("curvature_interval", curvature_interval)
        _check_scale_arguments(graft, relative_damping, graft_beta_2,
                               graft_epsilon, metric)
        exclude_from_curvature = _check_patterns(exclude_from_curvature)
        _check_kronecker_arguments(curvature, kronecker_rank,
                                   kronecker_full_size, kronecker_exponent,
                                   kronecker_damping, kronecker_interval)
        if not isinstance(shard_state, bool):
            raise ValueError(
                "Argument `shard_state` must be True or False. Received: "
                f"shard_state={shard_state!r}")
        super().__init__(
            learning_rate=learning_rate,
            name=name,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            **kwargs,
        )
        self.tau = int(tau)
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.damping = float(damping)
        self.exclude_from_curvature = exclude_from_curvature
        self.max_curvature_size = max_curvature_size
        self.curvature_interval = int(curvature_interval)
        self.graft = graft
        self.relative_damping = relative_damping
        self.graft_beta_2 = float(graft_beta_2)
        self.graft_epsilon = float(graft_epsilon)
        self.metric = metric
        self.shard_state = shard_state
        self.curvature = curvature
        self.kronecker_rank = int(kronecker_rank)
        self.kronecker_full_size = int(kronecker_full_size)
        self.kronecker_exponent = float(kronecker_exponent)
        self.kronecker_damping = float(kronecker_damping)
        self.kronecker_interval = int(kronecker_interval)
        # d handed to the next apply() (`using_fisher_grads`), and
        # {variable index: d} during one apply(): per thread and per
        # tf.distribute replica, which run apply() in parallel threads.
        self._handed_fisher = _PerReplica(self)
        self._fisher_by_index = _PerReplica(self)
        self._warned_empirical = False

    # ------------------------------------------------------------------ state
    def build(self, var_list):
        """Create, per variable: momentum m, its curvature block's state
        (`block_kind`), Adam's v (`graft="adam"` or `metric="adam"`) and,
        with `gradient_accumulation_steps`, an accumulator for d.

        A vector block keeps U (n, k) and σ (k,); a Kronecker block U, σ
        (and a tail level ρ for a low-rank side) for each of its two sides.
        Bases start as the first columns of the identity, eigenvalues at 0
        (no curvature). Variables with the identity preconditioner get only
        m (and v).
        """
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._blocks = [], []
        self._fisher_accumulators, self._second_moments = [], []
        for var in var_list:
            if _keras_compat.overwrites_with_gradient(self, var):
                for slots in (self._momentums, self._blocks,
                              self._fisher_accumulators,
                              self._second_moments):
                    slots.append(None)
                continue
            prefix = var.path.replace("/", "_")
            layout = _keras_compat.variable_layout(var)
            basis_layout = _basis_layout(layout)
            if self.shard_state and basis_layout is None:
                layout, basis_layout = _sharded_state_layouts(var.shape,
                                                              layout)
            self._momentums.append(self.add_variable(
                var.shape, dtype="float32", name=f"{prefix}_momentum",
                layout=layout))
            block = _BLOCKS[self.block_kind(var)](self, var)
            block.build(prefix, basis_layout)
            self._blocks.append(block)
            curved = block.kind != "identity"
            self._fisher_accumulators.append(
                self.add_variable(var.shape, dtype="float32",
                                  name=f"{prefix}_fisher_accumulator")
                if self.gradient_accumulation_steps and curved else None
            )
            # Adam's second moment v, for the grafted step norm.
            self._second_moments.append(
                self.add_variable(var.shape, dtype="float32",
                                  name=f"{prefix}_second_moment",
                                  layout=layout)
                if "adam" in (self.graft, self.metric) else None)
        # (1 + step, variable index) of the last non-finite g or d; 0 = none.
        self._nonfinite = self.add_variable((2,), dtype="int32",
                                            name="nonfinite_event")

    def block_kind(self, variable):
        """The curvature block `variable` gets: "identity", "vector" or
        "kronecker".

        "identity" when its path matches `exclude_from_curvature` or its
        size exceeds `max_curvature_size`; otherwise as `curvature` says:
        "vector" for every variable (the default), or with "auto"
        "kronecker" for every variable of two or more axes whose name does
        not end in "bias" (kernels, embeddings) and "vector" for the rest
        (biases, scales).
        """
        if not self.uses_curvature(variable):
            return "identity"
        if (self.curvature == "vector" or len(variable.shape) < 2
                or variable.name.endswith("bias")):
            return "vector"
        return "kronecker"

    def uses_curvature(self, variable):
        """Whether `variable` is preconditioned by its own curvature.

        False when its path matches `exclude_from_curvature` or its size
        exceeds `max_curvature_size`: it then takes Adam's step (with
        `graft="adam"` or `metric="adam"`, the default) or m̂/γ (the paper's
        step).
        """
        n = int(np.prod(variable.shape))
        if self.max_curvature_size is not None and n > self.max_curvature_size:
            return False
        path = getattr(variable, "path", variable.name)
        return not any(re.search(p, path)
                       for p in self.exclude_from_curvature or ())

    def fisher_due(self):
        """Boolean tensor: does the coming update refresh the curvature?

        True every `curvature_interval` updates (counted in optimizer
        updates, i.e. after gradient accumulation). A train step may skip
        computing d_t when it is False.
        """
        return ops.equal(self._update_count() % self.curvature_interval, 0)

    def _update_count(self):
        """Optimizer updates so far (micro-steps over the accumulation)."""
        step = _keras_compat.micro_step(self)
        if self.gradient_accumulation_steps:
            step = step // self.gradient_accumulation_steps
        return step

    def _decomposition_due(self):
        """Boolean tensor: does this refresh decompose the full Kronecker
        factors? True every `kronecker_interval` refreshes."""
        refresh = self._update_count() // self.curvature_interval
        return ops.equal(refresh % self.kronecker_interval, 0)

    def nonfinite_report(self):
        """A message naming the last variable and step with non-finite g or
        d (whose update was guarded), or None if there was none."""
        self._check_built("nonfinite_report")
        step, idx = (int(x) for x in ops.convert_to_numpy(self._nonfinite))
        if step == 0:
            return None
        var = _keras_compat.tracked_variables(self)[idx]
        return (f"Ginger: non-finite gradient or Fisher gradient for variable "
                f"'{var.path}' at optimizer step {step} (last occurrence); "
                "that update was guarded: no non-finite value entered the "
                "variable, its momentum or its curvature.")

    def get_curvature(self, variable, side=None):
        """(U, σ) of `variable`'s curvature: U (s, k) orthonormal, σ (k,)
        descending.

        A vector block: the estimate U diag(σ) Uᵀ over the flattened
        variable (n entries), of d itself with ``metric=None``, of
        D^{-1/2}d (Adam's metric, unitless) with ``metric="adam"``, the
        default. A Kronecker block: ``side="left"`` for L (s = m, the
        variable's leading axes) or ``side="right"`` for R (s = n, its
        trailing axes; `kronecker.as_matrix_shape`); see
        `curvature_factors` for all of a variable's factors.
        """
        factors = dict((label, (U, sigma)) for label, U, sigma
                       in self.curvature_factors(variable))
        if side is None and "" in factors:
            return factors[""]
        if side in factors and side:
            return factors[side]
        raise ValueError(
            f"Argument `side` must be one of {sorted(k for k in factors)} "
            f"for variable {variable.path} (a "
            f"{self.block_kind(variable)} block). Received: side={side!r}")

    def curvature_factors(self, variable):
        """[(label, U, σ)]: the eigendecompositions `variable`'s block
        keeps: [("", U, σ)] for a vector block, [("left", U_L, σ_L),
        ("right", U_R, σ_R)] for a Kronecker block. Raises ValueError for a
        variable without curvature."""
        self._check_built("get_curvature")
        idx = _keras_compat.variable_index(self, variable)
        block = self._blocks[idx]
        if block is None or block.kind == "identity":
            raise ValueError(
                f"Variable {variable.path} has no curvature state: it uses "
                "the identity preconditioner (`exclude_from_curvature`, "
                "`max_curvature_size`) or is overwritten with its gradient."
            )
        return block.factors()

    def _check_built(self, what):
        if not self.built:
            raise ValueError(
                f"`{what}` needs a built optimizer: call "
                "`optimizer.build(model.trainable_variables)` or train first."
            )

    # ------------------------------------------------------------ public API
    def apply_gradients(self, grads_and_vars, fisher_grads=None):
        grads, trainable_variables = zip(*grads_and_vars)
        self.apply(grads, trainable_variables, fisher_grads=fisher_grads)
        # As Keras's own `apply_gradients` (for tf.keras compatibility).
        return _keras_compat.micro_step(self)

    def using_fisher_grads(self, fisher_grads):
        """Context manager: hands d to the next `apply` of this optimizer.

        Inside it, ``apply(grads, variables)`` (without ``fisher_grads``)
        takes ``fisher_grads`` from here. This is how d reaches Ginger
        through a wrapper that only knows about g, e.g.
        `keras.optimizers.LossScaleOptimizer`:

            with ginger.using_fisher_grads(ds):
                loss_scale_optimizer.apply(grads, variables)

        The hand-over is per thread, and under `tf.distribute` per replica
        (a replica's `apply` may run in another thread than its train step),
        so concurrent replicas never see each other's d.
        """
        return self._handed_fisher.holding(fisher_grads)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables,
                        fisher_grads=None):
        if fisher_grads is None:  # keep what `using_fisher_grads` handed
            return super().stateless_apply(
                optimizer_variables, grads, trainable_variables)
        with self.using_fisher_grads(fisher_grads):
            return super().stateless_apply(
                optimizer_variables, grads, trainable_variables)

    def apply(self, grads, trainable_variables=None, fisher_grads=None):
        """Apply g (``grads``) and, optionally, d (``fisher_grads``).

        Args:
            grads: list of loss gradients, aligned with the variables.
            trainable_variables: the variables (needed on the first call).
            fisher_grads: list of Fisher gradients d_t aligned with `grads`,
                each of its variable's shape (None entries fall back to g).
                Unscaled by `loss_scale_factor` like `grads`.
        """
        grads = list(grads)
        if fisher_grads is None:
            fisher_grads = self._handed_fisher.get()
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
            if not self.built and grads:
                with keras.name_scope(self.name, caller=self):
                    self.build(trainable_variables)
                self.built = True
        variables = (_keras_compat.tracked_variables(self)
                     if trainable_variables is None
                     else trainable_variables)
        collected = self._collect_fisher(grads, variables, fisher_grads)
        with self._fisher_by_index.holding(collected):
            super().apply(grads, trainable_variables)

    def _collect_fisher(self, grads, variables, fisher_grads):
        if fisher_grads is None:
            if not self._warned_empirical:
                self._warned_empirical = True
                warnings.warn(
                    "Ginger received no `fisher_grads`, so its curvature uses "
                    "the empirical Fisher (d = g). For the sampled-label "
                    "Fisher the method is built on, wrap the model with "
                    "`model = keras_ginger.with_fisher(model)` before "
                    "`fit()`, or pass `fisher_grads=` to `apply()`.",
                    stacklevel=_user_stacklevel(),
                )
            return {}
        if not isinstance(fisher_grads, (list, tuple)):
            raise ValueError(
                "Argument `fisher_grads` must be a list (or tuple) with one "
                "Fisher gradient per variable, like `grads`. Received: "
                f"{type(fisher_grads).__name__} "
                f"{getattr(fisher_grads, 'shape', '')}".rstrip()
            )
        fisher_grads = list(fisher_grads)
        if len(fisher_grads) != len(grads):
            raise ValueError(
                "Argument `fisher_grads` must have one entry per gradient. "
                f"Received len(fisher_grads)={len(fisher_grads)} for "
                f"{len(grads)} gradients."
            )
        if not self.built:
            return {}  # super().apply raises the informative error.
        # Validate every entry before touching any state (accumulators).
        for i, (d, var) in enumerate(zip(fisher_grads, variables)):
            if d is not None and not _shape_compatible(d.shape, var.shape):
                raise ValueError(
                    f"Argument `fisher_grads[{i}]` must have the shape of "
                    f"variable {var.path}, {tuple(var.shape)}. Received: "
                    f"shape {tuple(d.shape)}"
                )
        indices = [_keras_compat.variable_index(self, v) for v in variables]
        return {idx: self._prepare_fisher(d, idx)
                for d, idx in zip(fisher_grads, indices) if d is not None}

    def _prepare_fisher(self, d, idx):
        """Unscale d like g; under accumulation return Σd/√k (k micro-steps)."""
        d = ops.cast(d, "float32")
        if self.loss_scale_factor is not None:
            d = d / self.loss_scale_factor
        acc = self._fisher_accumulators[idx]
        if acc is None:
            return d
        steps = self.gradient_accumulation_steps
        is_update = ops.equal((_keras_compat.micro_step(self) + 1) % steps, 0)
        total = acc + d
        self.assign(acc, ops.where(is_update, ops.zeros_like(total), total))
        return total / math.sqrt(steps)

    # ----------------------------------------------------------------- update
    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if self._replicas() > 1:
            # tf.distribute: all-reduce g and d, update in a merge call.
            from keras_ginger import tf_distribute  # imports TensorFlow

            collected = self._fisher_by_index.get() or {}
            fisher = [collected.get(_keras_compat.variable_index(self, v))
                      for v in trainable_variables]
            return tf_distribute.distributed_update_step(
                self, grads, trainable_variables, fisher, learning_rate)
        self._update_variables(grads, trainable_variables, learning_rate)

    def _replicas(self):
        """Replicas of the tf.distribute strategy this optimizer was made
        under (1 on JAX, torch and without a strategy)."""
        strategy = _keras_compat.distribution_strategy(self)
        return 1 if strategy is None else strategy.num_replicas_in_sync

    def update_step(self, gradient, variable, learning_rate):
        """Update step given gradient and the associated model variable."""
        self._update_variables([gradient], [variable], learning_rate)

    def _update_variables(self, grads, variables, learning_rate,
                          fisher=None):
        """Update a list of variables, every block's small eigensolves
        in one place (`blocks.eigh_each`).

        d comes from `fisher` (aligned with `grads`) when given, else from
        what `apply()` collected; a missing d is g.
        """
        t = ops.cast(self.iterations + 1, "float32")
        bias = 1.0 - ops.power(ops.cast(self.beta_1, "float32"), t)
        lr = ops.cast(learning_rate, "float32")
        entries = []
        event = ops.convert_to_tensor(self._nonfinite)
        for i, (grad, var) in enumerate(zip(grads, variables)):
            idx = _keras_compat.variable_index(self, var)
            g = ops.reshape(ops.cast(ops.convert_to_tensor(grad), "float32"),
                            (-1,))
            if fisher is not None:
                d = fisher[i]
            else:
                d = (self._fisher_by_index.get() or {}).get(idx)
            d = g if d is None else ops.reshape(d, (-1,))
            g_ok = ops.all(ops.isfinite(g))
            d_ok = ops.all(ops.isfinite(d))
            event = ops.where(
                ops.logical_and(g_ok, d_ok), event,
                ops.convert_to_tensor(
                    [ops.cast(self.iterations + 1, "int32"),
                     ops.convert_to_tensor(idx, "int32")]))
            g0 = ops.where(g_ok, g, 0.0)
            m_old = ops.reshape(
                ops.convert_to_tensor(self._momentums[idx]), (-1,))
            m = ops.where(
                g_ok, m_old + (1.0 - self.beta_1) * (g0 - m_old), m_old)
            # θ' = θ - η_t·step(m), η_t = lr/(1 - β₁ᵗ): the step is linear
            # in the momentum, so m̂ need not be stored. 0 when g is bad.
            eta = ops.where(g_ok, lr / bias, 0.0)
            adam = None
            if "adam" in (self.graft, self.metric):
                adam = self._adam_step(idx, g_ok, g0, m, t, bias)
            entries.append(_Entry(var, idx, d_ok, d, m, eta, g_ok, lr, adam))
        curved = [e for e in entries
                  if self._blocks[e.idx].kind != "identity"]
        states = [self._blocks[e.idx].state() for e in curved]
        split = self.kronecker_interval > 1 and any(
            self._blocks[e.idx].kind == "kronecker" for e in curved)

        def refresh():
            if not split:
                return self._refresh_curvature(curved, states)
            return ops.cond(
                self._decomposition_due(),
                lambda: self._refresh_curvature(curved, states),
                lambda: self._refresh_curvature(curved, states,
                                                decompose=False))

        if self.curvature_interval == 1:
            results = refresh()
        else:
            results = ops.cond(
                self.fisher_due(), refresh,
                lambda: self._reuse_curvature(curved, states))
        thetas = {}
        for e, (state, theta) in zip(curved, results):
            for slot, value in zip(self._blocks[e.idx].slots, state):
                self.assign(slot, value)
            thetas[e.idx] = theta
        for e in entries:
            var = e.var
            self.assign(self._momentums[e.idx], ops.reshape(e.m, var.shape))
            if e.adam is not None:
                self.assign(self._second_moments[e.idx],
                            ops.reshape(e.adam.v, var.shape))
            if e.idx in thetas:
                self.assign(var, ops.cast(
                    ops.reshape(thetas[e.idx], var.shape), var.dtype))
            else:
                self.assign_sub(var, ops.cast(
                    ops.reshape(self._blocks[e.idx].delta(e), var.shape),
                    var.dtype))
        self.assign(self._nonfinite, event)

    def _refresh_curvature(self, entries, states, decompose=True):
        """[(state', θ')]: every block refreshed from d, its small
        matrices decomposed in one place (`blocks.eigh_each`); with
        ``decompose=False`` the full Kronecker factors take d but keep
        their eigendecomposition (`kronecker_interval`)."""
        begun = [self._blocks[e.idx].begin_refresh(e, state, decompose)
                 for e, state in zip(entries, states)]
        eigs = blocks.eigh_each([m for tagged, _ in begun for m in tagged])
        out, i = [], 0
        for e, state, (tagged, context) in zip(entries, states, begun):
            mine, i = eigs[i:i + len(tagged)], i + len(tagged)
            out.append(self._blocks[e.idx].end_refresh(e, state, context,
                                                       mine))
        return out

    def _reuse_curvature(self, entries, states):
        """[(state, θ')]: the step with the curvature as it is."""
        return [(state, self._blocks[e.idx].reuse(e, state))
                for e, state in zip(entries, states)]

    # ------------------------------------------------ damping and scale rules
    def _adam_step(self, idx, g_ok, g0, m, t, bias):
        """Adam's second moment v and Keras Adam's step direction (flat):
        m̂·√(1-β₂ᵗ)/(√v + ε), i.e. ε added to √v as `keras.optimizers.Adam`
        adds it, so that with the curvature off the update is Adam()'s.

        Also what the grafting rule needs: the norm of Adam's step (in the
        metric: ‖D^{1/2}·m̂/D‖ = ‖D^{-1/2}m̂‖ with `metric='adam'`, else
        ‖m̂/D‖) and ‖m‖² in the metric (‖D^{-1/2}m‖² or ‖m‖²)."""
        v_old = ops.reshape(
            ops.convert_to_tensor(self._second_moments[idx]), (-1,))
        b2 = self.graft_beta_2
        v = ops.where(g_ok, v_old + (1.0 - b2) * (g0 * g0 - v_old), v_old)
        bias_2 = 1.0 - ops.power(ops.cast(b2, "float32"), t)
        # Adam's step is m̂/D with D = (√v + ε)/√(1-β₂ᵗ).
        inv_d = ops.sqrt(bias_2) / (ops.sqrt(v) + self.graft_epsilon)
        step = (m / bias) * inv_d
        inv_sqrt_d = ops.sqrt(inv_d)
        if self.metric is None:
            m_sq = ops.sum(m * m)
            norm = ops.sqrt(ops.sum(step * step))
        else:
            m_sq = ops.sum(ops.square(m * inv_sqrt_d))
            norm = ops.sqrt(m_sq) / bias
        return _Adam(v, step, norm, inv_sqrt_d, m_sq)

    @staticmethod
    def _graft_rate(e, norm):
        """lr·‖Adam's step‖/``norm`` (0 for a bad g): the grafting rate for
        a direction of that norm (both norms in the metric)."""
        rate = e.lr * e.adam.norm / ops.where(norm > 0.0, norm, 1.0)
        return ops.where(e.g_ok, rate, 0.0)

    def _metric_scale(self, e):
        """The diagonal metric's scale: None (Euclidean) or, with
        `metric='adam'`, D^{-1/2} (the curvature sees D^{-1/2}d and
        D^{-1/2}m, and the step is D^{-1/2} times the Woodbury step)."""
        return None if self.metric is None else e.adam.inv_sqrt_d

    def get_config(self):
        config = super().get_config()
        config.update({
            "tau": self.tau,
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "damping": self.damping,
            "exclude_from_curvature": self.exclude_from_curvature,
            "max_curvature_size": self.max_curvature_size,
            "curvature_interval": self.curvature_interval,
            "graft": self.graft,
            "relative_damping": self.relative_damping,
            "graft_beta_2": self.graft_beta_2,
            "graft_epsilon": self.graft_epsilon,
            "metric": self.metric,
            "shard_state": self.shard_state,
            "curvature": self.curvature,
            "kronecker_rank": self.kronecker_rank,
            "kronecker_full_size": self.kronecker_full_size,
            "kronecker_exponent": self.kronecker_exponent,
            "kronecker_damping": self.kronecker_damping,
            "kronecker_interval": self.kronecker_interval,
        })
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """As Keras's; a config written before a scale argument existed
        loads with the step it was written with, not today's default: no
        `graft` (keras-ginger 0.1.0) is the paper's step, no `metric` the
        Euclidean one, no `curvature` (before 0.3.0) the vector block for
        every variable. Its saved state then matches the variables built."""
        config = dict(config)
        if "graft" not in config:
            config.setdefault("relative_damping", False)
            config["graft"] = None
        config.setdefault("metric", None)
        config.setdefault("curvature", "vector")
        return super().from_config(config, custom_objects=custom_objects)


# The standard keyword documentation, as Keras's own optimizers use it.
Ginger.__doc__ = Ginger.__doc__.replace(
    "{{base_optimizer_keyword_args}}",
    _keras_compat.base_optimizer_keyword_args)
