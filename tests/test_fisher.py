"""Tests of the sampled-label Fisher train step (keras_ginger.with_fisher).

Run each backend in its own process:
    KERAS_BACKEND=jax .venv/bin/python -m pytest -q tests/test_fisher.py
    KERAS_BACKEND=tensorflow .venv/bin/python -m pytest -q tests/test_fisher.py
    KERAS_BACKEND=torch .venv/bin/python -m pytest -q tests/test_fisher.py

The Fisher gradients d are observed through `RecordingSGD`, a test-only SGD
that takes ``fisher_grads`` (``accepts_fisher_grads = True``) and
accumulates d, d dᵀ and (d dᵀ)² in its own variables, so the recording
works inside jit-compiled train steps on every backend.
"""

import contextlib
import numpy as np
import pytest

import keras
from keras import ops

from keras_ginger import train_step as train_step_module
from keras_ginger import samplers
from keras_ginger import FisherTrainStep
from keras_ginger import with_fisher

BACKEND = keras.backend.backend()
# Keras's torch trainer supports steps_per_execution == 1 only.
SPE = [1] if BACKEND == "torch" else [1, 2]


def np_(x):
    return np.asarray(ops.convert_to_numpy(x))


@keras.saving.register_keras_serializable(package="keras_ginger_tests")
class RecordingSGD(keras.optimizers.SGD):
    """SGD that takes fisher_grads and records them in optimizer variables."""

    accepts_fisher_grads = True
    history_size = 8

    def build(self, var_list):
        super().build(var_list)
        p = int(sum(np.prod(v.shape) for v in var_list))
        self.n_steps = self.add_variable((), name="n_steps")
        self.sum_dd = self.add_variable((p, p), name="sum_dd")
        self.sum_dd2 = self.add_variable((p, p), name="sum_dd2")
        self.history = self.add_variable((self.history_size, p), name="history")

    @contextlib.contextmanager
    def using_fisher_grads(self, fisher_grads):
        # The hand-over protocol (see keras_ginger.train_step); one thread.
        self._pending = fisher_grads
        try:
            yield
        finally:
            self._pending = None

    def stateless_apply(
        self, optimizer_variables, grads, trainable_variables, fisher_grads=None
    ):
        # The base stateless_apply calls self.apply(grads) in a StatelessScope.
        # None (a LossScaleOptimizer calling in) keeps what was handed over.
        if fisher_grads is None:
            return super().stateless_apply(
                optimizer_variables, grads, trainable_variables
            )
        with self.using_fisher_grads(fisher_grads):
            return super().stateless_apply(
                optimizer_variables, grads, trainable_variables
            )

    def apply(self, grads, trainable_variables=None, fisher_grads=None):
        if fisher_grads is None:
            fisher_grads = getattr(self, "_pending", None)
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        if fisher_grads is not None:
            d = ops.concatenate(
                [ops.reshape(ops.cast(f, "float32"), (-1,)) for f in fisher_grads]
            )
            dd = ops.outer(d, d)
            n = ops.convert_to_tensor(self.n_steps)
            row = ops.cast(ops.mod(n, self.history_size), "int32")
            history = ops.convert_to_tensor(self.history)
            self.history.assign(ops.slice_update(history, (row, 0), d[None, :]))
            self.n_steps.assign_add(1.0)
            self.sum_dd.assign_add(dd)
            self.sum_dd2.assign_add(dd * dd)
        return super().apply(grads, trainable_variables)

    def ds(self):
        """The recorded d's, oldest first (at most history_size)."""
        n = int(np_(self.n_steps))
        h = np_(self.history)
        k = min(n, self.history_size)
        rows = [(n - k + i) % self.history_size for i in range(k)]
        return h[rows]


# --------------------------------------------------------------------------
# 1. E[d dᵀ] = Fisher / GGN, not the empirical Fisher


