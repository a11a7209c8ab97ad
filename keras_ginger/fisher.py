"""The sampled-label Fisher gradient d_t, and the train step that feeds it to
Ginger.

Ginger's curvature is an EMA of d_t d_tᵀ. With d_t the gradient of the loss
at the *true* labels one gets the empirical Fisher; with labels sampled from
the model's own predictive distribution (paper Eq. 6-8),

    d_t = (1/√N) Σᵢ √wᵢ ∇θ ℓ(ŷᵢ, f(xᵢ; θ)),     ŷᵢ ~ p_θ(· | xᵢ),

E[d_t d_tᵀ] is the Fisher = the generalized Gauss-Newton matrix of the loss
(see `keras_ginger.samplers` for the built-in losses and why).

Public API:

* `with_fisher(model, sampler=None, seed=None)` gives an existing model the
  Fisher train step (Sequential, Functional, subclassed, KerasHub tasks),
  before or after `compile`, and returns the same instance.
* `FisherTrainStep`, a mixin: ``class Net(FisherTrainStep, keras.Model)``.
* `accepts_fisher_grads(optimizer)`.

One forward pass, two vector-Jacobian products from it: the loss gradient g
(exactly Keras's own train step: regularization losses, loss scaling,
sample weights, metrics) and the Fisher gradient d; both go to the optimizer
as ``optimizer.apply(g, variables, fisher_grads=d)``. With an optimizer that
does not take ``fisher_grads`` the train step *is* Keras's own (it delegates
to it) and nothing extra is computed.
"""

import functools
import importlib
import math
import types

import keras
from keras import ops
from keras import tree

from keras_ginger import samplers as samplers_module

try:  # Keras >= 3.6
    from keras.src.backend import get_keras_mask as _get_keras_mask
except ImportError:  # pragma: no cover

    def _get_keras_mask(x):
        return getattr(x, "_keras_mask", None)


__all__ = [
    "FisherTrainStep",
    "FisherTrainStepBase",
    "with_fisher",
    "accepts_fisher_grads",
    "fisher_loss",
]


# --------------------------------------------------------------------------
# Optimizers


def unwrap_optimizer(optimizer, attribute):
    """(the optimizer whose ``attribute`` is truthy, the
    `keras.optimizers.LossScaleOptimizer` wrapping it or None), or
    (None, None)."""
    if optimizer is None:
        return None, None
    if getattr(optimizer, attribute, False):
        return optimizer, None
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None and getattr(inner, attribute, False):
        return inner, optimizer
    return None, None


def _fisher_optimizer(optimizer):
    """(optimizer that takes fisher_grads, wrapping LossScaleOptimizer|None)."""
    return unwrap_optimizer(optimizer, "accepts_fisher_grads")


def accepts_fisher_grads(optimizer):
    """True for Ginger (``optimizer.accepts_fisher_grads``), also when wrapped
    in a `keras.optimizers.LossScaleOptimizer`."""
    return _fisher_optimizer(optimizer)[0] is not None


def _fill_fisher_grads(grads, fisher_grads):
    # A variable the loss reaches but the Fisher loss does not gets d = 0,
    # so that the two lists stay aligned (None only where g is None too).
    return [
        f if f is not None or g is None else ops.zeros_like(g)
        for g, f in zip(grads, fisher_grads)
    ]


class _bind_fisher_grads:
    """Inside, ``inner.<method>(...)`` gets ``fisher_grads=...``: used to pass
    d through a LossScaleOptimizer, which only knows about g."""

    def __init__(self, inner, method, fisher_grads):
        self.inner = inner
        self.method = method
        self.fisher_grads = fisher_grads

    def __enter__(self):
        bound = functools.partial(
            getattr(type(self.inner), self.method),
            self.inner,
            fisher_grads=self.fisher_grads,
        )
        object.__setattr__(self.inner, self.method, bound)

    def __exit__(self, *exc):
        object.__delattr__(self.inner, self.method)


def _loss_scale(optimizer):
    return ops.convert_to_tensor(optimizer.scale_loss(1.0), "float32")


def apply_with_fisher(optimizer, grads, trainable_variables, fisher_grads):
    """Stateful ``optimizer.apply(grads, variables, fisher_grads=...)``.

    ``grads`` and ``fisher_grads`` are both *scaled* by
    ``optimizer.scale_loss``; Ginger unscales its ``loss_scale_factor``
    itself. A LossScaleOptimizer unscales g by its dynamic scale, so d is
    unscaled here by the same factor and handed to the inner optimizer.
    """
    fisher_grads = _fill_fisher_grads(grads, fisher_grads)
    inner, wrapper = _fisher_optimizer(optimizer)
    if wrapper is None:
        return optimizer.apply(
            grads, trainable_variables, fisher_grads=fisher_grads
        )
    scale = _loss_scale(wrapper)
    fisher_grads = [
        None if f is None else ops.divide(f, ops.cast(scale, f.dtype))
        for f in fisher_grads
    ]
    with _bind_fisher_grads(inner, "apply", fisher_grads):
        return wrapper.apply(grads, trainable_variables)


