"""Ginger against a dense float64 NumPy reference of Algorithm 1."""

import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_ginger
from keras_ginger import curvature
from tests.reference import PAPER, DenseGinger, rel_err, separated_stream

HERE = os.path.dirname(os.path.abspath(__file__))


def dtype_of(x):
    return keras.backend.standardize_dtype(x.dtype)


def f32(x):
    return np.asarray(x, np.float32)


def compiled(fn, xla=False):
    """``fn`` compiled as Keras's trainers compile a step: `jax.jit`,
    `tf.function` (eager TF's kernels; XLA with ``xla``); torch eager."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(fn)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=xla)
    return fn


# test_blocked.py sets this: its walk over U runs its loops eagerly (slowly)
# otherwise.
COMPILE_DRIVE = False


def drive(opt, var, gs, ds, lr=1.0, compile=False):
    """Apply (g, d) pairs; return the steps, each as a float64 array.

    The variable is reset to 0 before each update, so that after it the
    variable holds exactly -lr * step in float32. ``compile``: each update
    jitted (JAX: `stateless_apply` under `jax.jit`; TensorFlow: `apply` in
    a `tf.function`); torch stays eager.
    """
    compile = compile or COMPILE_DRIVE
    if compile and keras.backend.backend() == "jax":
        return _drive_jit(opt, var, gs, ds, lr)

    def update(g, fisher):
        var.assign(ops.zeros(var.shape, "float32"))
        opt.apply([g], [var], fisher_grads=fisher)

    if compile and keras.backend.backend() == "tensorflow":
        opt.build([var])
        update = compiled(update)
    steps = []
    for g, d in zip(gs, ds):
        fisher = None if d is None else [f32(d).reshape(var.shape)]
        update(f32(g).reshape(var.shape), fisher)
        steps.append(-np.asarray(ops.convert_to_numpy(var), np.float64) / lr)
    return steps


def _drive_jit(opt, var, gs, ds, lr):
    """`drive` through a jitted `stateless_apply` (JAX): an eager JAX loop
    compiles closure-bodied loops and conds anew at every update."""
    import jax

    opt.build([var])

    @jax.jit
    def update(opt_vars, g, d):
        zero = ops.zeros(var.shape)
        (value,), opt_vars = opt.stateless_apply(opt_vars, [g], [zero],
                                                 fisher_grads=[d])
        return value, opt_vars

    opt_vars = [v.value for v in opt.variables]
    steps = []
    for g, d in zip(gs, ds):
        value, opt_vars = update(opt_vars, f32(g).reshape(var.shape),
                                 f32(d).reshape(var.shape))
        steps.append(-np.asarray(value, np.float64).ravel() / lr)
    for v, value in zip(opt.variables, opt_vars):
        v.assign(value)
    return steps


def dense_curvature(opt, var):
    U, s = opt.get_curvature(var)
    U = np.asarray(ops.convert_to_numpy(U), np.float64)
    s = np.asarray(ops.convert_to_numpy(s), np.float64)
    return (U * s) @ U.T, U, s


@pytest.mark.parametrize("damping", [1e-1, 1e-8])
def test_exact_state_matches_dense_solve(damping):
    """τ ≥ steps: nothing is truncated and the step is the dense solve."""
    rng = np.random.default_rng(0)
    n, tau, steps = 1000, 12, 10
    gs = [f32(rng.standard_normal(n)) for _ in range(steps)]
    ds = [f32(rng.standard_normal(n)) for _ in range(steps)]
    ref = DenseGinger(n, tau, 0.9, 0.99, damping)
    var = keras.Variable(np.zeros(n, np.float32))
    opt = keras_ginger.Ginger(learning_rate=1.0, tau=tau, damping=damping,
                              **PAPER)
    for got, g, d in zip(drive(opt, var, gs, ds), gs, ds):
        assert rel_err(got, ref.step(g, d)) <= 1e-5
    M, U, _ = dense_curvature(opt, var)
    assert rel_err(M, ref.M) <= 1e-5


@pytest.mark.parametrize("damping", [1e-1, 1e-4, 1e-8])
def test_truncated_matches_reference_over_200_steps(damping):
    rng = np.random.default_rng(1)
    n, tau, steps = 120, 6, 200
    ds = [f32(d) for d in separated_stream(rng, n, tau, steps)]
    gs = [f32(rng.standard_normal(n)) for _ in range(steps)]
    ref = DenseGinger(n, tau, 0.9, 0.99, damping)
    var = keras.Variable(np.zeros((12, 10), np.float32))
    opt = keras_ginger.Ginger(learning_rate=1.0, tau=tau, damping=damping,
                              **PAPER)
    worst = 0.0
    for got, g, d in zip(drive(opt, var, gs, ds), gs, ds):
        worst = max(worst, rel_err(got, ref.step(g, d)))
    assert worst <= 1e-4
    M, U, s = dense_curvature(opt, var)
    assert rel_err(M, ref.M) <= 1e-4
    assert np.all(np.diff(s) <= 0) and np.all(s >= 0)
    assert np.linalg.norm(U.T @ U - np.eye(tau)) <= 1e-4


@pytest.mark.parametrize("shape", [(), (3,), (2, 4)])
def test_variables_smaller_than_tau(shape):
    """n ≤ τ: k = n, complete basis, the step is the dense solve."""
    rng = np.random.default_rng(2)
    n = int(np.prod(shape))
    steps = 30
    gs = [f32(rng.standard_normal(n)) for _ in range(steps)]
    ds = [f32(rng.uniform(0.5, 1.5, n) * rng.standard_normal(n))
          for _ in range(steps)]
    for damping in (1e-1, 1e-6):
        ref = DenseGinger(n, 8, 0.9, 0.99, damping)
        var = keras.Variable(np.zeros(shape, np.float32))
        opt = keras_ginger.Ginger(learning_rate=1.0, tau=8, damping=damping,
                                  **PAPER)
        # The first steps are rank-deficient (1/γ directions); compare later.
        got = drive(opt, var, gs, ds)
        for t, (g, d) in enumerate(zip(gs, ds)):
            want = ref.step(g, d)
            if t >= n + 5:
                assert rel_err(got[t], want) <= 1e-4, (damping, t)
        U, s = opt.get_curvature(var)
        assert tuple(U.shape) == (n, n) and tuple(s.shape) == (n,)


def test_zero_fisher_gradient_decays_curvature():
    rng = np.random.default_rng(3)
    n = 50
    ds = [f32(rng.standard_normal(n)) for _ in range(4)] + [np.zeros(n, np.float32)] * 3
    gs = [f32(rng.standard_normal(n)) for _ in ds]
    ref = DenseGinger(n, 8, 0.9, 0.95, 1e-3)
    var = keras.Variable(np.zeros(n, np.float32))
    opt = keras_ginger.Ginger(learning_rate=1.0, tau=8, beta_2=0.95,
                              damping=1e-3, **PAPER)
    for got, g, d in zip(drive(opt, var, gs, ds), gs, ds):
        assert rel_err(got, ref.step(g, d)) <= 1e-5
    M, U, s = dense_curvature(opt, var)
    assert rel_err(M, ref.M) <= 1e-5
    assert np.count_nonzero(s) == 4  # no direction was invented


def test_fisher_gradient_in_span_adds_no_column():
    rng = np.random.default_rng(4)
    n, tau = 40, 6
    basis = np.linalg.qr(rng.standard_normal((n, 3)))[0]
    ds = [f32(basis @ rng.standard_normal(3)) for _ in range(25)]
    gs = [f32(rng.standard_normal(n)) for _ in ds]
    ref = DenseGinger(n, tau, 0.9, 0.99, 1e-2)
    var = keras.Variable(np.zeros(n, np.float32))
    opt = keras_ginger.Ginger(learning_rate=1.0, tau=tau, damping=1e-2,
                              **PAPER)
    for got, g, d in zip(drive(opt, var, gs, ds), gs, ds):
        assert rel_err(got, ref.step(g, d)) <= 1e-5
    M, U, s = dense_curvature(opt, var)
    assert rel_err(M, ref.M) <= 1e-5
    # Every column stays a unit vector; no zero column was kept.
    np.testing.assert_allclose(np.linalg.norm(U, axis=0), 1.0, atol=1e-5)
    assert np.linalg.norm(U.T @ U - np.eye(tau)) <= 1e-4
    assert np.count_nonzero(s) == 3


def test_non_finite_fisher_gradient_leaves_curvature_unchanged():
    rng = np.random.default_rng(5)
    n = 30
    var = keras.Variable(np.zeros(n, np.float32))
    opt = keras_ginger.Ginger(learning_rate=1.0, tau=4, damping=1e-2,
                              **PAPER)
    ref = DenseGinger(n, 4, 0.9, 0.99, 1e-2)
    for _ in range(5):
        g, d = f32(rng.standard_normal(n)), f32(rng.standard_normal(n))
        drive(opt, var, [g], [d])
        ref.step(g, d)
    U0, s0 = [ops.convert_to_numpy(x) for x in opt.get_curvature(var)]
    g = f32(rng.standard_normal(n))
    d = f32(rng.standard_normal(n))
    d[3] = np.inf
    d[7] = np.nan
    (got,) = drive(opt, var, [g], [d])
    U1, s1 = [ops.convert_to_numpy(x) for x in opt.get_curvature(var)]
    np.testing.assert_allclose(U1 @ np.diag(s1) @ U1.T, U0 @ np.diag(s0) @ U0.T,
                               rtol=0, atol=1e-6 * s0.max())
    assert np.all(np.isfinite(U1)) and np.all(np.isfinite(s1))
    # θ still steps with the momentum and the previous curvature.
    ref.m = 0.9 * ref.m + 0.1 * g
    m_hat = ref.m / (1 - 0.9**6)
    want = np.linalg.solve(1e-2 * np.eye(n) + ref.M, m_hat)
    assert rel_err(got, want) <= 1e-5


def test_non_finite_gradient_skips_that_variable():
    rng = np.random.default_rng(6)
    a = keras.Variable(np.ones(10, np.float32))
    b = keras.Variable(np.ones(5, np.float32))
    opt = keras_ginger.Ginger(learning_rate=0.1, tau=3)
    opt.apply([f32(rng.standard_normal(10)), f32(rng.standard_normal(5))],
              [a, b], fisher_grads=[f32(rng.standard_normal(10)),
                                    f32(rng.standard_normal(5))])
    a0, b0 = ops.convert_to_numpy(a).copy(), ops.convert_to_numpy(b).copy()
    m0 = ops.convert_to_numpy(opt._momentums[0]).copy()
    bad = f32(rng.standard_normal(10))
    bad[0] = np.nan
    opt.apply([bad, f32(rng.standard_normal(5))], [a, b],
              fisher_grads=[bad, f32(rng.standard_normal(5))])
    np.testing.assert_array_equal(ops.convert_to_numpy(a), a0)
    np.testing.assert_array_equal(ops.convert_to_numpy(opt._momentums[0]), m0)
    for state in opt.get_curvature(a):
        assert np.all(np.isfinite(ops.convert_to_numpy(state)))
    assert not np.allclose(ops.convert_to_numpy(b), b0)  # b still trains


def test_orthonormality_over_2000_float32_steps():
    rng = np.random.default_rng(7)
    n, k = 500, 8
    mix = rng.standard_normal((n, n)) / np.sqrt(n)
    U = ops.convert_to_tensor(curvature.initial_basis(n, k))
    s = ops.zeros((k,))
    update = compiled(
        lambda U, s, d: curvature.ginger_update(U, s, d, d, 0.99, 1e-3)[:2])
    for t in range(2000):
        x = rng.standard_normal(n)
        d = ops.convert_to_tensor(f32(mix @ x if t % 3 else x))
        U, s = update(U, s, d)
    U = np.asarray(ops.convert_to_numpy(U), np.float64)
    assert np.linalg.norm(U.T @ U - np.eye(k)) <= 1e-4


def test_large_embedding_is_never_densified():
    """32,000×512: state is (n, k) and the first step has its closed form."""
    rng = np.random.default_rng(8)
    shape = (32000, 512)
    n = shape[0] * shape[1]
    var = keras.Variable(np.zeros(shape, np.float32))
    opt = keras_ginger.Ginger(learning_rate=1.0, tau=2, beta_1=0.0,
                              damping=0.5, **PAPER)
    g = f32(rng.standard_normal(shape) * 1e-2)
    d = f32(rng.standard_normal(shape) * 1e-2)
    opt.apply([g], [var], fisher_grads=[d])
    U, s = opt.get_curvature(var)
    assert tuple(U.shape) == (n, 2) and dtype_of(U) == "float32"
    # (γI + a d dᵀ)⁻¹ g = g/γ - a d (dᵀg) / (γ (γ + a‖d‖²)),  a = 1 - β₂.
    g64, d64 = g.ravel().astype(np.float64), d.ravel().astype(np.float64)
    a = 0.01
    want = g64 / 0.5 - a * d64 * (d64 @ g64) / (0.5 * (0.5 + a * d64 @ d64))
    got = -np.asarray(ops.convert_to_numpy(var), np.float64).ravel()
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_variables_keep_float32_state(dtype):
    rng = np.random.default_rng(9)
    var = keras.Variable(np.zeros((4, 6)), dtype=dtype)
    opt = keras_ginger.Ginger(learning_rate=0.01, tau=3)
    for _ in range(3):
        g = ops.cast(rng.standard_normal((4, 6)), dtype)
        opt.apply([g], [var], fisher_grads=[g])
    U, s = opt.get_curvature(var)
    assert dtype_of(U) == "float32" and dtype_of(s) == "float32"
    assert dtype_of(opt._momentums[0]) == "float32"
    assert dtype_of(var) == dtype
    assert np.all(np.isfinite(ops.convert_to_numpy(ops.cast(var, "float32"))))
    assert float(ops.max(ops.abs(ops.cast(var, "float32")))) > 0


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"tau": 0}, "tau=0"),
        ({"tau": 2.5}, "tau=2.5"),
        ({"tau": True}, "tau=True"),
        ({"beta_1": 1.0}, "beta_1=1.0"),
        ({"beta_2": -0.1}, "beta_2=-0.1"),
        ({"damping": 0.0}, "damping=0.0"),
        ({"damping": -1e-3}, "damping=-0.001"),
        ({"damping": float("nan")}, "damping=nan"),
        ({"shard_state": "yes"}, "shard_state='yes'"),
    ],
)
def test_invalid_hyperparameters(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        keras_ginger.Ginger(**kwargs)


def test_invalid_fisher_grads_leave_state_untouched():
    var = keras.Variable(np.zeros((3, 2), np.float32))
    opt = keras_ginger.Ginger(tau=2)
    g = np.ones((3, 2), np.float32)
    opt.apply([g], [var], fisher_grads=[g])
    before = [ops.convert_to_numpy(v).copy() for v in opt.variables]
    with pytest.raises(ValueError, match="fisher_grads"):
        opt.apply([g], [var], fisher_grads=[g, g])
    with pytest.raises(ValueError, match=r"fisher_grads\[0\].*\(2, 3\)"):
        opt.apply([g], [var], fisher_grads=[np.ones((2, 3), np.float32)])
    after = [ops.convert_to_numpy(v) for v in opt.variables]
    for x, y in zip(before, after):
        np.testing.assert_array_equal(x, y)


def test_bad_fisher_grads_and_untracked_variable_errors_name_the_problem():
    var = keras.Variable(np.zeros(3, np.float32), name="tracked")
    opt = keras_ginger.Ginger(tau=2)
    g = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="must be a list"):
        opt.apply([g], [var], fisher_grads=g)
    opt.apply([g], [var], fisher_grads=[g])
    other = keras.Variable(np.zeros(3, np.float32), name="stranger")
    with pytest.raises(ValueError, match="stranger"):
        opt.get_curvature(other)


def test_empirical_fisher_warning_points_at_the_user_line():
    """The one-time warning names the line that called fit(), not a file
    inside Keras."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras_ginger.Ginger(tau=2), loss="mse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(np.ones((4, 3)), np.zeros((4, 2)), verbose=0)
    (w,) = [w for w in caught if "empirical Fisher" in str(w.message)]
    assert os.path.abspath(w.filename) == os.path.abspath(__file__)


