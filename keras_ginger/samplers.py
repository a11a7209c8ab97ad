"""Samplers: draw targets from the model's own predictive distribution.

Ginger's curvature is the Fisher information matrix, which for the losses
below equals the generalized Gauss-Newton (GGN) matrix of the loss. It is
estimated from the *sampled-label* gradient (paper, Eq. 6-8)

    d = (1/√N) Σᵢ √wᵢ ∇θ ℓ(ŷᵢ, f(xᵢ; θ)),      ŷᵢ ~ p_θ(· | xᵢ),

so that E[d dᵀ] = (1/N) Σᵢ wᵢ Jᵢᵀ Hᵢ Jᵢ, the GGN of the per-example loss ℓ
(Hᵢ is the Hessian of ℓ with respect to the model output, Jᵢ the output
Jacobian). N counts the examples -- or, for sequence outputs, the tokens --
that have a nonzero weight wᵢ. Using the true label yᵢ instead of ŷᵢ gives
the *empirical* Fisher, a different matrix (Kunstner et al., 2019).

A sampler has two parts:

* ``sample(y_pred, seed)``: the targets ŷ ~ p(· | y_pred), drawn with
  ``keras.random`` ops and ``seed`` (a ``keras.random.SeedGenerator``), so
  that they are fresh on every step and under ``jit``;
* ``loss(y_sampled, y_pred)``: the per-example (per-token) negative
  log-likelihood ℓ(ŷ, f), unreduced, whose Hessian in f is the GGN block of
  the compiled loss. ``None`` means "use the compiled loss itself".

Built-in samplers, picked from the compiled loss by `sampler_for_loss`:

* sparse / one-hot categorical cross-entropy (``from_logits`` True or
  False): ŷ ~ Categorical(softmax(f)) by inverse-CDF sampling (one
  uniform draw per row); ℓ is the cross-entropy *without* label
  smoothing (smoothing does not change the Hessian diag(p) - p pᵀ, and
  evaluating a smoothed loss on ŷ would bias d);
  an ``ignore_class`` excludes the tokens whose *true* label is that class.
* binary cross-entropy (logits or probabilities): ŷₖ ~ Bernoulli(σ(fₖ)).
  Keras averages binary cross-entropy over the last axis (K labels), so
  H = (1/K) diag(p(1-p)); the gradient of that mean under Bernoulli samples
  has second moment (1/K²) diag(p(1-p)), so ℓ is multiplied by √K.
* mean squared error: Keras's MSE is ℓ = (1/D) Σⱼ (yⱼ - fⱼ)² over the last
  axis (D outputs), the negative log-likelihood (up to a constant) of the
  Gaussian y ~ N(f, (D/2) I). We sample ŷ = f + √(D/2) ε with ε ~ N(0, I).
  Then ∇f ℓ(ŷ) = -(2/D)(ŷ - f) = -(2/D) √(D/2) ε and
  E[∇f ℓ ∇f ℓᵀ] = (4/D²)(D/2) I = (2/D) I = ∇²f ℓ, so E[d dᵀ] is exactly the
  GGN Jᵀ (2/D) I J of the loss.

A custom sampler is any callable ``fn(y_pred, seed)`` (or ``fn(y_pred)``)
returning targets in the format the compiled loss expects; the compiled
loss is then evaluated on them. It must be the negative log-likelihood of
the distribution you sample from for E[d dᵀ] to be the Fisher. Subclass
`Sampler` to also provide ``loss``. Use only ``keras.ops`` and
``keras.random`` (with ``seed=seed``) so the sampler runs on every backend
and under ``jit``.
"""

import inspect
import math

import keras
from keras import ops

__all__ = [
    "Sampler",
    "CategoricalSampler",
    "BernoulliSampler",
    "GaussianSampler",
    "CallableSampler",
    "sampler_for_loss",
    "get",
    "register_sampler",
]


class Sampler:
    """Base class: targets drawn from the model's predictive distribution.

    Subclasses implement `sample`; they may implement `loss` (the unreduced
    per-example negative log-likelihood), else the compiled loss is used.
    """

    def sample(self, y_pred, seed):
        """Returns targets ŷ ~ p(· | y_pred), using ``seed`` for randomness."""
        raise NotImplementedError

    def loss(self, y_sampled, y_pred):
        """Unreduced per-example loss ℓ(ŷ, y_pred), or None for the compiled
        loss."""
        return None

    def valid_mask(self, y_true):
        """Optional mask from the *true* targets (e.g. ``ignore_class``);
        None means every example counts."""
        return None

    def __call__(self, y_pred, seed=None):
        return self.sample(y_pred, seed)

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{self.__class__.__name__}({fields})"


def _float(y_pred):
    y_pred = ops.convert_to_tensor(y_pred)
    if y_pred.dtype not in ("float32", "float64"):
        y_pred = ops.cast(y_pred, "float32")
    return y_pred