def stateless_apply_with_fisher(
    optimizer, optimizer_variables, grads, trainable_variables, fisher_grads
):
    """`apply_with_fisher` for ``stateless_apply`` (JAX)."""
    fisher_grads = _fill_fisher_grads(grads, fisher_grads)
    inner, wrapper = _fisher_optimizer(optimizer)
    if wrapper is None:
        return optimizer.stateless_apply(
            optimizer_variables,
            grads,
            trainable_variables,
            fisher_grads=fisher_grads,
        )
    mapping = list(zip(wrapper.variables, optimizer_variables))
    with keras.StatelessScope(state_mapping=mapping):
        scale = _loss_scale(wrapper)
    fisher_grads = [
        None if f is None else ops.divide(f, ops.cast(scale, f.dtype))
        for f in fisher_grads
    ]
    with _bind_fisher_grads(inner, "stateless_apply", fisher_grads):
        return wrapper.stateless_apply(
            optimizer_variables, grads, trainable_variables
        )


# --------------------------------------------------------------------------
# The Fisher loss


def _resolve_path(path, obj):
    for p in path:
        obj = obj[p]
    return obj


def _align_like_compile_loss(compile_loss, y_true, y_pred):
    """y_true, y_pred restructured as `CompileLoss.call` does (Keras 3)."""
    if not tree.is_nested(y_true) and not tree.is_nested(y_pred):
        return y_true, y_pred
    build_pred = getattr(compile_loss, "_y_pred_build_structure", None)
    build_true = getattr(compile_loss, "_y_true_build_structure", None)
    if build_pred is not None:
        try:
            tree.assert_same_structure(build_pred, y_pred)
        except ValueError:
            y_pred = tree.pack_sequence_as(build_pred, tree.flatten(y_pred))
    if y_true is None:
        return None, y_pred
    try:
        if build_true is not None:
            try:
                tree.assert_same_structure(build_true, y_true)
            except ValueError:
                y_true = tree.pack_sequence_as(build_true, tree.flatten(y_true))
    except Exception:  # only needed for `ignore_class`; degrade gracefully
        y_true = None
    return y_true, y_pred


def _align_weight(weight, values):
    """Sample weight / mask shaped to broadcast against per-example values."""
    weight = ops.convert_to_tensor(weight)
    weight = ops.cast(weight, "float32")
    rank = len(values.shape)
    if len(weight.shape) == rank + 1 and weight.shape[-1] == 1:
        weight = ops.squeeze(weight, -1)
    while len(weight.shape) < rank:
        weight = ops.expand_dims(weight, -1)
    return weight


def _output_fisher_loss(sampler, loss_obj, y_pred, y_true, sample_weight, seed):
    """Σᵢ √wᵢ ℓ(ŷᵢ, fᵢ) / √N for one output; N = #{wᵢ > 0}."""
    in_mask = _get_keras_mask(y_pred)
    dtype = getattr(loss_obj, "dtype", None) or "float32"
    if dtype not in ("float32", "float64"):
        dtype = "float32"
    y_pred = ops.cast(ops.convert_to_tensor(y_pred), dtype)

    y_sampled = ops.stop_gradient(sampler.sample(y_pred, seed))
    values = sampler.loss(y_sampled, y_pred)
    if values is None:  # a custom sampler: the compiled loss, unreduced
        values = loss_obj.call(
            ops.convert_to_tensor(y_sampled, dtype=dtype), y_pred
        )
    out_mask = _get_keras_mask(values)
    values = ops.cast(values, "float32")

    weight = ops.ones_like(values)
    for w in (in_mask, out_mask, sampler.valid_mask(y_true), sample_weight):
        if w is not None:
            weight = weight * _align_weight(w, values)
    weight = ops.maximum(weight, 0.0)
    included = ops.greater(weight, 0.0)
    n = ops.sum(ops.cast(included, "float32"))
    total = ops.sum(ops.where(included, ops.sqrt(weight) * values, 0.0))
    return total / ops.sqrt(ops.maximum(n, 1.0))


