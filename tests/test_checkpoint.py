"""Checkpoint and resume: Ginger's state (U, σ, m, step count) survives
`model.save` (.keras), `save_weights` / `load_weights` and
`keras.callbacks.ModelCheckpoint`, and resumed training equals uninterrupted
training, on this backend and from a .keras file written by JAX.

What Keras 3 does (checked here, not assumed): `model.save_weights` writes
the optimizer's variables too (an ``optimizer`` group in the .weights.h5
file), and `load_weights` restores them only into an optimizer that is
already built (``model.optimizer.build(model.trainable_variables)``); an
unbuilt optimizer is skipped with a warning and starts from scratch.

Most models here use plain `compile` (empirical Fisher, d = g); the
`with_fisher` tests resume with the same `seed=` given to `with_fisher`
again after loading (the sampling stream is keyed on the checkpointed
optimizer step).
"""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_ginger

BACKEND = keras.backend.backend()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.filterwarnings(
    "ignore:Ginger received no `fisher_grads`:UserWarning"
)


def np_(x):
    return np.asarray(ops.convert_to_numpy(x))


def _data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 5)).astype("float32")
    y = ((x[:, 0] + 0.5 * x[:, 1] > 0).astype("int32")
         + (x[:, 2] > 1).astype("int32"))
    return x, y


# A Kronecker block on both kernels (curvature="auto"): the first kernel
# (5, 4) has two low-rank sides (rank 2, with their tail levels ρ), the
# second (4, 3) a low-rank left and a full right side.
KRONECKER = dict(curvature="auto", kronecker_full_size=3, kronecker_rank=2)


def _model(seed=0, schedule=True, jit_compile=False, **ginger):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(4, activation="tanh"),
        keras.layers.Dense(3),
    ])
    # A schedule makes the restored step count matter for the step size as
    # well as for the momentum's bias correction.
    lr = (keras.optimizers.schedules.ExponentialDecay(0.05, 4, 0.7)
          if schedule else 0.05)
    model.compile(
        optimizer=keras_ginger.Ginger(learning_rate=lr, tau=3, damping=1e-2,
                                      **ginger),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        # Op by op: these runs are a few steps each, and XLA would compile
        # every model afresh (the .keras file written by JAX below is jitted).
        jit_compile=jit_compile,
    )
    return model


_ROLES = ("momentum", "second_moment", "curvature_basis", "curvature_eigenvalues",
          "fisher_accumulator", "gradient_accumulator", "average") + tuple(
    f"kronecker_{side}_{what}" for side in ("left", "right")
    for what in ("basis", "eigenvalues", "tail", "factor"))
_BASES = ("curvature_basis", "kronecker_left_basis", "kronecker_right_basis")


def _role(variable):
    """The kind of an optimizer variable, without the model's unique names."""
    name = variable.path.split("/")[-1]
    return next((r for r in _ROLES if name.endswith("_" + r)), name)


def _state(model):
    """{name: array}: weights, every optimizer variable, and U diag(σ) Uᵀ of
    every factor a block keeps."""
    opt = model.optimizer
    out = {f"w{i}": np_(w) for i, w in enumerate(model.trainable_variables)}
    for i, v in enumerate(opt.variables):
        out[f"opt{i:02d}:{_role(v)}"] = np_(v)
    for i, v in enumerate(model.trainable_variables):
        for label, U, s in opt.curvature_factors(v):
            U, s = (np.asarray(np_(t), np.float64) for t in (U, s))
            out[f"M{i}{label}"] = (U * s) @ U.T
    out["iterations"] = np.asarray(int(np_(opt.iterations)))
    return out


class AtStep(keras.callbacks.Callback):
    """Calls ``fn(model)`` right after optimizer step ``at``."""

    def __init__(self, at, fn):
        super().__init__()
        self.at, self.fn = at, fn

    def on_train_batch_end(self, batch, logs=None):
        model = self.model  # syncs the JAX state
        if int(np_(model.optimizer.iterations)) == self.at:
            self.fn(model)


def _assert_same(a, b, rtol, atol=0.0):
    assert sorted(a) == sorted(b)
    for k in sorted(a):
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol,
                                   err_msg=k)


def _assert_equal(a, b):
    assert sorted(a) == sorted(b)
    for k in sorted(a):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