def _uniform(shape, dtype, seed):
    # Open interval (0, 1): safe for log(u) and log(-log(u)).
    tiny = 1e-7 if dtype == "float32" else 1e-12
    return keras.random.uniform(
        shape, minval=tiny, maxval=1.0 - tiny, dtype=dtype, seed=seed
    )


class CategoricalSampler(Sampler):
    """ŷ ~ Categorical(p) along ``axis``, p = softmax(y_pred) or y_pred.

    Args:
        from_logits: whether ``y_pred`` holds logits (else probabilities).
        sparse: return class indices (int32), else one-hot vectors.
        axis: the class axis.
        ignore_class: the *true* label that marks an excluded token.
    """

    def __init__(self, from_logits=True, sparse=True, axis=-1, ignore_class=None):
        self.from_logits = bool(from_logits)
        self.sparse = bool(sparse)
        self.axis = axis
        self.ignore_class = ignore_class

    def _logits(self, y_pred):
        y_pred = _float(y_pred)
        if self.from_logits:
            return y_pred
        return ops.log(ops.clip(y_pred, 1e-30, 1.0))

    def sample(self, y_pred, seed):
        # Inverse-CDF sampling: one uniform draw per row (token), not one
        # per class as the Gumbel-max trick needs. Drawing random numbers
        # is what costs on CPU (JAX: a 2-block transformer's step of
        # 276k logits spent ~25 ms drawing them, benchmarks/train_step.py).
        logits = ops.stop_gradient(self._logits(y_pred))
        axis = self.axis % len(logits.shape)
        num_classes = logits.shape[axis]
        p = ops.softmax(logits, axis=axis)
        cdf = ops.cumsum(p, axis=axis)
        if num_classes is None:  # known only when the graph runs
            num_classes = ops.shape(logits)[axis]
            total = ops.sum(p, axis=axis, keepdims=True)
        else:
            total = ops.take(cdf, [num_classes - 1], axis=axis)
        shape = list(ops.shape(logits))
        shape[axis] = 1
        u = _uniform(tuple(shape), logits.dtype, seed)
        # The class whose CDF interval holds u·total (a class of probability
        # 0 has an empty interval and is never drawn).
        index = ops.sum(ops.cast(cdf < u * total, "int32"), axis=axis)
        index = ops.minimum(index, num_classes - 1)
        if self.sparse:
            return ops.cast(index, "int32")
        return ops.one_hot(index, num_classes, axis=self.axis, dtype=logits.dtype)

    def loss(self, y_sampled, y_pred):
        y_pred = _float(y_pred)
        if self.sparse:
            return keras.losses.sparse_categorical_crossentropy(
                y_sampled, y_pred, from_logits=self.from_logits, axis=self.axis
            )
        return keras.losses.categorical_crossentropy(
            ops.cast(y_sampled, y_pred.dtype),
            y_pred,
            from_logits=self.from_logits,
            axis=self.axis,
        )

    def valid_mask(self, y_true):
        if self.ignore_class is None or y_true is None:
            return None
        y_true = ops.convert_to_tensor(y_true)
        return ops.not_equal(ops.cast(y_true, "int32"), int(self.ignore_class))


class BernoulliSampler(Sampler):
    """ŷₖ ~ Bernoulli(pₖ) independently, p = sigmoid(y_pred) or y_pred.

    The loss is Keras's binary cross-entropy (a mean over the last axis)
    times √K, K the size of that axis, so that E[d dᵀ] is the GGN of the
    mean (see the module docstring).
    """

    def __init__(self, from_logits=False):
        self.from_logits = bool(from_logits)

    def sample(self, y_pred, seed):
        y_pred = ops.stop_gradient(_float(y_pred))
        p = ops.sigmoid(y_pred) if self.from_logits else y_pred
        u = _uniform(ops.shape(p), p.dtype, seed)
        return ops.cast(ops.less(u, p), p.dtype)

    def loss(self, y_sampled, y_pred):
        y_pred = _float(y_pred)
        if len(y_pred.shape) == 1:  # one label per example, no label axis
            y_pred = ops.expand_dims(y_pred, -1)
            y_sampled = ops.expand_dims(y_sampled, -1)
        k = y_pred.shape[-1]
        values = keras.losses.binary_crossentropy(
            ops.cast(y_sampled, y_pred.dtype), y_pred, from_logits=self.from_logits
        )
        return values * math.sqrt(k)


