"""keras_ginger.callbacks: CurvatureLogger (CSV, TensorBoard) and plot_spectrum.

The reference everywhere is `Ginger.get_curvature()` read directly, by a
recording callback that runs right after the logger at the same points.
"""

import csv
import glob
import os

import keras
import numpy as np
import pytest
from keras import ops

import keras_ginger
from keras_ginger import callbacks as kg_callbacks
from keras_ginger.callbacks import CurvatureLogger, plot_spectrum

BACKEND = keras.backend.backend()

pytestmark = pytest.mark.filterwarnings(
    "ignore:Ginger received no `fisher_grads`:UserWarning"
)


def _data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 5)).astype("float32")
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype("int32") + (x[:, 2] > 1)
    return x, y.astype("int32")


def _model(seed=0, fisher=False, spe=1):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(4, activation="tanh"),
        keras.layers.Dense(3),
    ])
    if fisher:
        keras_ginger.with_fisher(model, seed=seed)
    model.compile(
        optimizer=keras_ginger.Ginger(learning_rate=0.05, tau=3,
                                      damping=1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=spe,
    )
    return model


class Recorder(keras.callbacks.Callback):
    """Reads get_curvature() directly at every batch end (and epoch end)."""

    def __init__(self):
        super().__init__()
        self.seen = {}  # step -> {path: (U, sigma)}

    def _record(self):
        model = self.model  # syncs the JAX state
        opt = model.optimizer
        step = int(ops.convert_to_numpy(opt.iterations))
        self.seen[step] = {
            v.path: tuple(np.asarray(ops.convert_to_numpy(t), np.float64)
                          for t in opt.get_curvature(v))
            for v in model.trainable_variables
        }

    def on_train_batch_end(self, batch, logs=None):
        self._record()

    def on_epoch_end(self, epoch, logs=None):
        self._record()


def _ortho(U):
    k = U.shape[1]
    return np.linalg.norm(U.T @ U - np.eye(k), "fro")


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("spe", [
    1,
    pytest.param(2, marks=pytest.mark.skipif(
        BACKEND == "torch",
        reason="Keras: steps_per_execution must be 1 with PyTorch")),
])
def test_csv_rows_equal_get_curvature(tmp_path, spe):
    x, y = _data()
    model = _model(spe=spe)
    path = os.path.join(tmp_path, "curv.csv")
    logger = CurvatureLogger(csv_path=path, every_n_steps=2)
    rec = Recorder()
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[logger, rec])
    rows = _read_csv(path)
    paths = [v.path for v in model.trainable_variables]
    # 12 batches, logged every 2nd: steps 2, 4, ..., 12, each variable once.
    steps = sorted({int(r["step"]) for r in rows})
    assert steps == [2, 4, 6, 8, 10, 12]
    assert len(rows) == len(steps) * len(paths)
    assert list(rows[0]) == ["step", "epoch", "variable", "k",
                             "orthogonality_error", "sigma_0", "sigma_1",
                             "sigma_2"]
    for r in rows:
        step = int(r["step"])
        assert int(r["epoch"]) == (step - 1) // 6
        U, sigma = rec.seen[step][r["variable"]]
        assert int(r["k"]) == U.shape[1] == 3
        got = np.array([float(r[f"sigma_{i}"]) for i in range(3)])
        np.testing.assert_array_equal(got, sigma)  # exact (repr round trip)
        assert float(r["orthogonality_error"]) == pytest.approx(
            _ortho(U), rel=1e-12, abs=1e-15)
    assert {r["variable"] for r in rows} == set(paths)
    # The curvature is real: σ > 0 and descending, U orthonormal.
    last = [r for r in rows if int(r["step"]) == 12]
    for r in last:
        s = [float(r[f"sigma_{i}"]) for i in range(3)]
        assert s[0] > 0 and s[0] >= s[1] >= s[2] >= 0
        assert float(r["orthogonality_error"]) < 1e-4
    # The in-memory records hold the same values.
    assert len(logger.records) == len(rows)
    for rec_row, r in zip(logger.records, rows):
        assert rec_row["variable"] == r["variable"]
        assert rec_row["step"] == int(r["step"])


