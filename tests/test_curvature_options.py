"""Variable selection, curvature_interval and the non-finite report."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_ginger
from tests.reference import PAPER, DenseGinger, rel_err
from tests.test_optimizer import drive, f32


def test_excluded_variable_steps_with_momentum_over_damping():
    rng = np.random.default_rng(0)
    emb = keras.Variable(np.zeros((6, 4), np.float32), name="embeddings")
    ker = keras.Variable(np.zeros(5, np.float32), name="kernel")
    opt = keras_ginger.Ginger(learning_rate=1.0, tau=3, damping=0.1,
                              exclude_from_curvature=["embed"], **PAPER)
    ref = DenseGinger(5, 3, 0.9, 0.99, 0.1)
    m = np.zeros(24)
    for t in range(1, 6):
        ge, gk = f32(rng.standard_normal((6, 4))), f32(rng.standard_normal(5))
        dk = f32(rng.standard_normal(5))
        emb.assign(np.zeros((6, 4), np.float32))
        ker.assign(np.zeros(5, np.float32))
        opt.apply([ge, gk], [emb, ker], fisher_grads=[ge, dk])
        m = 0.9 * m + 0.1 * ge.ravel()
        want = m / (1 - 0.9**t) / 0.1
        assert rel_err(-ops.convert_to_numpy(emb), want) <= 1e-6
        assert rel_err(-ops.convert_to_numpy(ker), ref.step(gk, dk)) <= 1e-5
    assert not opt.uses_curvature(emb) and opt.uses_curvature(ker)
    with pytest.raises(ValueError, match="identity preconditioner"):
        opt.get_curvature(emb)
    # Only momentum for the excluded variable: (τ+1)·n + k for the other.
    sizes = sorted(int(np.prod(v.shape)) for v in opt.variables
                   if "embeddings" in v.path)
    assert sizes == [24]


def test_max_curvature_size():
    big = keras.Variable(np.zeros(100, np.float32))
    small = keras.Variable(np.zeros(10, np.float32))
    opt = keras_ginger.Ginger(tau=2, max_curvature_size=50)
    opt.build([big, small])
    assert not opt.uses_curvature(big) and opt.uses_curvature(small)
    U, s = opt.get_curvature(small)
    assert tuple(U.shape) == (10, 2)


def test_curvature_interval_matches_reference():
    rng = np.random.default_rng(1)
    n, interval, steps = 30, 3, 10
    var = keras.Variable(np.zeros(n, np.float32))
    opt = keras_ginger.Ginger(learning_rate=1.0, tau=4, damping=1e-2,
                              curvature_interval=interval, **PAPER)
    ref = DenseGinger(n, 4, 0.9, 0.99, 1e-2)
    gs = [f32(rng.standard_normal(n)) for _ in range(steps)]
    ds = [f32(rng.standard_normal(n)) for _ in range(steps)]
    due = []
    for t, (g, d) in enumerate(zip(gs, ds)):
        if opt.built:
            due.append(bool(ops.convert_to_numpy(opt.fisher_due())))
        (got,) = drive(opt, var, [g], [d])
        if t % interval == 0:
            want = ref.step(g, d)
        else:  # momentum moves, the curvature stays
            ref.t += 1
            ref.m = 0.9 * ref.m + 0.1 * g
            m_hat = ref.m / (1 - 0.9**ref.t)
            want = np.linalg.solve(1e-2 * np.eye(n) + ref.M, m_hat)
        assert rel_err(got, want) <= 1e-5, t
    assert due == [t % interval == 0 for t in range(1, steps)]


def test_nonfinite_report_names_variable_and_step():
    a = keras.Variable(np.zeros(4, np.float32), name="alpha")
    b = keras.Variable(np.zeros(3, np.float32), name="beta")
    opt = keras_ginger.Ginger(tau=2)
    ok = [np.ones(4, np.float32), np.ones(3, np.float32)]
    opt.apply(ok, [a, b], fisher_grads=ok)
    assert opt.nonfinite_report() is None
    bad = np.array([1.0, np.nan, 1.0], np.float32)
    opt.apply(ok, [a, b], fisher_grads=[ok[0], bad])
    opt.apply(ok, [a, b], fisher_grads=ok)
    report = opt.nonfinite_report()
    assert "'beta'" in report and "step 2" in report


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"max_curvature_size": 0}, "max_curvature_size=0"),
        ({"curvature_interval": 0}, "curvature_interval=0"),
        ({"curvature_interval": None}, "curvature_interval=None"),
        ({"exclude_from_curvature": [3]}, "exclude_from_curvature"),
    ],
)
def test_invalid_options(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        keras_ginger.Ginger(**kwargs)


def test_options_round_trip_config():
    opt = keras_ginger.Ginger(exclude_from_curvature=["bias"],
                              max_curvature_size=1000, curvature_interval=5)
    clone = keras_ginger.Ginger.from_config(opt.get_config())
    assert clone.exclude_from_curvature == ["bias"]
    assert clone.max_curvature_size == 1000 and clone.curvature_interval == 5


def test_curvature_interval_in_the_fisher_train_step():
    """Off-interval steps leave (U, σ) alone; due steps take the sampled d."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(12)
    x = rng.standard_normal((32, 6)).astype("float32")
    y = rng.integers(0, 3, 32)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    keras_ginger.with_fisher(model)
    opt = keras_ginger.Ginger(learning_rate=0.1, tau=2, curvature_interval=2)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    sigmas = []
    for _ in range(4):
        model.train_on_batch(x, y)
        sigmas.append(ops.convert_to_numpy(
            opt.get_curvature(model.trainable_variables[0])[1]).copy())
    assert sigmas[0][0] > 0  # rank one after the first d
    np.testing.assert_array_equal(sigmas[1], sigmas[0])  # step 2: off
    assert not np.allclose(sigmas[2], sigmas[1])  # step 3: due
    np.testing.assert_array_equal(sigmas[3], sigmas[2])


def test_invalid_fisher_grads_leave_accumulators_untouched():
    a = keras.Variable(np.zeros(4, np.float32))
    b = keras.Variable(np.zeros((2, 3), np.float32))
    opt = keras_ginger.Ginger(tau=2, gradient_accumulation_steps=2)
    g = [np.ones(4, np.float32), np.ones((2, 3), np.float32)]
    opt.apply(g, [a, b], fisher_grads=g)
    before = [ops.convert_to_numpy(v).copy() for v in opt.variables]
    with pytest.raises(ValueError, match=r"fisher_grads\[1\]"):
        opt.apply(g, [a, b], fisher_grads=[g[0], np.ones((3, 2), np.float32)])
    for x, v in zip(before, opt.variables):
        np.testing.assert_array_equal(x, ops.convert_to_numpy(v))