def test_empirical_fisher_warns_once():
    var = keras.Variable(np.zeros(3, np.float32))
    opt = keras_ginger.Ginger(tau=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.apply([np.ones(3, np.float32)], [var])
        opt.apply([np.ones(3, np.float32)], [var])
    msgs = [str(w.message) for w in caught if "with_fisher" in str(w.message)]
    assert len(msgs) == 1


def test_apply_gradients_and_fisher_equal_apply():
    rng = np.random.default_rng(10)
    g = f32(rng.standard_normal(7))
    d = f32(rng.standard_normal(7))
    a = keras.Variable(np.zeros(7, np.float32))
    b = keras.Variable(np.zeros(7, np.float32))
    oa = keras_ginger.Ginger(tau=3)
    ob = keras_ginger.Ginger(tau=3)
    oa.apply([g], [a], fisher_grads=[d])
    ob.apply_gradients([(g, b)], fisher_grads=[d])
    np.testing.assert_array_equal(ops.convert_to_numpy(a),
                                  ops.convert_to_numpy(b))


@pytest.mark.skipif(keras.backend.backend() == "tensorflow",
                    reason="Keras has no stateless_apply on TensorFlow")
def test_stateless_apply_matches_apply():
    rng = np.random.default_rng(11)
    g = f32(rng.standard_normal((3, 4)))
    d = f32(rng.standard_normal((3, 4)))
    a = keras.Variable(np.ones((3, 4), np.float32))
    opt = keras_ginger.Ginger(tau=3)
    opt.build([a])
    opt_vars = [v.value for v in opt.variables]
    (new_a,), new_opt = opt.stateless_apply(opt_vars, [g], [a.value],
                                            fisher_grads=[d])
    ref_var = keras.Variable(np.ones((3, 4), np.float32))
    ref = keras_ginger.Ginger(tau=3)
    ref.apply([g], [ref_var], fisher_grads=[d])
    np.testing.assert_allclose(ops.convert_to_numpy(new_a),
                               ops.convert_to_numpy(ref_var), rtol=1e-6)
    for x, y in zip(new_opt, ref.variables):
        np.testing.assert_allclose(ops.convert_to_numpy(x),
                                   ops.convert_to_numpy(y), rtol=1e-6,
                                   atol=1e-7)
    np.testing.assert_array_equal(ops.convert_to_numpy(a), 1.0)


def test_config_round_trip():
    opt = keras_ginger.Ginger(learning_rate=0.02, tau=5, beta_1=0.8,
                              beta_2=0.95, damping=3e-3, clipnorm=1.0,
                              weight_decay=1e-4, shard_state=True)
    config = opt.get_config()
    assert config["shard_state"] is True
    assert {k: config[k] for k in ("tau", "beta_1", "beta_2", "damping")} == {
        "tau": 5, "beta_1": 0.8, "beta_2": 0.95, "damping": 3e-3}
    clone = keras_ginger.Ginger.from_config(config)
    assert clone.get_config() == config
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(again, keras_ginger.Ginger)
    assert again.get_config() == config


@pytest.mark.parametrize("written_by", ["0.1.0", "before_metric"])
def test_old_configs_load_with_the_step_they_were_written_with(written_by):
    """A config without `graft` (0.1.0) is the paper's step, one without
    `metric` the Euclidean one, not today's default; the state it was saved
    with then matches the variables the loaded optimizer builds."""
    old = keras_ginger.Ginger(tau=3, damping=1e-2, **(
        PAPER if written_by == "0.1.0" else dict(metric=None)))
    config = old.get_config()
    dropped = ["metric"]
    if written_by == "0.1.0":
        dropped += ["graft", "relative_damping", "graft_beta_2",
                    "graft_epsilon"]
    for key in dropped:
        del config[key]
    loaded = keras.optimizers.deserialize(
        {"class_name": "Ginger", "module": "keras_ginger",
         "config": config, "registered_name": keras.saving.get_registered_name(
             keras_ginger.Ginger)})
    assert isinstance(loaded, keras_ginger.Ginger)
    for key in ("graft", "relative_damping", "metric"):
        assert getattr(loaded, key) == getattr(old, key), key
    var = keras.Variable(np.zeros((4, 3), np.float32))
    old.build([var])
    loaded.build([var])
    assert [tuple(v.shape) for v in loaded.variables] == \
        [tuple(v.shape) for v in old.variables]


def _digits(n=256):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return (X[:n] / 16).astype("float32"), y[:n]


def _mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(16, activation="tanh"),
        keras.layers.Dense(10),
    ])