def fisher_loss(model, y, y_pred, sample_weight, seed):
    """The scalar whose gradient is d: for every output k with compiled loss
    weight λₖ, √λₖ Σᵢ √wᵢ ℓₖ(ŷᵢ, fᵢ) / √Nₖ (independent samples per output,
    so E[d dᵀ] = Σₖ λₖ Fₖ). No regularization losses."""
    compile_loss = getattr(model, "_compile_loss", None)
    if compile_loss is None:
        raise ValueError(
            "keras_ginger: the Fisher train step needs a compiled loss to "
            "sample the Fisher gradient from. Compile with `loss=...`."
        )
    if not compile_loss.built:
        compile_loss.build(y, y_pred)
    samplers = _resolved_samplers(model, compile_loss)
    y, y_pred = _align_like_compile_loss(compile_loss, y, y_pred)
    total = None
    for entry, sampler in zip(compile_loss._flat_losses, samplers):
        path, loss_obj, loss_weight = entry[0], entry[1], entry[2]
        y_p = _resolve_path(path, y_pred)
        try:
            y_t = None if y is None else _resolve_path(path, y)
        except Exception:
            y_t = None
        if sample_weight is not None and tree.is_nested(sample_weight):
            sw = _resolve_path(path, sample_weight)
        else:
            sw = sample_weight
        value = _output_fisher_loss(sampler, loss_obj, y_p, y_t, sw, seed)
        if loss_weight is not None:
            value = value * math.sqrt(float(loss_weight))
        total = value if total is None else total + value
    if total is None:
        raise ValueError("keras_ginger: the compiled loss has no outputs.")
    return total


def _resolved_samplers(model, compile_loss):
    cache = getattr(model, "_fisher_cache", None)
    if cache is not None and cache[0] is compile_loss:
        return cache[1]
    flat = compile_loss._flat_losses
    names = [entry[3] for entry in flat]
    spec = getattr(model, "_fisher_sampler_spec", None)
    if spec is None:
        spec = getattr(model, "fisher_sampler", None)
    if spec is None:
        chosen = [None] * len(flat)
    elif isinstance(spec, dict):
        chosen = []
        used = set()
        for entry in flat:
            keys = [entry[3]] + [p for p in entry[0] if isinstance(p, str)]
            key = next((k for k in keys if k in spec), None)
            chosen.append(None if key is None else spec[key])
            used.add(key)
        unknown = set(spec) - used
        if unknown:
            raise ValueError(
                f"keras_ginger: `sampler` has keys {sorted(unknown)} that name "
                f"no output with a loss. Outputs with a loss: {names}."
            )
    elif isinstance(spec, (list, tuple)):
        if len(spec) != len(flat):
            raise ValueError(
                f"keras_ginger: got {len(spec)} samplers for {len(flat)} "
                f"outputs with a loss ({names}); pass one per output, in "
                "order, or a dict keyed by output name."
            )
        chosen = list(spec)
    else:  # one sampler for every output
        chosen = [spec] * len(flat)
    resolved = [
        samplers_module.get(s)
        if s is not None
        else samplers_module.sampler_for_loss(entry[1], entry[3])
        for s, entry in zip(chosen, flat)
    ]
    object.__setattr__(model, "_fisher_cache", (compile_loss, resolved))
    return resolved


# --------------------------------------------------------------------------
# The mixin (backend-independent part) and with_fisher


def _ensure_seed_generator(model, seed=None):
    sg = getattr(model, "_fisher_seed_generator", None)
    if sg is not None:
        if seed is not None:
            sg.state.assign(
                ops.convert_to_tensor([int(seed), 0], dtype=sg.state.dtype)
            )
        return sg
    tracker = getattr(model, "_tracker", None)
    locked = tracker is not None and tracker.locked
    if locked:
        tracker.unlock()
    try:
        sg = keras.random.SeedGenerator(seed, name="fisher_seed_generator")
        # A SeedGenerator set as an attribute is tracked by the layer: its
        # state is in model.non_trainable_variables, so the JAX train step
        # carries it in its state and it advances under jit.
        model._fisher_seed_generator = sg
    finally:
        if locked:
            tracker.lock()
    post_track = getattr(model, "_post_track_variable", None)
    if post_track is not None:  # torch: register in torch_params
        post_track(sg.state)
    return sg


# Seeds one train step may draw (one per output with a loss) before the
# next step's stream starts.
SEED_STRIDE = 16


