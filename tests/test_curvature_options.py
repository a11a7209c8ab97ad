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


def _interval_model(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((6, 6, 1)),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ])
    return keras_ginger.with_fisher(model)


def _interval_data():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((48, 6, 6, 1)).astype("float32")
    return x, rng.integers(0, 3, 48)


def _counting_fisher_loss(model):
    """Wrap the model's Fisher loss to count its calls: Python calls (JAX:
    traces under jit; torch: steps), and on TensorFlow also its runs in
    the graph (a variable incremented beside it)."""
    calls = []
    runs = keras.Variable(0.0, trainable=False, name="fisher_runs")
    inner = model._fisher_loss

    def counted(*args):
        calls.append(1)
        if keras.backend.backend() == "tensorflow":
            runs.assign_add(1.0)
        return inner(*args)

    model._fisher_loss = counted
    return calls, runs


@pytest.mark.parametrize("accumulation", [None, 2])
def test_fisher_pass_only_on_due_steps(accumulation):
    """With curvature_interval=3, `fit()` draws Fisher labels only for the
    steps that take d: on JAX two compiled steps picked on the host (the
    one without d never traces the Fisher loss), on torch a Python branch
    per step; and the run is the one where every step takes d in the graph
    and the optimizer ignores it off the interval (JAX's in-graph
    `lax.cond` fallback; on every backend the optimizer's own count)."""
    x, y = _interval_data()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def run(dispatch):
        model = _interval_model()
        opt = keras_ginger.Ginger(learning_rate=0.05, tau=2,
                                  curvature="auto", curvature_interval=3,
                                  gradient_accumulation_steps=accumulation)
        model.compile(optimizer=opt, loss=loss)
        if not dispatch:
            model._dispatch_fisher_on_host = lambda: False
        calls, runs = _counting_fisher_loss(model)
        traces, step = [], model.train_step
        model.train_step = lambda *a: traces.append(1) or step(*a)
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        return model, opt, calls, runs, traces

    model, opt, calls, runs, traces = run(dispatch=True)
    micro = 6
    updates = micro // (accumulation or 1)
    due_micro = sum(1 for s in range(micro)
                    if (s // (accumulation or 1)) % 3 == 0)
    assert int(ops.convert_to_numpy(opt.iterations)) == updates
    backend = keras.backend.backend()
    if backend == "jax":
        assert len(traces) == 2  # the steps with and without d
        assert len(calls) == 1  # traced once, in the step with d
    elif backend == "torch":
        assert len(calls) == due_micro
    else:  # TensorFlow: the sampling under tf.cond, run when due
        assert float(ops.convert_to_numpy(runs)) == due_micro
    if backend == "jax":
        reference, ref_opt, ref_calls, _, ref_traces = run(dispatch=False)
        assert len(ref_calls) == len(ref_traces) == 1
        for a, b in zip(model.trainable_variables,
                        reference.trainable_variables):
            np.testing.assert_allclose(ops.convert_to_numpy(a),
                                       ops.convert_to_numpy(b),
                                       rtol=1e-5, atol=1e-6)
        # The curvature as matrices (eigenvectors of close eigenvalues
        # rotate with round-off; U diag(σ) Uᵀ does not).
        for var, ref_var in zip(model.trainable_variables,
                                reference.trainable_variables):
            if opt.block_kind(var) == "identity":
                continue
            for (side, U, s), (_, rU, rs) in zip(
                    opt.curvature_factors(var),
                    ref_opt.curvature_factors(ref_var)):
                U, s, rU, rs = (ops.convert_to_numpy(a).astype("float64")
                                for a in (U, s, rU, rs))
                assert rel_err((U * s) @ U.T, (rU * rs) @ rU.T) <= 1e-5, side
    # The curvature took d exactly on the due updates: σ moved from 0.
    kernel = model.layers[0].kernel
    (_, U, sigma), _ = opt.curvature_factors(kernel)
    assert float(ops.convert_to_numpy(sigma)[0]) > 0
