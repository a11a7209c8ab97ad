"""Keras callbacks to inspect Ginger's curvature during training.

`CurvatureLogger` records, for every variable Ginger keeps curvature for,
the largest eigenvalues σ of its rank-k estimate U diag(σ) Uᵀ and the loss
of orthogonality ‖UᵀU − I‖_F of its basis, to TensorBoard and/or a CSV
file; `plot_spectrum` renders such a CSV as a PNG (σ over training).

    from keras_ginger.callbacks import CurvatureLogger, plot_spectrum

    logger = CurvatureLogger(log_dir="logs/curvature",
                             csv_path="curvature.csv", every_n_steps=50)
    model.fit(x, y, callbacks=[logger])
    plot_spectrum("curvature.csv", "spectrum.png")

TensorBoard files are written with `tf.summary` (as Keras's own
`keras.callbacks.TensorBoard` does), on any backend, when TensorFlow can be
imported; otherwise that part is skipped with a warning. Matplotlib is only
imported by `plot_spectrum` (an optional dependency).
"""

import csv
import math
import os
import re
import warnings

import keras
import numpy as np
from keras import ops

from keras_ginger import _keras_compat
from keras_ginger.train_step import unwrap_optimizer
from keras_ginger.optimizer import _check_positive_int

__all__ = ["CurvatureLogger", "plot_spectrum", "read_curvature_csv"]

_FIXED_COLUMNS = ["step", "epoch", "variable", "k", "orthogonality_error"]


def _ginger_of(optimizer):
    """The optimizer that has `get_curvature` (unwrapping a
    `keras.optimizers.LossScaleOptimizer`), or None."""
    return unwrap_optimizer(optimizer, "get_curvature")[0]


def _import_tf_summary():
    """`tensorflow.summary` and the `SummaryMetadata` proto class.

    A module-level function so that tests can simulate a missing TensorFlow.
    """
    import tensorflow as tf

    return tf.summary, tf.compat.v1.SummaryMetadata


class _EveryNBatches:
    """Counts training batches across epochs, as Keras's
    `TensorBoard(update_freq=n)` does, and says when the count crosses a
    multiple of n. With ``steps_per_execution > 1`` one `on_train_batch_end`
    ends several batches: ``batch`` is the index of the last one, which
    Keras reports as if the epoch's last, partial execution were full, so it
    is capped at the epoch's length (``steps``, from the callback's
    `params`) when that is known."""

    def __init__(self, n):
        self.n = n
        self.seen = 0
        self.in_epoch = 0

    def new_epoch(self):
        self.in_epoch = 0

    def batch_end(self, batch, steps=None):
        """Count the batches up to ``batch``; True when a multiple of n was
        crossed (always False when n is None)."""
        done = int(batch) + 1
        if steps:
            done = min(done, int(steps))
        new = max(done - self.in_epoch, 1)
        self.in_epoch = done
        before = self.seen
        self.seen += new
        return self.n is not None and self.seen // self.n > before // self.n


def _sigma_column(i):
    return f"sigma_{i}"