class FisherTrainStepBase:
    """Backend-independent part of `FisherTrainStep`.

    A subclass may set the class attribute ``fisher_sampler`` (anything
    `with_fisher`'s ``sampler`` accepts); `with_fisher(model, sampler=...)`
    overrides it per instance.
    """

    fisher_sampler = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _ensure_seed_generator(self)

    def _fisher_active(self):
        return accepts_fisher_grads(getattr(self, "optimizer", None))

    def _fisher_loss(self, y, y_pred, sample_weight):
        # Counter-based seeding: this step's draws start at (base seed,
        # SEED_STRIDE · optimizer step). The step is saved with the optimizer,
        # so a run resumed from a checkpoint samples the labels the
        # uninterrupted run would have.
        # The micro-step count (`_iterations`): under gradient accumulation
        # `iterations` stays put for k micro-batches, which must not share
        # their samples.
        sg = self._fisher_seed_generator
        inner, _ = _fisher_optimizer(self.optimizer)
        step = ops.cast(inner._iterations, sg.state.dtype)
        sg.state.assign(ops.stack([sg.state[0], step * SEED_STRIDE]))
        return fisher_loss(self, y, y_pred, sample_weight, sg)

    def _fisher_due(self):
        """None when every step needs d; else a boolean tensor (Ginger's
        `fisher_due()`, with `curvature_interval` > 1)."""
        inner, _ = _fisher_optimizer(self.optimizer)
        if getattr(inner, "curvature_interval", 1) == 1:
            return None
        return inner.fisher_due()

    def make_train_function(self, force=False):
        # Before the JAX trainer gathers its state, so the seed is in it.
        _ensure_seed_generator(self)
        return super().make_train_function(force=force)

    def __reduce__(self):
        # Keras pickles a model as (cls._unpickle_model, (saved bytes,)). A
        # class made by `with_fisher` is not importable under its name, so
        # unpickle through the original class (as a .keras file loads).
        reduced = super().__reduce__()
        base = type(self).__dict__.get("_fisher_base_class")
        fn = reduced[0] if isinstance(reduced, tuple) and reduced else None
        if base is not None and getattr(fn, "__self__", None) is type(self):
            return (getattr(base, fn.__name__),) + tuple(reduced[1:])
        return reduced


def __getattr__(name):  # lazy: the backend trainer imports this module
    if name == "FisherTrainStep":
        from keras_ginger.trainers import FisherTrainStep

        return FisherTrainStep
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_FISHER_CLASSES = {}


def _fisher_class(cls):
    from keras_ginger.trainers import FisherTrainStep

    if issubclass(cls, FisherTrainStep):
        return cls
    if cls in _FISHER_CLASSES:
        return _FISHER_CLASSES[cls]
    # Same name, qualname and module as `cls`, and registered under the same
    # Keras names: the model serializes (get_config, .keras files, pickle)
    # exactly as the original class and loads back as it.
    namespace = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "_fisher_base_class": cls,
    }
    new = types.new_class(
        cls.__name__, (FisherTrainStep, cls), exec_body=lambda ns: ns.update(namespace)
    )
    _register_like(new, cls)
    _FISHER_CLASSES[cls] = new
    return new


def _register_like(new, cls):
    """Give ``new`` the serialization names Keras has for ``cls``."""
    for module, table in (
        ("keras.src.saving.object_registration", "GLOBAL_CUSTOM_NAMES"),
        ("keras.src.api_export", "REGISTERED_OBJS_TO_NAMES"),
    ):
        try:
            names = getattr(importlib.import_module(module), table)
        except Exception:  # pragma: no cover - layout of a future Keras
            continue
        if cls in names:
            names[new] = names[cls]


def with_fisher(model, sampler=None, seed=None):
    """Gives ``model`` the sampled-label Fisher train step; returns it.

    Works before or after ``compile`` on Sequential, Functional and
    subclassed models and on KerasHub tasks (e.g. `T5Seq2SeqLM`). The
    instance's class is swapped for a subclass that also derives from
    `FisherTrainStep`; it has the same name and serializes as the original
    (a saved model loads back as the original class: call `with_fisher`
    again to train it with Ginger).

    Args:
        model: a `keras.Model`.
        sampler: None to pick one from the compiled loss of each output
            (sparse / one-hot categorical and binary cross-entropy, mean
            squared error); or a `keras_ginger.samplers.Sampler` or a
            callable ``fn(y_pred, seed) -> y_sampled`` (targets drawn from
            the model's predictive distribution, in the format the loss
            expects; use keras.random ops with ``seed=seed``); for a
            multi-output model a list (outputs with a loss, in order) or a
            dict (by output name), None entries meaning "built-in". A single
            sampler is used for every output.
        seed: int seed of the sampling; by default it is drawn like any
            Keras seed, so it follows `keras.utils.set_random_seed` called
            before `with_fisher`.

    Returns:
        ``model`` itself.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"with_fisher expects a keras.Model. Received: {type(model)}"
        )
    if sampler is not None and not isinstance(sampler, (list, tuple, dict)):
        samplers_module.get(sampler)  # validates: callable
    model.__class__ = _fisher_class(type(model))
    object.__setattr__(model, "_fisher_sampler_spec", sampler)
    object.__setattr__(model, "_fisher_cache", None)
    _ensure_seed_generator(model, seed)
    # Rebuild the train function so it uses the new train step.
    model.train_function = None
    return model