def test_kronecker_factors_are_logged_per_side(tmp_path):
    """curvature="auto": each kernel's L and R are rows ``path:left`` and
    ``path:right`` holding that factor's σ (`get_curvature(side=)`)."""
    x, y = _data()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)),
                              keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(3)])
    opt = keras_ginger.Ginger(learning_rate=0.05, curvature="auto",
                              kronecker_full_size=4, kronecker_rank=2)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    path = os.path.join(tmp_path, "curv.csv")
    logger = CurvatureLogger(csv_path=path)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[logger])
    rows = {r["variable"]: r for r in _read_csv(path)}
    kernel = model.layers[0].kernel
    want = {f"{kernel.path}:left": 2, f"{kernel.path}:right": 4}
    for name, k in want.items():
        side = name.rsplit(":", 1)[1]
        _, sigma = opt.get_curvature(kernel, side=side)
        sigma = np.asarray(keras.ops.convert_to_numpy(sigma), np.float64)
        assert int(rows[name]["k"]) == k
        got = np.array([float(rows[name][f"sigma_{i}"])
                        for i in range(min(k, 3))])
        np.testing.assert_array_equal(got, sigma[:3])
        assert got[0] > 0
        assert float(rows[name]["orthogonality_error"]) < 1e-4
    bias = model.layers[0].bias.path  # a vector block: one row, no side
    assert bias in rows and f"{bias}:left" not in rows


def _tb_scalars(log_dir):
    import tensorflow as tf

    out = {}
    for f in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents*"))):
        for event in tf.compat.v1.train.summary_iterator(f):
            for v in event.summary.value:
                assert v.metadata.plugin_data.plugin_name == "scalars"
                out[(v.tag, event.step)] = float(tf.make_ndarray(v.tensor))
    return out


def test_tensorboard_scalars_equal_get_curvature(tmp_path):
    pytest.importorskip("tensorflow")
    x, y = _data()
    model = _model(fisher=True)  # also with the Fisher train step
    log_dir = os.path.join(tmp_path, "tb")
    logger = CurvatureLogger(log_dir=log_dir, top=2)  # at epoch ends
    rec = Recorder()
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0,
              callbacks=[logger, rec])
    scalars = _tb_scalars(log_dir)
    paths = [v.path for v in model.trainable_variables]
    # 3 batches per epoch: logged at steps 3, 6, 9; top=2 → σ0, σ1 + ortho.
    assert len(scalars) == 3 * len(paths) * 3
    for step in (3, 6, 9):
        for p in paths:
            U, sigma = rec.seen[step][p]
            base = f"curvature/{p}"
            for i in range(2):
                assert scalars[(f"{base}/sigma_{i}", step)] == float(
                    np.float32(sigma[i]))
            assert (f"{base}/sigma_2", step) not in scalars
            assert scalars[(f"{base}/orthogonality_error", step)] == float(
                np.float32(_ortho(U)))


def test_variable_selection_and_epoch_end(tmp_path):
    x, y = _data()
    model = _model()
    path = os.path.join(tmp_path, "sub", "curv.csv")
    kernel0 = model.trainable_variables[0]
    bias1 = model.trainable_variables[3]
    logger = CurvatureLogger(csv_path=path, top=1,
                             variables=[kernel0, bias1.path])
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
              callbacks=[logger])
    rows = _read_csv(path)
    assert [(int(r["step"]), int(r["epoch"]), r["variable"]) for r in rows] == [
        (3, 0, kernel0.path), (3, 0, bias1.path),
        (6, 1, kernel0.path), (6, 1, bias1.path)]
    assert "sigma_1" not in rows[0]
    _, sigma = model.optimizer.get_curvature(bias1)
    assert float(rows[-1]["sigma_0"]) == float(ops.convert_to_numpy(sigma)[0])

    # A regular expression selects by path; a pattern matching nothing fails.
    regex = CurvatureLogger(variables=["kernel$"], every_n_steps=3)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[regex])
    assert {r["variable"] for r in regex.records} == {
        v.path for v in model.trainable_variables if v.path.endswith("kernel")}
    bad = CurvatureLogger(variables=["no_such_variable"], every_n_steps=1)
    with pytest.raises(ValueError, match="no_such_variable"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[bad])


def _logged_csv(tmp_path):
    """(model, CSV path): one epoch (6 steps) logged at every step."""
    x, y = _data()
    model = _model()
    path = os.path.join(tmp_path, "curv.csv")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[CurvatureLogger(csv_path=path, every_n_steps=1)])
    return model, path


