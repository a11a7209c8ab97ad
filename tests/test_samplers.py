"""Tests of keras_ginger.samplers (pure keras.ops / keras.random).

Run each backend in its own process:
    KERAS_BACKEND=jax .venv/bin/python -m pytest -q tests/test_samplers.py

Distribution checks draw n samples and require every estimated moment to be
within 5 standard errors of its exact value (the standard error is the exact
one of the estimator: √(p(1-p)/n) for a frequency, σ/√n for a mean,
σ²√(2/n) for a Gaussian variance). Seeds are fixed, so runs are
deterministic.
"""

import numpy as np
import pytest

import keras
from keras import ops

from keras_ginger import samplers


def np_(x):
    return np.asarray(ops.convert_to_numpy(x))


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


N = 20000
LOGITS = np.array(
    [[2.0, 0.5, -1.0, 0.0, 1.0], [-3.0, 0.0, 0.2, 3.0, 0.1]], "float32"
)


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("sparse", [True, False])
def test_categorical_frequencies(from_logits, sparse):
    p = _softmax(LOGITS.astype("float64"))
    y_pred = LOGITS if from_logits else p.astype("float32")
    batch = np.repeat(y_pred[None], N, axis=0)  # (N, 2, 5): 2 "tokens"
    sampler = samplers.CategoricalSampler(from_logits=from_logits, sparse=sparse)
    seed = keras.random.SeedGenerator(1)
    y = np_(sampler.sample(ops.convert_to_tensor(batch), seed))
    if sparse:
        assert y.shape == (N, 2) and y.dtype.kind == "i"
        freq = np.stack([(y == c).mean(0) for c in range(5)], axis=-1)
    else:
        assert y.shape == (N, 2, 5)
        np.testing.assert_array_equal(y.sum(-1), 1.0)
        freq = y.mean(0)
    se = np.sqrt(p * (1 - p) / N)
    assert (np.abs(freq - p) < 5 * se + 1e-12).all(), (freq, p)


def test_categorical_other_axis():
    p = _softmax(LOGITS.astype("float64"))
    batch = np.repeat(LOGITS.T[None], N, axis=0)  # (N, 5, 2): classes on axis 1
    sampler = samplers.CategoricalSampler(from_logits=True, axis=1)
    y = np_(sampler.sample(ops.convert_to_tensor(batch), keras.random.SeedGenerator(2)))
    assert y.shape == (N, 2)
    freq = np.stack([(y == c).mean(0) for c in range(5)], axis=-1)
    assert (np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / N) + 1e-12).all()


@pytest.mark.parametrize("from_logits", [True, False])
def test_bernoulli_frequencies(from_logits):
    z = np.array([[-2.0, 0.0, 1.5]], "float32")
    p = 1.0 / (1.0 + np.exp(-z.astype("float64")))
    y_pred = z if from_logits else p.astype("float32")
    batch = np.repeat(y_pred, N, axis=0)
    sampler = samplers.BernoulliSampler(from_logits=from_logits)
    y = np_(sampler.sample(ops.convert_to_tensor(batch), keras.random.SeedGenerator(3)))
    assert set(np.unique(y)) <= {0.0, 1.0}
    freq = y.mean(0)
    assert (np.abs(freq - p[0]) < 5 * np.sqrt(p[0] * (1 - p[0]) / N)).all()


@pytest.mark.parametrize("dim", [1, 4])
def test_gaussian_mean_and_variance(dim):
    """MSE = mean over D outputs ⇒ the Gaussian has variance D/2."""
    f = np.linspace(-1.0, 1.0, dim).astype("float32")[None]
    batch = np.repeat(f, N, axis=0)
    sampler = samplers.GaussianSampler()
    y = np_(sampler.sample(ops.convert_to_tensor(batch), keras.random.SeedGenerator(4)))
    var = dim / 2.0
    assert (np.abs(y.mean(0) - f[0]) < 5 * np.sqrt(var / N)).all()
    assert (np.abs(y.var(0) - var) < 5 * var * np.sqrt(2.0 / N)).all()


def test_gaussian_loss_is_keras_mse():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(3, 4)).astype("float32")
    y = rng.normal(size=(3, 4)).astype("float32")
    np.testing.assert_allclose(
        np_(samplers.GaussianSampler().loss(y, f)),
        np_(keras.losses.mean_squared_error(y, f)),
        rtol=1e-6,
    )


def test_bernoulli_loss_is_sqrt_k_times_keras_bce():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(3, 4)).astype("float32")
    y = (rng.uniform(size=(3, 4)) < 0.5).astype("float32")
    np.testing.assert_allclose(
        np_(samplers.BernoulliSampler(from_logits=True).loss(y, z)),
        2.0 * np_(keras.losses.binary_crossentropy(y, z, from_logits=True)),
        rtol=1e-6,
    )


def test_seed_generator_advances_and_reproduces():
    sampler = samplers.CategoricalSampler(from_logits=True)
    logits = ops.convert_to_tensor(np.zeros((64, 10), "float32"))
    a = keras.random.SeedGenerator(7)
    b = keras.random.SeedGenerator(7)
    first, second = np_(sampler.sample(logits, a)), np_(sampler.sample(logits, a))
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(np_(sampler.sample(logits, b)), first)