def _dense_jacobians(x, n_out):
    """Jᵢ = ∂zᵢ/∂θ for z = x W + b, θ = [vec(W) (row-major), b]."""
    eye = np.eye(n_out)
    return np.stack(
        [np.concatenate([np.kron(xi[None, :], eye), eye], axis=1) for xi in x]
    )


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _case(kind, rng):
    """Model, data and the exact Fisher G and empirical Fisher EF (float64).

    G = meanᵢ Jᵢᵀ Hᵢ Jᵢ with Hᵢ the Hessian of the per-example loss in the
    logits z (= the Fisher of the model's predictive distribution):
      softmax cross-entropy:  diag(p) - p pᵀ
      binary cross-entropy (Keras: mean over K labels):  diag(p(1-p)) / K
      mean squared error (Keras: mean over D outputs):  (2/D) I
    EF = meanᵢ hᵢ hᵢᵀ, hᵢ the same per-example gradient at the *true* label
    (scaled like d: √K ∇ℓ for BCE), with labels chosen to disagree with the
    model.
    """
    n_in, batch = 3, 8
    x = rng.normal(size=(batch, n_in))
    n_out = {"sparse_logits": 3, "onehot_probs": 3}.get(kind, 2)
    W = rng.normal(scale=1.2, size=(n_in, n_out))
    b = rng.normal(scale=0.5, size=(n_out,))
    z = x @ W + b
    J = _dense_jacobians(x, n_out)

    activation = None
    if kind in ("sparse_logits", "onehot_probs"):
        p = _softmax(z)
        H = np.stack([np.diag(pi) - np.outer(pi, pi) for pi in p])
        y_idx = p.argmin(-1)  # the least likely class: labels disagree
        onehot = np.eye(n_out)[y_idx]
        h = p - onehot
        if kind == "sparse_logits":
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            y = y_idx
        else:
            loss = keras.losses.CategoricalCrossentropy(from_logits=False)
            activation = "softmax"
            y = onehot
    elif kind in ("bce_logits", "bce_probs"):
        p = _sigmoid(z)
        H = np.stack([np.diag(pi * (1 - pi)) / n_out for pi in p])
        y = (p < 0.5).astype("float64")  # the less likely label
        h = (p - y) / np.sqrt(n_out)
        if kind == "bce_logits":
            loss = keras.losses.BinaryCrossentropy(from_logits=True)
        else:
            loss = keras.losses.BinaryCrossentropy(from_logits=False)
            activation = "sigmoid"
    elif kind == "mse":
        H = np.stack([np.eye(n_out) * 2.0 / n_out] * batch)
        y = z + 2.5  # far from the model's mean prediction
        h = (z - y) * 2.0 / n_out
        loss = keras.losses.MeanSquaredError()
    else:
        raise ValueError(kind)
    G = np.einsum("bip,bij,bjq->pq", J, H, J) / batch
    g = np.einsum("bip,bi->bp", J, h)
    EF = np.einsum("bp,bq->pq", g, g) / batch

    model = keras.Sequential(
        [keras.Input((n_in,)), keras.layers.Dense(n_out, activation=activation)]
    )
    model.layers[0].set_weights([W.astype("float32"), b.astype("float32")])
    return model, loss, x.astype("float32"), np.asarray(y, "float32"), G, EF


@pytest.mark.parametrize(
    "kind", ["sparse_logits", "onehot_probs", "bce_logits", "bce_probs", "mse"]
)
def test_running_average_of_ddT_converges_to_fisher(kind):
    """Over T steps on a fixed batch with θ fixed (SGD, lr=0), the d's are
    iid, so the running average of d dᵀ estimates E[d dᵀ] with a Monte-Carlo
    standard error per entry of sd(d dᵀ entry)/√T (sd from the recorded
    second moments). Tolerance: every entry within 5 standard errors of the
    exact G (P=12 parameters → 78 distinct entries; under normality the
    chance that any exceeds 5σ is < 78 · 5.7e-7 ≈ 5e-5), and the Frobenius
    error within 3× its expectation √(Σ SE²). The empirical Fisher (true
    labels, chosen to disagree with the model) must be far outside that:
    ‖avg - EF‖ ≥ 10 √(Σ SE²). Runs are seeded, hence deterministic."""
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    model, loss, x, y, G, EF = _case(kind, rng)
    with_fisher(model)
    opt = RecordingSGD(learning_rate=0.0)
    model.compile(optimizer=opt, loss=loss, jit_compile=BACKEND != "torch")
    steps = 300
    model.fit(
        np.tile(x, (steps, 1)),
        np.tile(y, (steps,) + (1,) * (y.ndim - 1)),
        batch_size=len(x),
        shuffle=False,
        verbose=0,
    )
    n = np_(opt.n_steps)
    assert n == steps
    mean = np_(opt.sum_dd).astype("float64") / n
    var = np_(opt.sum_dd2).astype("float64") / n - mean**2
    se = np.sqrt(np.maximum(var, 0.0) / n)
    floor = 1e-6 * np.abs(G).max()  # float32 accumulation of exact zeros
    z = np.abs(mean - G) / np.maximum(se, floor)
    assert z.max() < 5.0, (z.max(), np.unravel_index(z.argmax(), z.shape))
    total_se = np.sqrt((se**2).sum())
    assert np.linalg.norm(mean - G) < 3.0 * total_se
    assert np.linalg.norm(mean - EF) > 10.0 * total_se
    assert np.linalg.norm(EF - G) > 10.0 * total_se