def test_plot_spectrum_writes_png(tmp_path):
    model, path = _logged_csv(tmp_path)
    data = kg_callbacks.read_curvature_csv(path)
    first = model.trainable_variables[0].path
    assert data[first]["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert data[first]["sigma"].shape == (6, 3)

    png = os.path.join(tmp_path, "all.png")
    assert plot_spectrum(path, png) == png
    one = os.path.join(tmp_path, "one.png")
    plot_spectrum(path, one, variable=first)
    for f in (png, one):
        with open(f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(f) > 5000
    with pytest.raises(ValueError, match="Available"):
        plot_spectrum(path, one, variable="nope")


def test_tensorboard_skipped_with_warning_without_tensorflow(
    tmp_path, monkeypatch
):
    def no_tf():
        raise ImportError("No module named 'tensorflow'")

    monkeypatch.setattr(kg_callbacks, "_import_tf_summary", no_tf)
    x, y = _data()
    model = _model()
    log_dir = os.path.join(tmp_path, "tb")
    path = os.path.join(tmp_path, "curv.csv")
    logger = CurvatureLogger(log_dir=log_dir, csv_path=path)
    with pytest.warns(UserWarning, match="TensorBoard logging .* skipped"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                  callbacks=[logger])
    assert not os.path.exists(log_dir)
    assert len(_read_csv(path)) == len(model.trainable_variables)


def test_append_and_second_fit(tmp_path):
    x, y = _data()
    model = _model()
    path = os.path.join(tmp_path, "curv.csv")
    logger = CurvatureLogger(csv_path=path, top=2)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[logger])
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[logger])
    again = CurvatureLogger(csv_path=path, top=2, append=True)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[again])
    steps = [int(r["step"]) for r in _read_csv(path)]
    n = len(model.trainable_variables)
    assert steps == [3] * n + [6] * n + [9] * n
    mismatch = CurvatureLogger(csv_path=path, top=1, append=True)
    with pytest.raises(ValueError, match="cannot append"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                  callbacks=[mismatch])


def test_needs_ginger_and_valid_arguments():
    x, y = _data()
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="Ginger"):
        model.fit(x, np.zeros((len(x), 3)), verbose=0,
                  callbacks=[CurvatureLogger()])
    with pytest.raises(ValueError, match="every_n_steps"):
        CurvatureLogger(every_n_steps=0)
    with pytest.raises(ValueError, match="top"):
        CurvatureLogger(top=0)


def test_through_loss_scale_optimizer_skipping_uncurved_variables():
    """Unwraps a LossScaleOptimizer; variables without curvature state
    (here excluded with exclude_from_curvature) are not logged."""
    x, y = _data()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    ginger = keras_ginger.Ginger(learning_rate=0.05, tau=2,
                                 exclude_from_curvature=["bias"])
    model.compile(
        optimizer=keras.optimizers.LossScaleOptimizer(ginger),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    logger = CurvatureLogger(every_n_steps=3)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[logger])
    kernel = model.trainable_variables[0]
    assert [(r["step"], r["variable"]) for r in logger.records] == [
        (3, kernel.path), (6, kernel.path)]
    _, sigma = ginger.get_curvature(kernel)
    np.testing.assert_array_equal(logger.records[-1]["sigma"],
                                  np.asarray(ops.convert_to_numpy(sigma),
                                             np.float64))


def test_nonfinite_batch_mid_fit_is_reported_and_never_saved(tmp_path):
    """A NaN batch in the middle of fit(): the saved checkpoint holds only
    finite state, training goes on, and the warning names variable and step."""
    import os
    import warnings as _warnings

    from keras_ginger.callbacks import NonFiniteReporter

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 5)).astype("float32")
    y = rng.integers(0, 3, 64)
    x[20] = np.nan  # batch 2 of 4 (batch size 16) is poisoned
    model = keras.Sequential([keras.Input((5,)),
                              keras.layers.Dense(3, name="head")])
    keras_ginger.with_fisher(model)
    model.compile(optimizer=keras_ginger.Ginger(learning_rate=0.05, tau=2),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    path = os.path.join(tmp_path, "ckpt.keras")
    reporter = NonFiniteReporter()
    with _warnings.catch_warnings(record=True) as caught:
        _warnings.simplefilter("always")
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                  callbacks=[reporter,
                             keras.callbacks.ModelCheckpoint(path)])
    msgs = [str(w.message) for w in caught
            if "non-finite" in str(w.message)]
    assert len(msgs) == 1
    assert "head/kernel" in msgs[0] or "head/bias" in msgs[0]
    assert "step 2" in msgs[0]
    loaded = keras.models.load_model(path)
    for v in loaded.optimizer.variables + loaded.weights:
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(v))), v.path
    assert int(loaded.optimizer.iterations) == 4