class GaussianSampler(Sampler):
    """ŷ = y_pred + √(D/2) ε, ε ~ N(0, I): the Gaussian whose negative
    log-likelihood is Keras's mean squared error (a mean over the last axis
    of size D), so that E[d dᵀ] is exactly the GGN Jᵀ (2/D) I J."""

    def sample(self, y_pred, seed):
        y_pred = ops.stop_gradient(_float(y_pred))
        d = y_pred.shape[-1] if len(y_pred.shape) > 1 else 1
        noise = keras.random.normal(ops.shape(y_pred), dtype=y_pred.dtype, seed=seed)
        return y_pred + math.sqrt(d / 2.0) * noise

    def loss(self, y_sampled, y_pred):
        y_pred = _float(y_pred)
        if len(y_pred.shape) == 1:  # one output per example, no feature axis
            y_pred = ops.expand_dims(y_pred, -1)
            y_sampled = ops.expand_dims(y_sampled, -1)
        return keras.losses.mean_squared_error(
            ops.cast(y_sampled, y_pred.dtype), y_pred
        )


class CallableSampler(Sampler):
    """Wraps ``fn(y_pred, seed)`` or ``fn(y_pred)``; the loss is the
    compiled loss evaluated on its samples."""

    def __init__(self, fn):
        if not callable(fn):
            raise TypeError(f"A sampler must be callable. Received: {fn!r}")
        self.fn = fn
        self._takes_seed = _takes_seed(fn)

    def sample(self, y_pred, seed):
        y_pred = ops.stop_gradient(y_pred)
        if self._takes_seed:
            return self.fn(y_pred, seed)
        return self.fn(y_pred)


def _takes_seed(fn):
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return True
    if any(p.name == "seed" for p in params):
        return True
    positional = [
        p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(positional) >= 2


def get(sampler):
    """A `Sampler` from a `Sampler`, a callable, or None (returned as is)."""
    if sampler is None or isinstance(sampler, Sampler):
        return sampler
    return CallableSampler(sampler)


# --------------------------------------------------------------------------
# Picking a sampler from a compiled loss.

_REGISTRY = []  # (matcher, factory); newest first


def register_sampler(loss, factory):
    """Teach `sampler_for_loss` a new loss.

    Args:
        loss: a `keras.losses.Loss` subclass, or a loss function (matched
            against ``LossFunctionWrapper.fn`` too).
        factory: ``factory(loss_instance) -> Sampler``.
    """
    if isinstance(loss, type):
        matcher = lambda obj: isinstance(obj, loss)  # noqa: E731
    else:
        matcher = lambda obj: obj is loss or getattr(obj, "fn", None) is loss  # noqa: E731
    _REGISTRY.insert(0, (matcher, factory))


def _kwargs(loss):
    return dict(getattr(loss, "_fn_kwargs", None) or {})


def _sparse_cce(loss):
    kw = _kwargs(loss)
    return CategoricalSampler(
        from_logits=kw.get("from_logits", False),
        sparse=True,
        axis=kw.get("axis", -1),
        ignore_class=kw.get("ignore_class", None),
    )


def _cce(loss):
    kw = _kwargs(loss)
    return CategoricalSampler(
        from_logits=kw.get("from_logits", False),
        sparse=False,
        axis=kw.get("axis", -1),
    )


def _bce(loss):
    kw = _kwargs(loss)
    if kw.get("axis", -1) != -1:
        raise ValueError(
            "keras_ginger: the built-in binary cross-entropy sampler supports "
            f"axis=-1 only. Received: axis={kw['axis']}. Pass `sampler=`."
        )
    return BernoulliSampler(from_logits=kw.get("from_logits", False))


def _mse(loss):
    return GaussianSampler()


register_sampler(keras.losses.mean_squared_error, _mse)
register_sampler(keras.losses.binary_crossentropy, _bce)
register_sampler(keras.losses.categorical_crossentropy, _cce)
register_sampler(keras.losses.sparse_categorical_crossentropy, _sparse_cce)


def sampler_for_loss(loss, output_name=None):
    """The built-in `Sampler` for a resolved Keras loss, or a ValueError
    that says how to pass one."""
    for matcher, factory in _REGISTRY:
        if matcher(loss):
            return factory(loss)
    where = f" (output '{output_name}')" if output_name else ""
    raise ValueError(
        f"keras_ginger: no Fisher sampler is known for the loss {loss!r}"
        f"{where}. Built-in samplers cover sparse and one-hot categorical "
        "cross-entropy, binary cross-entropy and mean squared error. Pass "
        "your own: `keras_ginger.with_fisher(model, sampler=fn)`, where "
        "`fn(y_pred, seed)` returns targets drawn from the model's "
        "predictive distribution p(y | y_pred) in the format the loss "
        "expects, using keras.random ops with `seed=seed`; the compiled loss "
        "must be the negative log-likelihood of that distribution. For a "
        "multi-output model pass a list (in output order) or a dict (by "
        "output name) with one sampler per output. To teach keras_ginger a "
        "loss for good, use `keras_ginger.samplers.register_sampler`."
    )