# --------------------------------------------------------------------------
# 2. g is exactly Keras's own gradient; logs and metrics match


def _functional_mlp(seed=1):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(
        5,
        activation="tanh",
        kernel_regularizer=keras.regularizers.L2(0.05),
        activity_regularizer=keras.regularizers.L1(0.01),
    )(inputs)
    outputs = keras.layers.Dense(3)(h)
    return keras.Model(inputs, outputs)


def _data(rng, n=16):
    x = rng.normal(size=(n, 4)).astype("float32")
    y = rng.integers(0, 3, size=(n,))
    sw = rng.uniform(0.5, 2.0, size=(n,)).astype("float32")
    sw[::5] = 0.0
    return x, y, sw


@pytest.mark.parametrize("jit_compile", [True, False])
def test_loss_gradient_equals_keras_train_step(jit_compile):
    if jit_compile and BACKEND == "torch":
        pytest.skip("torch.compile is slow on CPU; covered by jit_compile=False")
    rng = np.random.default_rng(1)
    x, y, sw = _data(rng)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def compiled(model, opt):
        model.compile(
            optimizer=opt,
            loss=loss,
            metrics=["accuracy"],
            weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="wacc")],
            jit_compile=jit_compile,
        )
        return model

    plain = compiled(_functional_mlp(), keras.optimizers.SGD(0.1))
    fish_opt = RecordingSGD(0.1)
    fish = compiled(with_fisher(_functional_mlp()), fish_opt)
    for w_p, w_f in zip(plain.get_weights(), fish.get_weights()):
        np.testing.assert_array_equal(w_p, w_f)

    for step in range(2):
        logs_p = plain.train_on_batch(x, y, sample_weight=sw, return_dict=True)
        logs_f = fish.train_on_batch(x, y, sample_weight=sw, return_dict=True)
        assert set(logs_p) == set(logs_f)
        for key in logs_p:
            np.testing.assert_allclose(logs_f[key], logs_p[key], rtol=1e-6)
    # Same parameters after two SGD steps ⇒ same g at each step.
    for w_p, w_f in zip(plain.trainable_weights, fish.trainable_weights):
        np.testing.assert_allclose(np_(w_f), np_(w_p), rtol=1e-5, atol=1e-7)
    assert np_(fish_opt.n_steps) == 2  # and the Fisher path was taken

    # fit: history and weights match too.
    hp = plain.fit(x, y, sample_weight=sw, batch_size=8, epochs=2,
                   shuffle=False, verbose=0)
    hf = fish.fit(x, y, sample_weight=sw, batch_size=8, epochs=2,
                  shuffle=False, verbose=0)
    for key in hp.history:
        np.testing.assert_allclose(hf.history[key], hp.history[key], rtol=1e-5)
    for w_p, w_f in zip(plain.trainable_weights, fish.trainable_weights):
        np.testing.assert_allclose(np_(w_f), np_(w_p), rtol=1e-5, atol=1e-7)


