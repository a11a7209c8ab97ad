"""`with_fisher`: give an existing model the sampled-label Fisher train step.

The instance's class is swapped for a subclass of (`FisherTrainStep`, its
class) that serializes as the original. The train step itself is in
`keras_ginger.trainers` (per backend) and `keras_ginger.train_step`.
"""

import types

import keras

from keras_ginger import _keras_compat
from keras_ginger import samplers
from keras_ginger.train_step import ensure_seed_generator
from keras_ginger.trainers import FisherTrainStep

__all__ = ["with_fisher"]

_FISHER_CLASSES = {}


def _fisher_class(cls):
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
    _keras_compat.register_like(new, cls)
    _FISHER_CLASSES[cls] = new
    return new


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
        samplers.get(sampler)  # validates: callable
    model.__class__ = _fisher_class(type(model))
    object.__setattr__(model, "_fisher_sampler_spec", sampler)
    object.__setattr__(model, "_fisher_cache", None)
    ensure_seed_generator(model, seed)
    # Rebuild the train function so it uses the new train step.
    model.train_function = None
    return model