class CurvatureLogger(keras.callbacks.Callback):
    """Logs Ginger's curvature spectrum and basis orthogonality.

    For each selected variable (flattened to n entries) Ginger keeps the
    rank-k estimate U diag(σ) Uᵀ, k = min(τ, n) (`Ginger.get_curvature`).
    At each logging point this callback records, per variable:

    * ``sigma_0 ≥ sigma_1 ≥ …``: the ``top`` largest eigenvalues σ;
    * ``orthogonality_error``: ‖UᵀU − I‖_F (Frobenius), computed in float64
      from the float32 U. It stays at float32 round-off (≲ 1e-5) in a
      healthy run; growth means the basis is drifting.

    A variable with a Kronecker block (``curvature="auto"``) has two such
    factors, L and R (`Ginger.curvature_factors`), logged as
    ``<name>:left`` and ``<name>:right``.

    The optimizer step (``optimizer.iterations``) is the x-axis everywhere.
    A variable is named by its path, or ``path[i]`` (i its index in the
    optimizer) where several variables share a path, as a KerasHub T5's
    encoder and decoder ``self_attention/embeddings`` do.

    Outputs (any combination; with neither, values are only kept in
    `records`):

    * TensorBoard (``log_dir``): scalars ``curvature/<name>/sigma_<i>``
      and ``curvature/<name>/orthogonality_error`` at that step,
      written with `tf.summary` (TensorBoard's scalar format, also on the
      JAX and torch backends; the `tensorboard` package is needed only to
      view them). If TensorFlow cannot be imported, TensorBoard logging is
      skipped with a warning.
    * CSV (``csv_path``): one row per (logging point, variable) with columns
      ``step, epoch, variable, k, orthogonality_error, sigma_0, …,
      sigma_<top-1>`` (empty where a variable has fewer than ``top``
      eigenvalues). The file is flushed after each logging point. Read it
      with `read_curvature_csv`, plot it with `plot_spectrum`.

    Args:
        log_dir: directory for TensorBoard event files, or None.
        csv_path: path of the CSV file, or None.
        every_n_steps: None to log at the end of every epoch; an int n to
            log every n training batches (counted across epochs, as Keras's
            `TensorBoard(update_freq=n)` counts them; with
            ``gradient_accumulation_steps=a`` pick n a multiple of a, since
            the curvature only changes every a batches).
        top: how many of the largest eigenvalues to record per variable;
            None records all k.
        variables: None for every trainable variable Ginger keeps curvature
            for; or a list whose entries are variables, or strings matched
            against ``variable.path`` (exact match, else `re.search`). An
            entry that matches no variable is an error.
        append: if True, append to an existing CSV file (its header must
            match) instead of overwriting it.

    Attributes:
        records: list of dicts ``{"step", "epoch", "variable", "sigma"
            (np.ndarray, the top eigenvalues), "orthogonality_error"}``, one
            per (logging point, variable), in order.

    Works with `Ginger` and with a `keras.optimizers.LossScaleOptimizer`
    wrapping it; any other optimizer is an error at the start of training.
    """

    def __init__(
        self,
        log_dir=None,
        csv_path=None,
        every_n_steps=None,
        top=None,
        variables=None,
        append=False,
    ):
        super().__init__()
        _check_positive_int("every_n_steps", every_n_steps, allow_none=True)
        _check_positive_int("top", top, allow_none=True)
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.csv_path = None if csv_path is None else os.fspath(csv_path)
        self.every_n_steps = every_n_steps
        self.top = top
        self.variables = None if variables is None else list(variables)
        self.append = bool(append)
        self.records = []
        self._writer = None
        self._summary = None
        self._metadata = None
        self._tb_disabled = False
        self._csv_file = None
        self._csv_writer = None
        self._columns = None
        self._clock = _EveryNBatches(every_n_steps)
        self._epoch = 0
        self._last_step = None
        self._opt = None
        self._selected = None

    # ------------------------------------------------------------ callbacks
    def on_train_begin(self, logs=None):
        opt = _ginger_of(getattr(self.model, "optimizer", None))
        if opt is None:
            raise ValueError(
                "CurvatureLogger needs a model compiled with "
                "keras_ginger.Ginger (or a LossScaleOptimizer wrapping it). "
                f"Received optimizer: {getattr(self.model, 'optimizer', None)}"
            )
        self._opt = opt
        self._selected = None  # resolved once the optimizer is built
        self._last_step = None
        if self.log_dir is not None and not self._tb_disabled:
            try:
                self._summary, metadata_cls = _import_tf_summary()
            except ImportError as exc:
                self._tb_disabled = True
                warnings.warn(
                    "CurvatureLogger: TensorFlow cannot be imported "
                    f"({exc}); TensorBoard logging to {self.log_dir!r} is "
                    "skipped. Install tensorflow (or tensorflow-cpu) for it; "
                    "the CSV output does not need it.",
                    stacklevel=2,
                )
            else:
                # The metadata TensorBoard's own `tf.summary.scalar` attaches
                # (scalar plugin, ScalarPluginData version 0 = empty content):
                # written through `tf.summary.write`, which is part of
                # TensorFlow itself and works without the `tensorboard`
                # package installed.
                self._metadata = metadata_cls(
                    plugin_data=metadata_cls.PluginData(
                        plugin_name="scalars", content=b""
                    )
                )

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = int(epoch)
        self._clock.new_epoch()

    def on_train_batch_end(self, batch, logs=None):
        if self._clock.batch_end(batch, self.params.get("steps")):
            self._log()

    def on_epoch_end(self, epoch, logs=None):
        if self.every_n_steps is None:
            self._log()

    def on_train_end(self, logs=None):
        self._close()

    # -------------------------------------------------------------- logging
    def _resolve_variables(self):
        opt = self._opt
        candidates = []
        for var in self.model.trainable_variables:
            try:
                opt.curvature_factors(var)
            except (KeyError, ValueError):
                continue  # not tracked, or no curvature state
            candidates.append(var)
        if self.variables is None:
            return candidates
        chosen, seen = [], set()
        for entry in self.variables:
            if isinstance(entry, str):
                matches = [v for v in candidates if v.path == entry]
                if not matches:
                    matches = [v for v in candidates
                               if re.search(entry, v.path)]
            else:
                matches = [v for v in candidates if v is entry]
            if not matches:
                raise ValueError(
                    f"CurvatureLogger: `variables` entry {entry!r} matches no "
                    "variable with Ginger curvature. Available: "
                    f"{[v.path for v in candidates]}"
                )
            for v in matches:
                if id(v) not in seen:
                    seen.add(id(v))
                    chosen.append(v)
        return chosen

    def _names(self):
        """A unique, stable name per selected variable: its path, and where
        several variables share a path (e.g. a KerasHub T5's encoder and
        decoder `self_attention/embeddings`), the path with the optimizer's
        variable index, ``path[index]``."""
        paths = [v.path for v in self._selected]
        return [
            p if paths.count(p) == 1
            else f"{p}[{_keras_compat.variable_index(self._opt, v)}]"
            for p, v in zip(paths, self._selected)
        ]

    def _snapshot(self):
        """(step, [(name, sigma_top, ortho_err, k)]) read from the optimizer."""
        opt = self._opt
        step = int(ops.convert_to_numpy(opt.iterations))
        rows = []
        for name, var in zip(self._names(), self._selected):
            for label, U, sigma in opt.curvature_factors(var):
                U = np.asarray(ops.convert_to_numpy(U), np.float64)
                sigma = np.asarray(ops.convert_to_numpy(sigma), np.float64)
                k = U.shape[1]
                gram = U.T @ U - np.eye(k)
                ortho = float(np.sqrt(np.sum(gram * gram)))
                top = sigma if self.top is None else sigma[: self.top]
                rows.append((f"{name}:{label}" if label else name, top,
                             ortho, k))
        return step, rows

    def _log(self):
        # Reading `self.model` (not `self._model`) makes the JAX trainer
        # write its training state back into the variables first.
        _ = self.model
        if self._opt is None or not self._opt.built:
            return
        if self._selected is None:
            self._selected = self._resolve_variables()
        step, rows = self._snapshot()
        if step == self._last_step:
            return  # e.g. nothing trained since the last logging point
        self._last_step = step
        for path, sigma, ortho, k in rows:
            self.records.append({
                "step": step,
                "epoch": self._epoch,
                "variable": path,
                "sigma": sigma,
                "orthogonality_error": ortho,
            })
        if self.csv_path is not None:
            self._write_csv(step, rows)
        if self.log_dir is not None and self._summary is not None:
            self._write_tensorboard(step, rows)

    def _write_csv(self, step, rows):
        if self._csv_writer is None:
            top = self.top
            if top is None:
                top = max([k for *_, k in rows] + [1])
            columns = _FIXED_COLUMNS + [_sigma_column(i) for i in range(top)]
            mode = "w"
            if self.append and os.path.exists(self.csv_path) and (
                os.path.getsize(self.csv_path) > 0
            ):
                with open(self.csv_path, newline="") as f:
                    header = next(csv.reader(f), None)
                if header != columns:
                    raise ValueError(
                        f"CurvatureLogger: cannot append to {self.csv_path!r}:"
                        f" its columns {header} differ from {columns}."
                    )
                mode = "a"
            directory = os.path.dirname(self.csv_path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            self._csv_file = open(self.csv_path, mode, newline="")
            self._csv_writer = csv.writer(self._csv_file)
            self._columns = columns
            if mode == "w":
                self._csv_writer.writerow(columns)
            # A later fit() on the same callback appends to this file.
            self.append = True
        n_sigma = len(self._columns) - len(_FIXED_COLUMNS)
        for path, sigma, ortho, k in rows:
            values = [repr(float(s)) for s in sigma[:n_sigma]]
            values += [""] * (n_sigma - len(values))
            self._csv_writer.writerow(
                [step, self._epoch, path, k, repr(ortho)] + values
            )
        self._csv_file.flush()

    def _write_tensorboard(self, step, rows):
        summary = self._summary
        if self._writer is None:
            self._writer = summary.create_file_writer(self.log_dir)
        with self._writer.as_default():
            for path, sigma, ortho, k in rows:
                base = f"curvature/{path}"
                for i, s in enumerate(sigma):
                    summary.write(
                        f"{base}/{_sigma_column(i)}",
                        np.float32(s),
                        step=step,
                        metadata=self._metadata,
                    )
                summary.write(
                    f"{base}/orthogonality_error",
                    np.float32(ortho),
                    step=step,
                    metadata=self._metadata,
                )
        self._writer.flush()

    def _close(self):
        if self._csv_file is not None:
            self._csv_file.close()
            self._csv_file = None
            self._csv_writer = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# --------------------------------------------------------------------------
# Non-finite gradients


class NonFiniteReporter(keras.callbacks.Callback):
    """Warns, naming the variable and step, when Ginger guarded a non-finite
    gradient or Fisher gradient.

    Ginger never writes a non-finite value into a variable, its momentum or
    its curvature (that update is skipped for the variable concerned) and
    records the last such event; this callback reads it every
    `every_n_steps` batches (default: at each epoch end) and warns once per
    new event, e.g. "Ginger: non-finite gradient or Fisher gradient for
    variable 'dense/kernel' at optimizer step 17 …".

    Args:
        every_n_steps: None to check at each epoch end, or an int n to
            check every n training batches (counted as `CurvatureLogger`
            counts them, also under ``steps_per_execution > 1``).
        raise_error: raise `FloatingPointError` instead of warning.
    """

    def __init__(self, every_n_steps=None, raise_error=False):
        super().__init__()
        _check_positive_int("every_n_steps", every_n_steps, allow_none=True)
        self.every_n_steps = every_n_steps
        self.raise_error = raise_error
        self.reports = []
        self._clock = _EveryNBatches(every_n_steps)

    def _check(self):
        ginger = _ginger_of(self.model.optimizer)
        if ginger is None or not ginger.built:
            return
        report = ginger.nonfinite_report()
        if report is None or (self.reports and self.reports[-1] == report):
            return
        self.reports.append(report)
        if self.raise_error:
            raise FloatingPointError(report)
        warnings.warn(report, RuntimeWarning, stacklevel=2)

    def on_epoch_begin(self, epoch, logs=None):
        self._clock.new_epoch()

    def on_train_batch_end(self, batch, logs=None):
        # Batches, not calls: with steps_per_execution > 1 one call ends
        # several (as CurvatureLogger counts them).
        if self._clock.batch_end(batch, self.params.get("steps")):
            self._check()

    def on_epoch_end(self, epoch, logs=None):
        self._check()

    def on_train_end(self, logs=None):
        self._check()


# --------------------------------------------------------------------------
# Reading and plotting the CSV


def read_curvature_csv(csv_path):
    """Parses a `CurvatureLogger` CSV.

    Returns:
        dict: variable path → dict with ``"step"`` (int array, T),
        ``"epoch"`` (int array, T), ``"orthogonality_error"`` (float array,
        T) and ``"sigma"`` (float array, T × top; NaN where the variable has
        fewer eigenvalues), rows in file order.
    """
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in _FIXED_COLUMNS if c not in columns]
        if missing:
            raise ValueError(
                f"{csv_path!r} is not a CurvatureLogger CSV: missing "
                f"columns {missing}."
            )
        sigma_cols = [c for c in columns if c.startswith("sigma_")]
        out = {}
        for row in reader:
            entry = out.setdefault(row["variable"], {
                "step": [], "epoch": [], "orthogonality_error": [],
                "sigma": [],
            })
            entry["step"].append(int(row["step"]))
            entry["epoch"].append(int(row["epoch"]))
            entry["orthogonality_error"].append(
                float(row["orthogonality_error"]))
            entry["sigma"].append([
                float(row[c]) if row[c] != "" else math.nan
                for c in sigma_cols
            ])
    for entry in out.values():
        entry["step"] = np.asarray(entry["step"], np.int64)
        entry["epoch"] = np.asarray(entry["epoch"], np.int64)
        entry["orthogonality_error"] = np.asarray(
            entry["orthogonality_error"], np.float64)
        entry["sigma"] = np.asarray(entry["sigma"], np.float64).reshape(
            len(entry["step"]), len(sigma_cols))
    return out