def test_loss_scale_optimizer_passes_unscaled_fisher_grads():
    """Through a LossScaleOptimizer, d reaches the inner optimizer unscaled:
    same seed ⇒ the same d with and without a 2¹⁰ loss scale."""
    rng = np.random.default_rng(2)
    x, y, _ = _data(rng, n=8)
    recorded = []
    for wrap in (False, True):
        model = with_fisher(_functional_mlp(), seed=7)
        opt = RecordingSGD(0.0)
        outer = (
            keras.optimizers.LossScaleOptimizer(opt, initial_scale=2.0**10)
            if wrap
            else opt
        )
        model.compile(
            optimizer=outer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=False,
        )
        model.train_on_batch(x, y)
        model.train_on_batch(x, y)
        assert np_(opt.n_steps) == 2
        recorded.append(opt.ds())
    np.testing.assert_allclose(recorded[1], recorded[0], rtol=1e-5, atol=1e-6)


def _count_primitive(jaxpr, name):
    """Occurrences of a primitive in a jaxpr, sub-jaxprs (pjit, ...) included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == name
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    count += _count_primitive(sub, name)
    return count


@pytest.mark.skipif(BACKEND != "jax", reason="inspects the JAX program")
def test_jax_step_is_one_forward_and_two_backward_passes():
    """The traced train step of a 3-layer MLP has 3 forward matmuls and 5
    backward ones (dW for 3 layers, dx for 2); with Fisher gradients exactly
    5 more: d shares the forward pass and costs one extra backward pass."""
    import jax

    class SGDIgnoringD(keras.optimizers.SGD):  # no matmuls of its own
        accepts_fisher_grads = True

        def stateless_apply(self, ov, grads, tv, fisher_grads=None):
            return super().stateless_apply(ov, grads, tv)

    rng = np.random.default_rng(15)
    x, y, _ = _data(rng, n=8)

    def matmuls(fisher):
        model = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(5, activation="relu"),
             keras.layers.Dense(5, activation="relu"), keras.layers.Dense(3)]
        )
        opt = keras.optimizers.SGD(0.1)
        if fisher:
            with_fisher(model)
            opt = SGDIgnoringD(0.1)
        model.compile(
            optimizer=opt,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.train_on_batch(x, y)  # builds optimizer and metrics
        state = model._get_jax_state(
            trainable_variables=True,
            non_trainable_variables=True,
            optimizer_variables=True,
            metrics_variables=True,
        )
        closed = jax.make_jaxpr(model.train_step)(state, (x, y))
        return _count_primitive(closed.jaxpr, "dot_general")

    assert matmuls(fisher=False) == 3 + 5
    assert matmuls(fisher=True) == 3 + 5 + 5


# --------------------------------------------------------------------------
# 3. with_fisher on every kind of model; fit modes; plain optimizers


class SubclassedMLP(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(6, activation="relu")
        self.out = keras.layers.Dense(3)

    def call(self, x):
        return self.out(self.hidden(x))


class MixinMLP(FisherTrainStep, SubclassedMLP):
    """The same model with the Fisher train step mixed in by hand."""


def _make(kind):
    if kind == "sequential":
        return keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(6, activation="relu"),
             keras.layers.Dense(3)]
        )
    if kind == "functional":
        return _functional_mlp()
    if kind == "subclassed":
        return SubclassedMLP()
    raise ValueError(kind)


def _compile(model, opt, jit_compile="auto", spe=1, loss=None):
    if jit_compile == "auto":  # torch.compile is slow on CPU: opt in only
        jit_compile = BACKEND != "torch"
    model.compile(
        optimizer=opt,
        loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit_compile,
        steps_per_execution=spe,
    )
    return model


@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed"])
@pytest.mark.parametrize("when", ["before_compile", "after_compile"])
def test_with_fisher_any_model(kind, when):
    rng = np.random.default_rng(3)
    x, y, _ = _data(rng, n=16)
    model = _make(kind)
    original = type(model)
    opt = RecordingSGD(0.05)
    if when == "before_compile":
        assert with_fisher(model) is model
        _compile(model, opt)
    else:
        _compile(model, opt)
        model.fit(x, y, batch_size=8, verbose=0)  # trained plainly first:
        assert np_(opt.n_steps) == 0  # no fisher_grads without with_fisher
        assert with_fisher(model) is model
    assert isinstance(model, FisherTrainStep) and isinstance(model, original)
    assert type(model).__name__ == original.__name__
    n0 = np_(opt.n_steps) if opt.built else 0
    hist = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert np.isfinite(hist.history["loss"]).all()
    assert np_(opt.n_steps) == n0 + 4
    ds = opt.ds()[-4:]
    assert np.isfinite(ds).all() and np.abs(ds).sum(axis=1).min() > 0


def test_mixin_subclass():
    rng = np.random.default_rng(4)
    x, y, _ = _data(rng, n=16)
    model = MixinMLP()
    opt = RecordingSGD(0.05)
    _compile(model, opt)
    model.fit(x, y, batch_size=8, verbose=0)
    assert np_(opt.n_steps) == 2


@pytest.mark.parametrize("jit_compile", [True, False])
@pytest.mark.parametrize("spe", SPE)
def test_fit_modes_and_seed_advances(jit_compile, spe):
    """fit (jit on/off, steps_per_execution) and train_on_batch: every step
    draws fresh samples, also inside one compiled multi-step execution
    (torch: jit_compile=True is torch.compile)."""
    keras.utils.set_random_seed(5)
    rng = np.random.default_rng(5)
    # 32 examples: two steps drawing identical labels for all of them (hence
    # identical d) is practically impossible.
    x, y, _ = _data(rng, n=32)
    model = with_fisher(_make("sequential"))
    seed_state = np_(model._fisher_seed_generator.state)
    opt = RecordingSGD(0.0)  # θ fixed: d differs only through the samples
    _compile(model, opt, jit_compile=jit_compile, spe=spe)
    model.fit(np.tile(x, (4, 1)), np.tile(y, 4), batch_size=32, shuffle=False,
              verbose=0)
    model.train_on_batch(x, y)
    model.train_on_batch(x, y)
    ds = opt.ds()
    assert ds.shape[0] == 6
    for i in range(6):
        for j in range(i):
            assert not np.allclose(ds[i], ds[j]), (i, j)
    # Counter-based seeds: step t draws from (base, SEED_STRIDE·t + j); the
    # generator only holds the base, which no step changes
    # (tests/test_custom_loop.py checks the draws themselves).
    np.testing.assert_array_equal(
        np_(model._fisher_seed_generator.state), seed_state)


def _record_run(seed, kind="sequential", steps=3):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(6)
    x, y, _ = _data(rng, n=8)
    model = with_fisher(_make(kind))
    opt = RecordingSGD(0.1)
    _compile(model, opt)
    model.fit(np.tile(x, (steps, 1)), np.tile(y, steps), batch_size=8,
              shuffle=False, verbose=0)
    return opt.ds(), [np_(w) for w in model.trainable_weights]


def test_reproducible_under_set_random_seed():
    ds_a, w_a = _record_run(11)
    ds_b, w_b = _record_run(11)
    ds_c, _ = _record_run(12)
    np.testing.assert_array_equal(ds_a, ds_b)
    for a, b in zip(w_a, w_b):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(ds_a, ds_c)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_plain_optimizer_is_plain_keras_and_does_no_fisher_work(
    jit_compile, monkeypatch
):
    if jit_compile and BACKEND == "torch":
        pytest.skip("torch.compile is slow on CPU; jit_compile=False covers torch")

    def forbidden(*args, **kwargs):
        raise AssertionError("the Fisher loss must not be computed")

    monkeypatch.setattr(train_step_module, "model_fisher_loss", forbidden)
    rng = np.random.default_rng(7)
    x, y, sw = _data(rng)
    plain = _compile(_functional_mlp(), keras.optimizers.SGD(0.1, momentum=0.9),
                     jit_compile=jit_compile)
    fish = _compile(with_fisher(_functional_mlp()),
                    keras.optimizers.SGD(0.1, momentum=0.9),
                    jit_compile=jit_compile)
    hp = plain.fit(x, y, sample_weight=sw, batch_size=8, epochs=2,
                   shuffle=False, verbose=0)
    hf = fish.fit(x, y, sample_weight=sw, batch_size=8, epochs=2,
                  shuffle=False, verbose=0)
    for key in hp.history:
        np.testing.assert_array_equal(hf.history[key], hp.history[key])
    for w_p, w_f in zip(plain.get_weights(), fish.get_weights()):
        np.testing.assert_array_equal(w_f, w_p)


def test_unknown_loss_gives_clear_error():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.normal(size=(8, 3)).astype("float32")
    model = with_fisher(_make("sequential"))
    _compile(model, RecordingSGD(0.1), loss="mae")
    with pytest.raises(ValueError, match=r"sampler=") as info:
        model.train_on_batch(x, y)
    assert "mean_absolute_error" in str(info.value) or "mae" in str(info.value)
    # A plain optimizer does not need a sampler.
    model = with_fisher(_make("sequential"))
    _compile(model, keras.optimizers.SGD(0.1), loss="mae")
    model.train_on_batch(x, y)


def test_custom_sampler_and_multi_output():
    """A custom sampler (for MAE: the Laplace distribution, whose NLL it is)
    and one sampler per output of a two-output model, by list and by dict."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(8, 4)).astype("float32")
    y_cls = rng.integers(0, 3, size=(8,))
    y_reg = rng.normal(size=(8, 2)).astype("float32")
    calls = []

    def laplace(y_pred, seed):
        calls.append(1)
        u = keras.random.uniform(ops.shape(y_pred), -0.5, 0.5, seed=seed)
        return y_pred - ops.sign(u) * ops.log1p(-2.0 * ops.abs(u))

    for spec in ([None, laplace], {"reg": laplace}):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,))
        h = keras.layers.Dense(5, activation="tanh")(inputs)
        out_cls = keras.layers.Dense(3, name="cls")(h)
        out_reg = keras.layers.Dense(2, name="reg")(h)
        model = keras.Model(inputs, {"cls": out_cls, "reg": out_reg})
        with_fisher(model, sampler=spec)
        opt = RecordingSGD(0.0)
        model.compile(
            optimizer=opt,
            loss={
                "cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                "reg": "mae",
            },
            loss_weights={"cls": 1.0, "reg": 0.5},
            jit_compile=False,
        )
        calls.clear()
        model.train_on_batch(x, {"cls": y_cls, "reg": y_reg})
        assert calls, "the custom sampler was not used"
        assert np_(opt.n_steps) == 1 and np.isfinite(opt.ds()).all()

    with_fisher(model, sampler=[laplace])  # wrong length
    model.compile(optimizer=RecordingSGD(0.0), loss={"cls": "mae", "reg": "mae"},
                  jit_compile=False)
    with pytest.raises(ValueError, match="one per output"):
        model.train_on_batch(x, {"cls": y_reg[:, :1].repeat(3, 1), "reg": y_reg})


