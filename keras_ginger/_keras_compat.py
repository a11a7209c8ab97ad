"""Every Keras internal keras-ginger uses, in one place.

keras-ginger builds on Keras's public API wherever one exists. What it takes
from ``keras.src`` or from a private attribute is listed here, and only here,
so that a Keras release that moves one of them fails in one place, loudly,
with the Keras version in the message (tests/test_keras_compat.py checks that
each resolves on the Keras that ``make test`` installs). There is no silent
fallback: a missing internal is a `KerasCompatError`, never a change of
behaviour or speed.

Tested Keras range: `SUPPORTED_KERAS` (also declared in pyproject.toml).
"""

import importlib

import keras
from keras import ops

SUPPORTED_KERAS = ">=3.10,<4"


class KerasCompatError(ImportError):
    """A Keras internal keras-ginger needs is missing in this Keras."""


def _missing(what):
    return KerasCompatError(
        f"keras_ginger needs {what}, which Keras {keras.__version__} does not "
        f"have. keras-ginger is tested with keras{SUPPORTED_KERAS}; install a "
        "Keras in that range."
    )


def _module_attr(module, name):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise _missing(f"`{module}.{name}`") from None


def _attr(obj, name, owner):
    try:
        return getattr(obj, name)
    except AttributeError:
        raise _missing(f"the private attribute `{owner}.{name}`") from None


# ------------------------------------------------------------ keras.src.*
# Resolved at import: a Keras without them fails on `import keras_ginger`.

#: Docstring block of the keyword arguments every Keras optimizer takes.
base_optimizer_keyword_args = _module_attr(
    "keras.src.optimizers.optimizer", "base_optimizer_keyword_args")
#: The mask Keras attaches to a tensor (`_keras_mask`), or None.
get_keras_mask = _module_attr("keras.src.backend", "get_keras_mask")
#: Undoes the 1/replicas loss scaling of `Trainer.compute_loss` (for the
#: loss tracker, as Keras's own TF train step does).
unscale_loss_for_distribution = _module_attr(
    "keras.src.losses.loss", "unscale_loss_for_distribution")
_is_in_jax_tracing_scope = _module_attr(
    "keras.src.utils.jax_utils", "is_in_jax_tracing_scope")
_SERIALIZATION_TABLES = (
    _module_attr("keras.src.saving.object_registration",
                 "GLOBAL_CUSTOM_NAMES"),
    _module_attr("keras.src.api_export", "REGISTERED_OBJS_TO_NAMES"),
)

#: The dtype of a `keras.random.SeedGenerator`'s state on this backend.
random_seed_dtype = _module_attr("keras.src.backend", "random_seed_dtype")


class SeedStream(keras.random.SeedGenerator):
    """The seeds [base, offset], [base, offset + 1], ... that `keras.random`
    draws from a `SeedGenerator` whose state is [base, offset], with no
    variable: ``base`` and ``offset`` may be tensors (traced under ``jit``),
    and drawing changes no state.

    Relies on Keras drawing a seed from a `SeedGenerator` argument by
    calling its `next()` (``keras.src.random.seed_generator.draw_seed``) and
    on nothing else of the class, so no `SeedGenerator.__init__` runs.
    """

    def __init__(self, base, offset):  # pylint: disable=super-init-not-called
        dtype = random_seed_dtype()
        self._base = ops.cast(base, dtype)
        self._offset = ops.cast(offset, dtype)
        self._count = 0

    def next(self, ordered=True):
        seed = ops.stack([self._base, self._offset + self._count])
        self._count += 1
        return seed

    def get_config(self):
        raise TypeError("keras_ginger: a SeedStream is not serializable.")


def is_in_jax_tracing_scope(x):
    """Whether ``x`` is a JAX tracer (inside jit), as Keras itself tests it."""
    return _is_in_jax_tracing_scope(x)


def register_like(new, cls):
    """Give class ``new`` the serialization names Keras has for ``cls``, so
    that it saves and loads as ``cls`` (get_config, .keras files, pickle)."""
    for table in _SERIALIZATION_TABLES:
        if cls in table:
            table[new] = table[cls]


# ------------------------------------------------------- keras.Model privates

def compile_loss(model):
    """The model's `CompileLoss` (``model._compile_loss``), or None when the
    model was compiled without a loss (or not compiled)."""
    if not getattr(model, "compiled", False):
        return None
    return _attr(model, "_compile_loss", "Trainer")