def plot_spectrum(csv_path, png_path, variable=None, damping=None,
                  relative_damping=False, top_variables=None):
    """Renders the curvature spectrum over training as a PNG.

    One panel per variable: each recorded eigenvalue σᵢ against the
    optimizer step, on a log scale (zero eigenvalues, i.e. directions not
    yet seen, are left out). Needs matplotlib (imported here only).

    Args:
        csv_path: a CSV written by `CurvatureLogger`.
        png_path: where to write the PNG.
        variable: None for every variable in the file, or one variable name
            (as in the CSV's ``variable`` column).
        damping: None, or Ginger's γ (``optimizer.damping``), drawn as a
            dashed reference line: directions with σ well below it are
            steps at the damping's scale, those well above it are curved.
        relative_damping: with ``damping``, draw γ·σ₀ (the damping Ginger
            uses with ``relative_damping=True``) instead of γ.
        top_variables: None for every variable; an int N for the N
            variables with the largest last σ₀ (a big model has hundreds).

    Returns:
        ``png_path``.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "plot_spectrum needs matplotlib: `pip install matplotlib`."
        ) from exc
    data = read_curvature_csv(csv_path)
    if not data:
        raise ValueError(f"{csv_path!r} has no curvature records.")
    if variable is not None:
        if variable not in data:
            raise ValueError(
                f"Variable {variable!r} is not in {csv_path!r}. "
                f"Available: {sorted(data)}"
            )
        data = {variable: data[variable]}
    if top_variables is not None:
        _check_positive_int("top_variables", top_variables)
        ranked = sorted(data, key=lambda n: -np.nan_to_num(
            data[n]["sigma"][-1, 0], nan=-np.inf))
        data = {n: data[n] for n in ranked[:top_variables]}
    names = list(data)
    cols = min(len(names), 2)
    nrows = math.ceil(len(names) / cols)
    # No pyplot: a standalone Figure leaves matplotlib's global state alone.
    fig = Figure(figsize=(6.0 * cols, 3.6 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(nrows, cols, i + 1)
        entry = data[name]
        steps, sigma = entry["step"], entry["sigma"]
        plotted = False
        for j in range(sigma.shape[1]):
            s = np.where(sigma[:, j] > 0, sigma[:, j], np.nan)
            if np.all(np.isnan(s)):
                continue
            ax.plot(steps, s, marker="." if len(steps) < 30 else None,
                    linewidth=1.2, label=f"σ{j}")
            plotted = True
        if damping is not None:
            line = (damping * sigma[:, 0] if relative_damping
                    else np.full(len(steps), float(damping)))
            line = np.where(line > 0, line, np.nan)
            if not np.all(np.isnan(line)):
                ax.plot(steps, line, "k--", linewidth=1.0,
                        label="γ·σ₀" if relative_damping else "γ")
                plotted = True
        if plotted:
            ax.set_yscale("log")
            if sigma.shape[1] <= 10:
                ax.legend(fontsize="small", ncol=2)
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("eigenvalue σ")
        ax.grid(True, which="both", alpha=0.3)
    directory = os.path.dirname(os.fspath(png_path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    return png_path