def test_serializes_and_saves_as_the_original_class(tmp_path):
    rng = np.random.default_rng(10)
    x, y, _ = _data(rng, n=8)
    model = _make("sequential")
    _compile(model, keras.optimizers.SGD(0.1))
    model.fit(x, y, verbose=0)
    config = keras.saving.serialize_keras_object(model)
    json_before = model.to_json()
    with_fisher(model)
    assert type(model) is not keras.Sequential
    assert isinstance(model, keras.Sequential)
    assert keras.saving.serialize_keras_object(model) == config
    assert model.to_json() == json_before
    model.compile(optimizer=RecordingSGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is keras.Sequential
    np.testing.assert_allclose(np_(loaded(x)), np_(model(x)), rtol=1e-6)
    # ... and can be given the Fisher step again.
    with_fisher(loaded)
    loaded.fit(x, y, verbose=0)
    # Pickle (Keras pickles through its saving library) also round-trips.
    import pickle

    unpickled = pickle.loads(pickle.dumps(model))
    assert type(unpickled) is keras.Sequential
    np.testing.assert_allclose(np_(unpickled(x)), np_(model(x)), rtol=1e-6)


# --------------------------------------------------------------------------
# 4. Sequence outputs: masked tokens contribute nothing; N = unmasked tokens


def _seq_model(mask_zero, vocab=7, dim=4, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(vocab, dim, mask_zero=mask_zero)(inputs)
    logits = keras.layers.Dense(vocab)(h)  # per token, no mixing over time
    return keras.Model(inputs, logits)


def _seq_fisher_d(model, x, y, sw=None, sampler=None, seed=3):
    with_fisher(model, sampler=sampler, seed=seed)
    opt = RecordingSGD(0.0)
    model.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=BACKEND != "torch",
    )
    model.train_on_batch(x, y, sample_weight=sw)
    return opt.ds()[-1]


def _argmax_sampler(y_pred, seed):  # deterministic "sample": d is computable
    return ops.argmax(y_pred, axis=-1)


def test_sequence_masks_and_token_count():
    """With a deterministic sampler (ŷ = argmax), d must equal the float64
    reference (1/√N) Σ_{unmasked t} ∇θ CE(ŷ_t, z_t) computed by hand, where
    N counts the tokens that are neither padding (Keras mask from
    mask_zero) nor zero-weighted."""
    rng = np.random.default_rng(12)
    vocab, dim, batch, length = 7, 4, 3, 5
    x = rng.integers(1, vocab, size=(batch, length)).astype("int32")
    x[0, 3:] = 0  # padding
    x[1, 4:] = 0
    y = rng.integers(0, vocab, size=(batch, length))
    sw = np.ones((batch, length), "float32")
    sw[2, 0] = 0.0  # a zero-weight token
    model = _seq_model(mask_zero=True, vocab=vocab, dim=dim)
    E, W, b = [w.astype("float64") for w in model.get_weights()]
    d = _seq_fisher_d(model, x, y, sw, sampler=_argmax_sampler)

    gE, gW, gb = np.zeros_like(E), np.zeros_like(W), np.zeros_like(b)
    n = 0
    for i in range(batch):
        for t in range(length):
            if x[i, t] == 0 or sw[i, t] == 0:
                continue
            n += 1
            h = E[x[i, t]]
            z = h @ W + b
            delta = _softmax(z) - np.eye(vocab)[z.argmax()]
            gE[x[i, t]] += W @ delta
            gW += np.outer(h, delta)
            gb += delta
    assert n == batch * length - 3 - 1
    ref = np.concatenate([gE.ravel(), gW.ravel(), gb.ravel()]) / np.sqrt(n)
    np.testing.assert_allclose(d, ref, rtol=1e-5, atol=1e-6)


def test_sequence_masked_positions_do_not_change_d():
    """Built-in sampler, same seed: changing the inputs (hence the logits)
    and labels at zero-weight positions leaves d bit-for-bit unchanged, while
    changing them at a weighted position changes it."""
    rng = np.random.default_rng(13)
    vocab, batch, length = 7, 3, 6
    x = rng.integers(1, vocab, size=(batch, length)).astype("int32")
    y = rng.integers(0, vocab, size=(batch, length))
    sw = np.ones((batch, length), "float32")
    sw[:, 4:] = 0.0
    sw[1, 2:] = 0.0

    def d_for(x_, y_):
        return _seq_fisher_d(_seq_model(False, vocab), x_, y_, sw, seed=5)

    d0 = d_for(x, y)
    x2, y2 = x.copy(), y.copy()
    x2[sw == 0] = rng.integers(1, vocab, size=int((sw == 0).sum()))
    y2[sw == 0] = rng.integers(0, vocab, size=int((sw == 0).sum()))
    assert not np.array_equal(x2, x)
    np.testing.assert_array_equal(d_for(x2, y2), d0)
    x3 = x.copy()
    x3[0, 0] = x[0, 0] % (vocab - 1) + 1  # a weighted position
    assert not np.allclose(d_for(x3, y), d0)


# --------------------------------------------------------------------------
# End to end with the real Ginger


def test_ginger_trains_with_fisher():
    from keras_ginger.optimizer import Ginger

    rng = np.random.default_rng(14)
    centers = rng.normal(scale=2.0, size=(3, 4))
    labels = rng.integers(0, 3, size=(96,))
    x = (centers[labels] + rng.normal(size=(96, 4))).astype("float32")
    keras.utils.set_random_seed(0)
    model = with_fisher(_make("sequential"))
    # 24 steps: a learning rate for that budget (the default step has
    # Adam's norm, and Adam() takes ~10x longer here).
    model.compile(
        optimizer=Ginger(learning_rate=1e-2, tau=4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=BACKEND != "torch",
    )
    first = model.evaluate(x, labels, verbose=0, return_dict=True)["loss"]
    hist = model.fit(x, labels, batch_size=32, epochs=8, verbose=0)
    last = model.evaluate(x, labels, verbose=0, return_dict=True)["loss"]
    assert np.isfinite(hist.history["loss"]).all()
    assert last < 0.5 * first, (first, last)