def _compile(model, jit=False):
    model.compile(
        optimizer=keras_ginger.Ginger(learning_rate=0.05, tau=4,
                                      damping=1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )


@pytest.mark.parametrize("jit", [False, True])
def test_fit_trains_a_small_model(jit):
    if jit and keras.backend.backend() == "torch":
        # torch.compile of this fit takes ~70 s on 2 CPU cores; fit under
        # torch.compile is run by test_fisher.py::test_fit_modes_and_seed_
        # advances[1-True].
        pytest.skip("torch.compile covered in test_fisher.py")
    X, y = _digits()
    model = _mlp()
    _compile(model, jit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hist = model.fit(X, y, epochs=4, batch_size=64, verbose=0,
                         shuffle=False)
    losses = hist.history["loss"]
    assert losses[-1] < 0.6 * losses[0]


def test_save_load_continue_equals_uninterrupted(tmp_path):
    X, y = _digits(128)
    fit = dict(batch_size=32, verbose=0, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = _mlp()
        _compile(full)
        full.fit(X, y, epochs=2, **fit)

        first = _mlp()
        _compile(first)
        first.fit(X, y, epochs=1, **fit)
        path = os.path.join(tmp_path, "ginger.keras")
        first.save(path)
        resumed = keras.models.load_model(path)  # no custom_objects needed
        assert isinstance(resumed.optimizer, keras_ginger.Ginger)
        assert int(resumed.optimizer.iterations) == 4
        resumed.fit(X, y, epochs=1, **fit)
    for a, b in zip(full.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    U_full, s_full = full.optimizer.get_curvature(full.trainable_variables[0])
    U_res, s_res = resumed.optimizer.get_curvature(
        resumed.trainable_variables[0])
    np.testing.assert_allclose(ops.convert_to_numpy(s_full),
                               ops.convert_to_numpy(s_res), rtol=1e-5)


# Each backend's process checks itself against the next backend in this
# ring (a subprocess): every pair of backends is compared once across the
# three test processes, and each process starts one other backend, not two.
NEXT_BACKEND = {"jax": "tensorflow", "tensorflow": "torch", "torch": "jax"}


def test_backends_agree_on_one_stream(tmp_path):
    """This backend's result equals the next backend's (a subprocess)."""
    this = keras.backend.backend()
    results = {}
    for backend in (this, NEXT_BACKEND[this]):
        out = os.path.join(tmp_path, f"{backend}.npz")
        if backend == this:
            from tests import agree_script

            agree_script.run(out)
        else:
            env = dict(os.environ, KERAS_BACKEND=backend)
            subprocess.run(
                [sys.executable, "-m", "tests.agree_script", out],
                cwd=os.path.dirname(HERE), env=env, check=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        results[backend] = np.load(out)
    base = results[this]
    for backend, other in results.items():
        for key in base.files:
            assert rel_err(other[key], base[key]) <= 1e-5, (backend, key)