def test_samples_carry_no_gradient_dependence_on_other_rows():
    """Changing one row of logits never changes the samples of other rows
    (the noise depends on the shape and seed only): masked tokens cannot
    influence the samples at unmasked ones."""
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(6, 5)).astype("float32")
    other = logits.copy()
    other[2] = rng.normal(size=5) * 10
    s = samplers.CategoricalSampler(from_logits=True)
    a = np_(s.sample(ops.convert_to_tensor(logits), keras.random.SeedGenerator(0)))
    b = np_(s.sample(ops.convert_to_tensor(other), keras.random.SeedGenerator(0)))
    np.testing.assert_array_equal(np.delete(a, 2), np.delete(b, 2))


# --------------------------------------------------------------------------
# Picking a sampler from the loss


def test_sampler_for_builtin_losses():
    pick = samplers.sampler_for_loss
    s = pick(keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                        ignore_class=0))
    assert isinstance(s, samplers.CategoricalSampler)
    assert s.sparse and s.from_logits and s.ignore_class == 0
    s = pick(keras.losses.CategoricalCrossentropy(label_smoothing=0.1))
    assert isinstance(s, samplers.CategoricalSampler)
    assert not s.sparse and not s.from_logits
    s = pick(keras.losses.BinaryCrossentropy(from_logits=True))
    assert isinstance(s, samplers.BernoulliSampler) and s.from_logits
    assert isinstance(pick(keras.losses.MeanSquaredError()), samplers.GaussianSampler)
    # String / function losses: compile() wraps them in a LossFunctionWrapper.
    from keras.src.losses.losses import LossFunctionWrapper

    for fn, cls in [
        (keras.losses.mean_squared_error, samplers.GaussianSampler),
        (keras.losses.sparse_categorical_crossentropy, samplers.CategoricalSampler),
        (keras.losses.categorical_crossentropy, samplers.CategoricalSampler),
        (keras.losses.binary_crossentropy, samplers.BernoulliSampler),
    ]:
        assert isinstance(pick(LossFunctionWrapper(fn)), cls)


def test_unknown_loss_error_says_how_to_pass_a_sampler():
    with pytest.raises(ValueError) as info:
        samplers.sampler_for_loss(keras.losses.MeanAbsoluteError(), "head")
    message = str(info.value)
    assert "sampler=" in message and "with_fisher" in message
    assert "'head'" in message and "dict" in message


def test_register_sampler_for_a_custom_loss():
    class MyLoss(keras.losses.Loss):
        def call(self, y_true, y_pred):
            return ops.mean(ops.abs(y_true - y_pred), axis=-1)

    marker = samplers.GaussianSampler()
    with pytest.raises(ValueError):
        samplers.sampler_for_loss(MyLoss())
    samplers.register_sampler(MyLoss, lambda loss: marker)
    try:
        assert samplers.sampler_for_loss(MyLoss()) is marker
    finally:
        samplers._REGISTRY.pop(0)


def test_callable_sampler_seed_argument():
    seen = {}

    def with_seed(y_pred, seed):
        seen["seed"] = seed
        return y_pred

    def without_seed(y_pred):
        seen["one_arg"] = True
        return y_pred

    gen = keras.random.SeedGenerator(0)
    x = ops.ones((2, 3))
    samplers.get(with_seed).sample(x, gen)
    samplers.get(without_seed).sample(x, gen)
    assert seen["seed"] is gen and seen["one_arg"]
    assert samplers.get(None) is None
    s = samplers.GaussianSampler()
    assert samplers.get(s) is s
    with pytest.raises(TypeError):
        samplers.get(3)


def test_ignore_class_masks_by_true_label():
    s = samplers.CategoricalSampler(from_logits=True, ignore_class=-1)
    mask = np_(s.valid_mask(np.array([[1, -1, 0]])))
    np.testing.assert_array_equal(mask, [[True, False, True]])
    assert samplers.CategoricalSampler().valid_mask(np.array([1])) is None


@pytest.mark.parametrize("from_logits", [True, False])
def test_categorical_never_draws_a_class_of_probability_zero(from_logits):
    """Inverse-CDF sampling over a wide class axis with empty classes at
    both ends and inside: those are never drawn, the others at their
    frequencies."""
    rng = np.random.default_rng(0)
    p = rng.uniform(0.5, 1.5, 40)
    p[[0, 7, 8, 39]] = 0.0
    p /= p.sum()
    y_pred = (np.where(p > 0, np.log(np.maximum(p, 1e-300)), -np.inf)
              if from_logits else p).astype("float32")
    batch = np.repeat(y_pred[None], N, axis=0)
    sampler = samplers.CategoricalSampler(from_logits=from_logits)
    y = np_(sampler.sample(ops.convert_to_tensor(batch),
                           keras.random.SeedGenerator(3)))
    assert y.shape == (N,)
    freq = np.bincount(y, minlength=40) / N
    assert (freq[p == 0] == 0).all(), freq
    assert (np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / N) + 1e-12).all()


def test_categorical_class_count_known_only_at_run_time():
    """A TF graph whose class axis has no static size (the sampler's other
    branch): the same frequencies."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("a graph with an unknown class axis is TensorFlow's")
    import tensorflow as tf

    sampler = samplers.CategoricalSampler(from_logits=True)
    seed = keras.random.SeedGenerator(4)
    draw = tf.function(lambda x: sampler.sample(x, seed), input_signature=[
        tf.TensorSpec((None, None), tf.float32)])
    y = np_(draw(np.repeat(LOGITS[:1], N, axis=0)))
    p = _softmax(LOGITS[0].astype("float64"))
    freq = np.bincount(y, minlength=5) / N
    assert (np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / N)).all(), freq