FIT = dict(batch_size=8, shuffle=False, verbose=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One uninterrupted run of 2 epochs × 6 batches (12 steps) that, on
    the way, calls model.save and save_weights after step 6 and has
    ModelCheckpoint (.keras and weights-only) save after step 9."""
    d = tmp_path_factory.mktemp("run")
    paths = {
        "save": str(d / "step6.keras"),
        "save_weights": str(d / "step6.weights.h5"),
        "ckpt": str(d / "step9.keras"),
        "ckpt_weights": str(d / "step9.weights.h5"),
    }
    states = {}

    def at_6(model):
        states[6] = _state(model)
        model.save(paths["save"])
        model.save_weights(paths["save_weights"])

    def at_9(model):
        states[9] = _state(model)

    x, y = _data()
    model = _model()
    model.fit(x, y, epochs=2, callbacks=[
        AtStep(6, at_6),
        keras.callbacks.ModelCheckpoint(paths["ckpt"], save_freq=9),
        keras.callbacks.ModelCheckpoint(paths["ckpt_weights"], save_freq=9,
                                        save_weights_only=True),
        AtStep(9, at_9),
    ], **FIT)
    states[12] = _state(model)
    return paths, states, x, y


# --------------------------------------------------------------------------
# 1. model.save (.keras)


def test_model_save_restores_state_and_resume_equals_uninterrupted(run):
    paths, states, x, y = run
    resumed = keras.models.load_model(paths["save"])
    assert isinstance(resumed.optimizer, keras_ginger.Ginger)
    # Every piece of state comes back bit for bit: U, σ, m, step count.
    restored = _state(resumed)
    assert int(restored["iterations"]) == 6
    assert sum(k.endswith(":curvature_basis") for k in restored) == 4
    assert sum(k.endswith(":momentum") for k in restored) == 4
    _assert_equal(restored, states[6])
    resumed.fit(x, y, epochs=1, **FIT)  # epoch 2
    # Same backend, same computation: equal to float round-off.
    _assert_same(_state(resumed), states[12], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("interval", [1, 4])
def test_kronecker_state_save_restores_and_resume_equals_uninterrupted(
        tmp_path, interval):
    """The Kronecker block's state (U, σ, ρ of each side; with
    `kronecker_interval=4` also the full side's factor F, saved at step 6,
    two refreshes after its last eigendecomposition) comes back bit for bit
    from a .keras file, and the resumed run equals the uninterrupted one."""
    path = str(tmp_path / "step6.keras")
    states = {}

    def at_6(model):
        states[6] = _state(model)
        model.save(path)

    x, y = _data()
    model = _model(**KRONECKER, kronecker_interval=interval)
    model.fit(x, y, epochs=2, callbacks=[AtStep(6, at_6)], **FIT)
    kinds = [model.optimizer.block_kind(v) for v in model.trainable_variables]
    assert kinds == ["kronecker", "vector", "kronecker", "vector"]
    resumed = keras.models.load_model(path)
    restored = _state(resumed)
    assert sum(k.endswith("_tail") for k in restored) == 3
    assert sum(k.endswith("_factor") for k in restored) == (interval > 1)
    assert all(np.any(restored[k] > 0) for k in restored
               if k.endswith(("_tail", "_eigenvalues")))
    _assert_equal(restored, states[6])
    resumed.fit(x, y, epochs=1, **FIT)
    _assert_same(_state(resumed), _state(model), rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------
# 2. save_weights / load_weights


def test_save_weights_includes_optimizer_state(run):
    h5py = pytest.importorskip("h5py")
    paths, states, x, y = run
    with h5py.File(paths["save_weights"], "r") as f:
        group = f["optimizer"]["vars"]
        stored = [np.asarray(group[str(i)]) for i in range(len(group))]
    want = [v for k, v in sorted(states[6].items()) if k.startswith("opt")]
    assert len(stored) == len(want)
    for s, w in zip(stored, want):
        np.testing.assert_array_equal(s, w)


def test_load_weights_into_built_optimizer_resumes_exactly(run):
    paths, states, x, y = run
    resumed = _model(seed=1)  # other initial weights: all overwritten
    resumed.optimizer.build(resumed.trainable_variables)
    resumed.load_weights(paths["save_weights"])
    _assert_equal(_state(resumed), states[6])
    resumed.fit(x, y, epochs=1, **FIT)
    _assert_same(_state(resumed), states[12], rtol=1e-6, atol=1e-8)


def test_load_weights_into_unbuilt_optimizer_skips_its_state(run):
    """Keras's behaviour, documented: the optimizer state is dropped (with a
    warning) when the optimizer is not built yet; training restarts it."""
    paths, states, x, y = run
    fresh = _model(seed=1)
    with pytest.warns(UserWarning, match="Skipping variable loading for "
                                         "optimizer"):
        fresh.load_weights(paths["save_weights"])
    for i, w in enumerate(fresh.trainable_variables):  # the weights do load
        np.testing.assert_array_equal(np_(w), states[6][f"w{i}"])
    assert not fresh.optimizer.built
    fresh.fit(x[:8], y[:8], epochs=1, **FIT)
    assert int(np_(fresh.optimizer.iterations)) == 1  # counted from 0


# --------------------------------------------------------------------------
# 3. keras.callbacks.ModelCheckpoint, mid-epoch


@pytest.mark.parametrize("weights_only", [False, True])
def test_model_checkpoint_mid_epoch_resume(run, weights_only):
    paths, states, x, y = run
    if weights_only:
        resumed = _model(seed=1)
        resumed.optimizer.build(resumed.trainable_variables)
        resumed.load_weights(paths["ckpt_weights"])
    else:
        resumed = keras.models.load_model(paths["ckpt"])
    restored = _state(resumed)
    assert int(restored["iterations"]) == 9  # saved after the 9th step
    _assert_equal(restored, states[9])
    # The rest of epoch 2 (its batches 4-6) continues where the run stopped.
    resumed.fit(x[24:], y[24:], epochs=1, **FIT)
    _assert_same(_state(resumed), states[12], rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------
# 4. Across backends: a .keras file written by JAX


_JAX_SCRIPT = textwrap.dedent('''
    """Written by tests/test_checkpoint.py; runs with KERAS_BACKEND=jax."""
    import sys, warnings
    warnings.filterwarnings("ignore", message="Ginger received no")
    import json, keras, numpy as np
    sys.path.insert(0, sys.argv[2])
    from tests.test_checkpoint import _data, _model, _state, FIT
    assert keras.backend.backend() == "jax", keras.backend.backend()
    out = sys.argv[1]
    x, y = _data()
    model = _model(jit_compile="auto", **json.loads(sys.argv[3]))  # jitted
    model.fit(x, y, epochs=1, **FIT)             # 6 steps
    np.savez(out + "/saved.npz", **_state(model))
    model.save(out + "/jax.keras")
    model.fit(x[:24], y[:24], epochs=1, **FIT)   # 3 more
    np.savez(out + "/continued.npz", **_state(model))
''')


@pytest.fixture(scope="module", params=["vector", "kronecker"])
def jax_checkpoint(request, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("jax_ckpt"))
    kwargs = KRONECKER if request.param == "kronecker" else {}
    script = os.path.join(out, "make_checkpoint.py")
    with open(script, "w") as f:
        f.write(_JAX_SCRIPT)
    env = dict(os.environ, KERAS_BACKEND="jax")
    proc = subprocess.run([sys.executable, script, out, ROOT,
                           json.dumps(kwargs)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _rel(a, b):
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_resume_from_jax_checkpoint(jax_checkpoint):
    saved = dict(np.load(os.path.join(jax_checkpoint, "saved.npz")))
    want = dict(np.load(os.path.join(jax_checkpoint, "continued.npz")))
    model = keras.models.load_model(os.path.join(jax_checkpoint, "jax.keras"))
    assert isinstance(model.optimizer, keras_ginger.Ginger)
    restored = _state(model)
    assert sorted(restored) == sorted(saved)
    for k in saved:  # loaded bit for bit on any backend
        np.testing.assert_array_equal(restored[k], saved[k], err_msg=k)

    # The file's compile config holds the jit_compile JAX resolved "auto" to
    # (True): on torch that would mean torch.compile (minutes on CPU), on
    # TensorFlow XLA. Op by op here; the numbers are the same.
    if BACKEND != "jax":
        model.jit_compile = False
    x, y = _data()
    model.fit(x[:24], y[:24], epochs=1, **FIT)
    got = _state(model)
    assert int(got["iterations"]) == int(want["iterations"]) == 9
    # U's columns are eigenvectors: their signs are the eigensolver's choice
    # and may differ between backends; U diag(σ) Uᵀ (M*) does not.
    for k in sorted(want):
        if k.endswith(_BASES) or k == "iterations":
            continue
        if np.linalg.norm(want[k]) == 0:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        else:
            assert _rel(got[k], want[k]) <= 1e-5, (k, _rel(got[k], want[k]))


# --------------------------------------------------------------------------
# 5. with_fisher: the sampling stream


@pytest.fixture(scope="module")
def fisher_run(tmp_path_factory):
    """A with_fisher run of 12 steps that saves after step 6, and its
    resumption from that file with with_fisher(loaded, seed=<same>)."""
    path = str(tmp_path_factory.mktemp("fisher") / "step6.keras")
    states = {}

    def at_6(model):
        states[6] = _state(model)
        model.save(path)

    def fisher_model():
        model = _model(schedule=False)
        return keras_ginger.with_fisher(model, seed=3)

    x, y = _data()
    full = fisher_model()
    full.fit(x, y, epochs=2, callbacks=[AtStep(6, at_6)], **FIT)
    states[12] = _state(full)
    resumed = keras_ginger.with_fisher(keras.models.load_model(path), seed=3)
    states["loaded"] = _state(resumed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.fit(x, y, epochs=1, **FIT)
    states["resumed"] = _state(resumed)
    states["empirical_warning"] = any(
        "no `fisher_grads`" in str(w.message) for w in caught)
    return states


def test_with_fisher_model_save_restores_optimizer_state(fisher_run):
    """What holds with with_fisher: U, σ, m and the step count come back,
    and the resumed run takes the Fisher path again."""
    _assert_equal(fisher_run["loaded"], fisher_run[6])
    assert not fisher_run["empirical_warning"]
    assert int(fisher_run["resumed"]["iterations"]) == 12


def test_with_fisher_resume_equals_uninterrupted(fisher_run):
    # Samples are drawn at (seed, optimizer step): the step is checkpointed.
    _assert_same(fisher_run["resumed"], fisher_run[12], rtol=1e-5,
                 atol=1e-7)


# --------------------------------------------------------------------------
# 6. In the middle of a gradient-accumulation cycle


def _argmax_sampler(y_pred, seed=None):
    """Deterministic labels, so that the (unsaved) sampling stream plays no
    part: what is tested is the accumulator state."""
    return ops.argmax(y_pred, axis=-1)


def test_resume_mid_accumulation_cycle(tmp_path):
    """Saved after micro-step 4 of cycles of 3: the Keras g accumulators
    and Ginger's Fisher accumulators (Σd so far) come back, and the resumed
    run finishes the cycle exactly as the uninterrupted one."""
    def model_():
        model = _model(schedule=False)
        model.compile(
            optimizer=keras_ginger.Ginger(learning_rate=0.05, tau=3,
                                          damping=1e-2,
                                          gradient_accumulation_steps=3),
            loss=model.loss, jit_compile=False)
        return keras_ginger.with_fisher(model, sampler=_argmax_sampler)

    path = os.path.join(tmp_path, "mid.keras")
    states = {}

    def at_4(model):
        states[4] = _state(model)
        model.save(path)

    x, y = _data()
    full = model_()

    class AtMicroStep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 3:  # 4 micro-steps done
                at_4(self.model)

    full.fit(x, y, epochs=1, callbacks=[AtMicroStep()], **FIT)  # 6 micro
    fisher_accs = [k for k in states[4] if k.endswith(":fisher_accumulator")]
    assert len(fisher_accs) == 4
    assert all(np.any(states[4][k] != 0) for k in fisher_accs)
    resumed = keras_ginger.with_fisher(keras.models.load_model(path),
                                       sampler=_argmax_sampler)
    _assert_equal(_state(resumed), states[4])
    resumed.fit(x[32:], y[32:], epochs=1, **FIT)  # micro-steps 5, 6
    assert int(np_(resumed.optimizer.iterations)) == 2
    _assert_same(_state(resumed), _state(full), rtol=1e-6, atol=1e-8)
