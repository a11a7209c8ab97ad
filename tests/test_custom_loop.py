"""`keras_ginger.fisher_loss` for custom training loops, and the per-backend
recipes of examples/custom_loop.py, against `with_fisher` + `fit` and a
NumPy reference of the sampled-label Fisher loss.

Run per backend, each in its own process:
    KERAS_BACKEND=torch .venv/bin/python -m pytest -q tests/test_custom_loop.py
"""

import os
import sys

import keras
import numpy as np
import pytest
from keras import ops

import keras_ginger
from keras_ginger import samplers
from keras_ginger.fisher_loss import SEED_STRIDE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import custom_loop  # noqa: E402

BACKEND = keras.backend.backend()


def np_(x):
    return np.asarray(ops.convert_to_numpy(x), dtype="float64")


def _data(n=128, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 64)).astype("float32")
    y = rng.integers(0, 10, size=n).astype("int32")
    return x, y


def _sampled_labels(logits, base, step, draw=0):
    """The labels of draw ``draw`` of step ``step``: the stream's definition,
    a `SeedGenerator` with state (base, SEED_STRIDE·step + draw)."""
    sg = keras.random.SeedGenerator(0)
    sg.state.assign(ops.convert_to_tensor(
        [base, SEED_STRIDE * step + draw], dtype=sg.state.dtype))
    sampled = samplers.CategoricalSampler(from_logits=True).sample(
        ops.convert_to_tensor(logits), sg)
    return np.asarray(ops.convert_to_numpy(sampled))


def _reference(logits, labels, weight=None):
    """Σᵢ √wᵢ ℓ(ŷᵢ, fᵢ) / √#(wᵢ > 0), float64, ℓ the cross-entropy."""
    logits = np.asarray(logits, "float64")
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) \
        + logits.max(-1)
    nll = lse - logits[np.arange(len(labels)), labels]
    w = np.ones(len(labels)) if weight is None else np.asarray(weight, "f8")
    return np.sum(np.sqrt(np.maximum(w, 0)) * nll) / np.sqrt(np.sum(w > 0))


def test_value_against_numpy_reference():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(12, 5)).astype("float32") * 3
    w = rng.uniform(0, 2, size=12).astype("float32")
    w[[2, 7]] = 0.0
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for step in (0, 3):
        labels = _sampled_labels(logits, 11, step)
        got = keras_ginger.fisher_loss(logits, loss, seed=11, step=step,
                                       sample_weight=w)
        np.testing.assert_allclose(float(np_(got)),
                                   _reference(logits, labels, w), rtol=2e-6)
    assert not np.array_equal(_sampled_labels(logits, 11, 0),
                              _sampled_labels(logits, 11, 3))


def test_two_outputs_loss_weights_and_independent_draws():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(16, 4)).astype("float32")
    b = rng.normal(size=(16, 4)).astype("float32")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    got = keras_ginger.fisher_loss({"a": a, "b": b}, {"a": loss, "b": loss},
                                   loss_weights={"a": 0.25, "b": 4.0},
                                   seed=3, step=2)
    # Output k draws the stream's k-th seed; its term is weighted by √λₖ.
    want = (0.5 * _reference(a, _sampled_labels(a, 3, 2, draw=0))
            + 2.0 * _reference(b, _sampled_labels(b, 3, 2, draw=1)))
    np.testing.assert_allclose(float(np_(got)), want, rtol=2e-6)


def test_compiled_model_as_loss_is_the_train_steps_loss():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
    model = keras_ginger.with_fisher(model, sampler=samplers.CategoricalSampler(
        from_logits=True))
    model.compile(optimizer=keras_ginger.Ginger(tau=2),
                  loss="sparse_categorical_crossentropy")
    logits = np.random.default_rng(3).normal(size=(8, 4)).astype("float32")
    # The compiled loss says from_logits=False; the model's sampler
    # (logits) is what the train step uses, so fisher_loss uses it too.
    got = keras_ginger.fisher_loss(logits, model, seed=5, step=1)
    want = _reference(logits, _sampled_labels(logits, 5, 1))
    by_loss = keras_ginger.fisher_loss(
        logits, "sparse_categorical_crossentropy", seed=5, step=1,
        sampler=samplers.CategoricalSampler(from_logits=True))
    np.testing.assert_allclose(float(np_(got)), want, rtol=2e-6)
    np.testing.assert_allclose(float(np_(by_loss)), want, rtol=2e-6)
    with pytest.raises(ValueError, match="loss_weights"):
        keras_ginger.fisher_loss(logits, model, seed=5, loss_weights=2.0)


def test_seed_generator_advances_and_bad_arguments():
    logits = np.random.default_rng(4).normal(size=(64, 6)).astype("float32")
    sg = keras.random.SeedGenerator(9)
    first = np_(keras_ginger.fisher_loss(logits, "mse", seed=sg))
    second = np_(keras_ginger.fisher_loss(logits, "mse", seed=sg))
    assert first != second  # fresh Gaussian samples from the stream
    with pytest.raises(ValueError, match="step"):
        keras_ginger.fisher_loss(logits, "mse", seed=sg, step=2)
    with pytest.raises(ValueError, match=r"seed=0\.5"):
        keras_ginger.fisher_loss(logits, "mse", seed=0.5)
    with pytest.raises(ValueError, match="loss=42"):
        keras_ginger.fisher_loss(logits, 42, seed=1)
    with pytest.raises(ValueError, match="3 loss weights for 2 losses"):
        keras_ginger.fisher_loss([logits, logits], ["mse", "mse"], seed=1,
                                 loss_weights=[1.0, 2.0, 3.0])


def _fit_reference(x, y, batch_size, epochs, tau):
    keras.utils.set_random_seed(0)
    model = keras_ginger.with_fisher(custom_loop.make_model(),
                                     seed=custom_loop.SEED)
    model.compile(optimizer=keras_ginger.Ginger(tau=tau),
                  loss=custom_loop.LOSS)
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False,
              verbose=0)
    return model


def test_recipe_matches_fit():
    """This backend's recipe ends at the weights (and curvature) of
    with_fisher + fit on the same batches and seed."""
    x, y = _data()
    fitted = _fit_reference(x, y, batch_size=32, epochs=2, tau=4)
    keras.utils.set_random_seed(0)
    model = custom_loop.make_model()
    opt = keras_ginger.Ginger(tau=4)
    start = [np_(w) for w in model.trainable_weights]
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)] * 2
    custom_loop.TRAIN[BACKEND](model, opt, batches)
    assert int(np_(opt.iterations)) == 8
    for w0, w, w_fit in zip(start, model.trainable_weights,
                            fitted.trainable_weights):
        moved = np.abs(np_(w_fit) - w0).max()
        assert moved > 1e-3
        assert np.abs(np_(w) - np_(w_fit)).max() <= 1e-5 * moved
    for v, v_fit in zip(opt.variables, fitted.optimizer.variables):
        np.testing.assert_allclose(np_(v), np_(v_fit), rtol=1e-4, atol=1e-6)