@pytest.mark.parametrize("spe", [
    1,
    pytest.param(4, marks=pytest.mark.skipif(
        BACKEND == "torch",
        reason="Keras: steps_per_execution must be 1 with PyTorch")),
])
def test_nonfinite_reporter_counts_batches_like_curvature_logger(spe):
    """every_n_steps means batches for both callbacks, also when one call
    runs several (steps_per_execution > 1): they fire at the same steps."""
    from keras_ginger.callbacks import NonFiniteReporter

    class BatchChecks(NonFiniteReporter):
        def _check(self):
            self.steps.append(int(self.model.optimizer.iterations))

        def on_epoch_end(self, epoch, logs=None):
            pass

        def on_train_end(self, logs=None):
            pass

    x, y = _data()
    model = _model(spe=spe)
    reporter = BatchChecks(every_n_steps=4)
    reporter.steps = []
    logger = CurvatureLogger(every_n_steps=4)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[reporter, logger])
    logged = sorted({r["step"] for r in logger.records})
    # 12 batches: every 4th with one batch per call; with 4 per call the
    # calls end at batches 4, 6, 10, 12 (Keras reports the 6th as the 8th:
    # capped at the epoch's 6), and 4, 10 (crossing 8), 12 fire.
    assert logged == ([4, 8, 12] if spe == 1 else [4, 10, 12])
    assert reporter.steps == logged


class _TwinWeights(keras.layers.Layer):
    """Two weights under one path (as a KerasHub T5's encoder and decoder
    `self_attention/embeddings`)."""

    def build(self, input_shape):
        self.a = self.add_weight((input_shape[-1], 3), name="twin")
        self.b = self.add_weight((input_shape[-1], 3), name="twin")

    def call(self, x):
        return x @ self.a + x @ self.b


def test_variables_sharing_a_path_get_unique_stable_names(tmp_path):
    x, y = _data()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), _TwinWeights(name="twins")])
    model.compile(optimizer=keras_ginger.Ginger(tau=2),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    a, b = model.trainable_variables
    assert a.path == b.path
    path = os.path.join(tmp_path, "curv.csv")
    model.fit(x, y, batch_size=16, epochs=2, verbose=0,
              callbacks=[CurvatureLogger(csv_path=path, every_n_steps=2)])
    opt = model.optimizer
    expected = {f"{a.path}[{opt._get_variable_index(v)}]" for v in (a, b)}
    data = kg_callbacks.read_curvature_csv(path)
    assert set(data) == expected
    for entry in data.values():  # one row per step per variable
        assert entry["step"].tolist() == sorted(set(entry["step"].tolist()))


def test_plot_spectrum_damping_line_and_top_variables(tmp_path, monkeypatch):
    import matplotlib.axes

    _, path = _logged_csv(tmp_path)
    data = kg_callbacks.read_curvature_csv(path)
    biggest = max(data, key=lambda n: data[n]["sigma"][-1, 0])
    titles, lines = [], []
    orig_title, orig_plot = matplotlib.axes.Axes.set_title, \
        matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda ax, t, **kw: titles.append(t)
                        or orig_title(ax, t, **kw))
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda ax, *a, **kw: lines.append((a, kw))
                        or orig_plot(ax, *a, **kw))
    png = os.path.join(tmp_path, "top.png")
    plot_spectrum(path, png, damping=1e-2, top_variables=1)
    assert titles == [biggest]
    (ref,) = [(a, kw) for a, kw in lines if kw.get("label") == "γ"]
    np.testing.assert_array_equal(ref[0][1], np.full(6, 1e-2))
    lines.clear()
    plot_spectrum(path, png, damping=0.1, relative_damping=True,
                  variable=biggest)
    (ref,) = [(a, kw) for a, kw in lines if kw.get("label") == "γ·σ₀"]
    np.testing.assert_allclose(ref[0][1], 0.1 * data[biggest]["sigma"][:, 0])
    with pytest.raises(ValueError, match="top_variables"):
        plot_spectrum(path, png, top_variables=0)
