"""Restoring a training run from a weights file, optimizer state included.

`keras.models.load_model` restores Ginger with its state for ordinary Keras
models. KerasHub tasks (e.g. `T5Seq2SeqLM`) are different: their custom
`compile` is not re-run on load, so Keras skips the optimizer's variables
(it warns) and `iterations` starts again at 0. The weights-file recipe does
restore everything: build the model, compile it with the same optimizer,
build the optimizer, then `load_weights`. `load_training_state` is that
recipe in one call.
"""

__all__ = ["load_training_state"]


def load_training_state(model, filepath):
    """Loads weights *and* optimizer state saved by ``model.save_weights``.

    ``model`` must be built (or buildable from its inputs) and compiled with
    an optimizer of the same configuration as the one that was saved (e.g.
    ``Ginger(tau=8)``). The optimizer is built on the model's trainable
    variables first, because `load_weights` only restores optimizer state
    into a built optimizer. Works for any Keras model, KerasHub tasks
    included; after `with_fisher`, pass the training seed again
    (``with_fisher(model, seed=...)``) to resume the sampling exactly.

    Args:
        model: a compiled `keras.Model`.
        filepath: a ``.weights.h5`` file written by ``model.save_weights``.

    Returns:
        ``model``.
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        raise ValueError(
            "load_training_state needs a compiled model (its optimizer "
            f"receives the saved state). Received: {model.name!r}, "
            "not compiled.")
    if not model.built or not model.trainable_variables:
        raise ValueError(
            f"load_training_state needs a built model: call {model.name!r} "
            "on a batch (or `model.build(...)`) first.")
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    model.load_weights(filepath)
    return model
