"""The backend-independent part of the Fisher train step.

One forward pass, two vector-Jacobian products from it: the loss gradient g
(exactly Keras's own train step: regularization losses, loss scaling,
sample weights, metrics) and the Fisher gradient d (the gradient of
`keras_ginger.fisher_loss.model_fisher_loss`); both go to the optimizer as
``optimizer.apply(g, variables, fisher_grads=d)``. With an optimizer that
does not take ``fisher_grads`` the train step *is* Keras's own (it delegates
to it) and nothing extra is computed.

This module holds what the three per-backend train steps
(`keras_ginger.trainers`) share: the seed stream of the sampled labels and
the hand-over of g and d to the optimizer, also through a
`keras.optimizers.LossScaleOptimizer` (which only knows about g).

An optimizer takes d when it has ``accepts_fisher_grads = True``,
``apply(grads, variables, fisher_grads=None)``, ``stateless_apply(...,
fisher_grads=None)`` and the context manager ``using_fisher_grads(d)``, which
hands d to the next ``apply`` called without it (`Ginger` has all four).
"""

import keras
from keras import ops

from keras_ginger import _keras_compat
from keras_ginger.fisher_loss import model_fisher_loss
from keras_ginger.fisher_loss import seed_stream

__all__ = [
    "FisherTrainStepBase",
    "accepts_fisher_grads",
    "apply_with_fisher",
    "stateless_apply_with_fisher",
    "unwrap_optimizer",
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


def fisher_optimizer(optimizer):
    """(optimizer that takes fisher_grads, wrapping LossScaleOptimizer|None)."""
    return unwrap_optimizer(optimizer, "accepts_fisher_grads")


def accepts_fisher_grads(optimizer):
    """True for Ginger (``optimizer.accepts_fisher_grads``), also when wrapped
    in a `keras.optimizers.LossScaleOptimizer`."""
    return fisher_optimizer(optimizer)[0] is not None


def _fill_fisher_grads(grads, fisher_grads):
    # A variable the loss reaches but the Fisher loss does not gets d = 0,
    # so that the two lists stay aligned (None only where g is None too).
    return [
        f if f is not None or g is None else ops.zeros_like(g)
        for g, f in zip(grads, fisher_grads)
    ]


def _unscaled(fisher_grads, scale):
    """d divided by a LossScaleOptimizer's dynamic scale, as it divides g."""
    return [None if f is None else ops.divide(f, ops.cast(scale, f.dtype))
            for f in fisher_grads]


def apply_with_fisher(optimizer, grads, trainable_variables, fisher_grads):
    """Stateful ``optimizer.apply(grads, variables, fisher_grads=...)``.

    ``grads`` and ``fisher_grads`` are both *scaled* by
    ``optimizer.scale_loss``; Ginger unscales its ``loss_scale_factor``
    itself. A LossScaleOptimizer unscales g by its dynamic scale and calls
    the inner optimizer's ``apply`` with g alone, so d is unscaled here by
    the same factor and handed to the inner optimizer through
    `Ginger.using_fisher_grads` (per thread and per tf.distribute replica).
    """
    fisher_grads = _fill_fisher_grads(grads, fisher_grads)
    inner, wrapper = fisher_optimizer(optimizer)
    if wrapper is None:
        return optimizer.apply(
            grads, trainable_variables, fisher_grads=fisher_grads
        )
    scale = ops.convert_to_tensor(wrapper.scale_loss(1.0), "float32")
    with inner.using_fisher_grads(_unscaled(fisher_grads, scale)):
        return wrapper.apply(grads, trainable_variables)


def stateless_apply_with_fisher(
    optimizer, optimizer_variables, grads, trainable_variables, fisher_grads
):
    """`apply_with_fisher` for ``stateless_apply`` (JAX)."""
    fisher_grads = _fill_fisher_grads(grads, fisher_grads)
    inner, wrapper = fisher_optimizer(optimizer)
    if wrapper is None:
        return optimizer.stateless_apply(
            optimizer_variables,
            grads,
            trainable_variables,
            fisher_grads=fisher_grads,
        )
    mapping = list(zip(wrapper.variables, optimizer_variables))
    with keras.StatelessScope(state_mapping=mapping):
        scale = ops.convert_to_tensor(wrapper.scale_loss(1.0), "float32")
    with inner.using_fisher_grads(_unscaled(fisher_grads, scale)):
        return wrapper.stateless_apply(
            optimizer_variables, grads, trainable_variables
        )


# --------------------------------------------------------------------------
# The mixin's backend-independent part


def ensure_seed_generator(model, seed=None):
    """The model's Fisher `SeedGenerator`, created (and tracked) if needed;
    ``seed`` resets its stream."""
    sg = getattr(model, "_fisher_seed_generator", None)
    if sg is not None:
        if seed is not None:
            sg.state.assign(
                ops.convert_to_tensor([int(seed), 0], dtype=sg.state.dtype)
            )
        return sg
    with _keras_compat.tracker_unlocked(model):
        sg = keras.random.SeedGenerator(seed, name="fisher_seed_generator")
        # A SeedGenerator set as an attribute is tracked by the layer: its
        # state is in model.non_trainable_variables, so the JAX train step
        # carries it in its state and it advances under jit.
        model._fisher_seed_generator = sg
    _keras_compat.post_track_variable(model, sg.state)
    return sg


class FisherTrainStepBase:
    """Backend-independent part of `FisherTrainStep`.

    A subclass may set the class attribute ``fisher_sampler`` (anything
    `with_fisher`'s ``sampler`` accepts); `with_fisher(model, sampler=...)`
    overrides it per instance.
    """

    fisher_sampler = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        ensure_seed_generator(self)

    def _fisher_active(self):
        return accepts_fisher_grads(getattr(self, "optimizer", None))

    def _fisher_loss(self, y, y_pred, sample_weight):
        # Counter-based seeding: this step's draws are (base seed,
        # SEED_STRIDE · optimizer micro-step + j), j = 0, 1, ..., exactly
        # those of `keras_ginger.fisher_loss(..., seed=base, step=...)`; the
        # generator's state only holds the base seed. The step is saved with the
        # optimizer, so a run resumed from a checkpoint samples the labels
        # the uninterrupted run would have. The micro-step count: under
        # gradient accumulation `iterations` stays put for k micro-batches,
        # which must not share their samples.
        inner, _ = fisher_optimizer(self.optimizer)
        seed = seed_stream(self._fisher_seed_base(),
                           _keras_compat.micro_step(inner))
        return model_fisher_loss(self, y, y_pred, sample_weight, seed)

    def _fisher_seed_base(self):
        """The base seed of this replica's draws: the generator's (a
        backend's train step adds REPLICA_SEED_STRIDE·r where replica r
        samples its own rows, see `keras_ginger.fisher_loss`)."""
        return self._fisher_seed_generator.state[0]

    def _fisher_due(self):
        """None when every step needs d; else a boolean tensor (Ginger's
        `fisher_due()`, with `curvature_interval` > 1)."""
        inner, _ = fisher_optimizer(self.optimizer)
        if getattr(inner, "curvature_interval", 1) == 1:
            return None
        return inner.fisher_due()

    def make_train_function(self, force=False):
        # Before the JAX trainer gathers its state, so the seed is in it.
        ensure_seed_generator(self)
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