def flat_losses(compile_loss):
    """[(path, loss object, loss weight, output name), ...], one per output
    with a loss, in the order `CompileLoss` sums them."""
    return [tuple(entry[:4])
            for entry in _attr(compile_loss, "_flat_losses", "CompileLoss")]


def build_structures(compile_loss):
    """(y_true, y_pred) structures `CompileLoss` was built with, or None."""
    return (getattr(compile_loss, "_y_true_build_structure", None),
            getattr(compile_loss, "_y_pred_build_structure", None))


def call_has_training_arg(model):
    return _attr(model, "_call_has_training_arg", "Model")


def compute_loss(model, **kwargs):
    """``model._compute_loss``: `compute_loss` with the 1/replicas scaling
    under tf.distribute, as Keras's train steps call it."""
    return _attr(model, "_compute_loss", "Model")(**kwargs)


def loss_tracker(model):
    return _attr(model, "_loss_tracker", "Model")


def update_metrics_variables(model, *args):
    """JAX: ``model._update_metrics_variables`` (stateless metrics)."""
    return _attr(model, "_update_metrics_variables", "Model")(*args)


def tracker_unlocked(model):
    """Context manager: lets a built (locked) layer track a new attribute."""
    return _Unlocked(_attr(model, "_tracker", "Layer"))


class _Unlocked:
    def __init__(self, tracker):
        self.tracker = tracker
        self.locked = tracker.locked

    def __enter__(self):
        if self.locked:
            self.tracker.unlock()

    def __exit__(self, *exc):
        if self.locked:
            self.tracker.lock()


def post_track_variable(model, variable):
    """torch: register a variable added after build in ``torch_params``
    (the torch backend's layers only)."""
    if keras.backend.backend() == "torch":
        _attr(model, "_post_track_variable", "Layer")(variable)


# ---------------------------------------------------- keras.Optimizer privates

def micro_step(optimizer):
    """The optimizer's micro-step counter (``_iterations``): unlike
    `iterations`, it advances on every `apply`, also between the updates of
    gradient accumulation."""
    return _attr(optimizer, "_iterations", "Optimizer")


def variable_index(optimizer, variable):
    """Index of ``variable`` in the optimizer's tracked variables; ValueError
    naming it when the optimizer does not track it."""
    lookup = _attr(optimizer, "_get_variable_index", "Optimizer")
    try:
        return lookup(variable)
    except KeyError:
        raise ValueError(
            f"The optimizer does not track variable "
            f"{getattr(variable, 'path', variable)!r}: it is not among the "
            "variables the optimizer was built with."
        ) from None


def tracked_variables(optimizer):
    """The trainable variables the optimizer was built with, in order."""
    return _attr(optimizer, "_trainable_variables", "Optimizer")


def overwrites_with_gradient(optimizer, variable):
    """Whether Keras assigns the gradient to ``variable`` (no optimizer
    update: `overwrite_with_gradient`, e.g. float8 scales)."""
    return _attr(optimizer, "_overwrite_variable_with_gradient",
                 "Optimizer")(variable)


def distribution_strategy(optimizer):
    """The tf.distribute strategy the TF optimizer was created under, or
    None (other backends)."""
    return getattr(optimizer, "_distribution_strategy", None)


def variable_layout(variable):
    """The `keras.distribution` layout of ``variable``, or None."""
    return getattr(variable, "_layout", None)


def maybe_merge_call(fn, strategy, *args):
    """TensorFlow's ``maybe_merge_call``, as Keras's TF optimizer uses it."""
    import tensorflow as tf  # only called on the TensorFlow backend

    try:
        merge = tf.__internal__.distribute.interim.maybe_merge_call
    except AttributeError:
        raise _missing("`tf.__internal__.distribute.interim.maybe_merge_call`"
                       f" (TensorFlow {tf.__version__})") from None
    return merge(fn, strategy, *args)


def jax_step_loop(model, step_function):
    """Keras's JAX `_make_function`: wraps ``step_function(state, data)``
    into the ``train_function(state, iterator)`` that `fit()` calls, one
    step per batch (a Python loop over `steps_per_execution`)."""
    return _attr(model, "_make_function", "JAXTrainer")(step_function)
