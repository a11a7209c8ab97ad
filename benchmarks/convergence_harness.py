"""Running the convergence suite: optimizers, learning-rate grids, seeds.

Optimizers (`OPTIMIZERS`; name: how it is built):

* ginger: `keras_ginger.Ginger(tau=8)`, every other hyperparameter at the
  installed package's default (read with `inspect.signature`, never
  hard-coded here);
* ginger_paper: `Ginger(tau=8, graft=None, relative_damping=False,
  metric=None, learning_rate=5e-3, damping=1e-2)`, the paper's algorithm at
  the earlier defaults;
* ginger_euclid: `Ginger(tau=8, metric=None, damping=0.1)`, grafted to
  Adam with relative damping in the Euclidean metric (the default until
  2026-11-29 08:00; the "Ginger" rows of the suite's tables until then);
* ginger_kronecker: `Ginger(tau=8, curvature="auto")`, Kronecker blocks
  on every matrix-shaped variable (#23), the rest at the defaults;
* ginger_no_curvature: the default Ginger with `exclude_from_curvature=
  [".*"]`: no variable keeps curvature, each takes the scale rule's
  identity step;
* adam, adamw, lion, muon: `keras.optimizers.Adam/AdamW/Lion/Muon` at their
  defaults. Keras's Muon orthogonalises the momentum of 2-D variables only;
  every other variable (biases, norms, conv and attention kernels of 3 or
  more dimensions) and any whose path contains "embedding" takes its AdamW
  step (same learning rate, `adam_lr_ratio=1`);
* sgd_momentum: `keras.optimizers.SGD(momentum=0.9)`;
* psgd_kron: PSGD Kron (`distributed_kron.kron` at the package's
  defaults, wrapped by benchmarks/optax_peer.py; JAX backend only; not in
  the default selection);
* ginger_tau1 / ginger_tau4 / ginger_tau8: the default Ginger at that rank
  (not in the default selection; kept for the earlier tables and tests).

Each has a 5-point learning-rate grid (`lr_grid`; Ginger's are multiples of
its default learning rate); `--lr-points N` thins every grid to N points
that span it and keep the default.

Ginger always trains through `keras_ginger.with_fisher(model)` (sampled
Fisher); the other optimizers through the plain model. One model and
optimizer are compiled per (task, optimizer, fixed hyperparameters);
learning rates and seeds reuse the compiled train step: weights, optimizer
state, learning rate and every seed-generator state are reset between runs.
For a given seed every optimizer starts from the same initial weights and
sees the same batch order, for the same number of steps.

Seeds: on a task with `seed_protocol == "all"` every (lr, seed) pair runs;
on "select" (the expensive tasks) the grid runs with the first seed, then
the selected learning rate (and the default one, for the default rows) on
the other seeds. The learning rate is selected by the lowest mean best
validation loss (what early stopping would keep).
"""

import functools
import inspect
import math
import time

import numpy as np

from convergence_tasks import TASKS

_GINGER_GRID = (0.25, 0.5, 1.0, 2.0, 4.0)  # x the default learning rate
_ADAM_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)

# name: kind ("ginger" or a keras.optimizers class name), fixed keyword
# arguments, grid ("x": multiples of the default lr; "lr": absolute),
# label, colour, and whether its default-lr row is reported too.
OPTIMIZERS = {
    "ginger": dict(kind="ginger", kwargs={"tau": 8},
                   grid=("x", _GINGER_GRID), label="Ginger",
                   color="#a63603", default_row=True),
    "ginger_paper": dict(kind="ginger",
                         kwargs={"tau": 8, "graft": None,
                                 "relative_damping": False, "metric": None,
                                 "learning_rate": 5e-3, "damping": 1e-2},
                         grid=("x", _GINGER_GRID), label="Ginger (paper)",
                         color="#fd8d3c", default_row=False),
    "ginger_euclid": dict(kind="ginger",
                          kwargs={"tau": 8, "metric": None, "damping": 0.1},
                          grid=("x", _GINGER_GRID),
                          label="Ginger, Euclidean metric",
                          color="#6a3d9a", default_row=False),
    "ginger_no_curvature": dict(kind="ginger",
                                kwargs={"tau": 8,
                                        "exclude_from_curvature": [".*"]},
                                grid=("x", _GINGER_GRID),
                                label="Ginger, no curvature",
                                color="#8c6d31", default_row=False),
    "ginger_kronecker": dict(kind="ginger",
                             kwargs={"tau": 8, "curvature": "auto"},
                             grid=("x", _GINGER_GRID),
                             label="Ginger, Kronecker blocks",
                             color="#31a354", default_row=True),
    "adam": dict(kind="Adam", kwargs={}, grid=("lr", _ADAM_GRID),
                 label="Adam", color="tab:blue", default_row=True),
    "adamw": dict(kind="AdamW", kwargs={}, grid=("lr", _ADAM_GRID),
                  label="AdamW", color="tab:cyan", default_row=False),
    "lion": dict(kind="Lion", kwargs={},
                 grid=("lr", (3e-5, 1e-4, 3e-4, 1e-3, 3e-3)),
                 label="Lion", color="tab:purple", default_row=False),
    "muon": dict(kind="Muon", kwargs={}, grid=("lr", _ADAM_GRID),
                 label="Muon", color="tab:red", default_row=False),
    "sgd_momentum": dict(kind="SGD", kwargs={"momentum": 0.9},
                         grid=("lr", (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)),
                         label="SGD momentum 0.9", color="tab:green",
                         default_row=False),
    # PSGD Kron (distributed-kron, optax) through benchmarks/optax_peer.py;
    # JAX backend only.
    "psgd_kron": dict(kind="optax_psgd_kron", kwargs={},
                      grid=("lr", (3e-4, 1e-3, 3e-3, 1e-2)),
                      label="PSGD Kron", color="tab:olive",
                      default_row=False),
    # Earlier tables (Ginger's rank); not run unless asked for.
    "ginger_tau1": dict(kind="ginger", kwargs={"tau": 1},
                        grid=("x", _GINGER_GRID), label="Ginger τ=1",
                        color="#fdae6b", default_row=False),
    "ginger_tau4": dict(kind="ginger", kwargs={"tau": 4},
                        grid=("x", _GINGER_GRID), label="Ginger τ=4",
                        color="#e6550d", default_row=False),
    "ginger_tau8": dict(kind="ginger", kwargs={"tau": 8},
                        grid=("x", _GINGER_GRID), label="Ginger τ=8",
                        color="#7f2704", default_row=True),
}
DEFAULT_OPTIMIZERS = ["ginger", "ginger_paper", "ginger_no_curvature",
                      "adam", "adamw", "lion", "muon", "sgd_momentum"]
LABELS = {k: v["label"] for k, v in OPTIMIZERS.items()}
COLORS = {k: v["color"] for k, v in OPTIMIZERS.items()}


def _signature_defaults(cls):
    return {k: p.default for k, p in inspect.signature(cls).parameters.items()
            if p.default is not inspect.Parameter.empty
            and p.kind is not inspect.Parameter.VAR_KEYWORD}


@functools.lru_cache(maxsize=None)
def _ginger_defaults():
    from keras_ginger import Ginger

    return _signature_defaults(Ginger)


def ginger_defaults():
    """The installed `keras_ginger.Ginger`'s keyword defaults (a copy)."""
    return dict(_ginger_defaults())


def optimizer_class(name):
    kind = OPTIMIZERS[name]["kind"]
    if kind == "ginger":
        from keras_ginger import Ginger

        return Ginger
    import keras

    if kind == "optax_psgd_kron":
        if keras.backend.backend() != "jax":
            raise RuntimeError(
                f"{name}: an optax optimizer (distributed-kron), JAX backend "
                f"only; KERAS_BACKEND is {keras.backend.backend()!r}.")
        from optax_peer import psgd_kron

        return psgd_kron
    return getattr(keras.optimizers, kind)


def optimizer_kwargs(name):
    """The keyword arguments `name` is built with (besides the lr)."""
    spec = OPTIMIZERS[name]
    kw = dict(spec["kwargs"])
    kw.pop("learning_rate", None)
    return kw


def default_lr(name):
    """The learning rate `name` uses when none is given."""
    spec = OPTIMIZERS[name]
    if "learning_rate" in spec["kwargs"]:
        return float(spec["kwargs"]["learning_rate"])
    return float(_signature_defaults(optimizer_class(name))["learning_rate"])


def _thin(grid, points, keep):
    """`points` values spanning `grid`, with `keep` among them."""
    grid = sorted(grid)
    if points is None or points >= len(grid):
        return grid
    if points <= 1:
        return [keep]
    idx = sorted({int(round(i)) for i in
                  np.linspace(0, len(grid) - 1, points)})
    if keep in grid and grid.index(keep) not in idx:
        k = grid.index(keep)
        nearest = min(idx, key=lambda i: (abs(i - k), i))
        idx = sorted(set(idx) - {nearest} | {k})
    return [grid[i] for i in idx]


# name -> explicit learning rates (`convergence.py --lrs NAME=A,B,...`).
GRID_OVERRIDES = {}


def lr_grid(name, points=None):
    """The learning rates tried for `name` (`points` thins the grid).

    An entry in `GRID_OVERRIDES` replaces the grid (and is not thinned).
    """
    if name in GRID_OVERRIDES:
        return sorted(float(v) for v in GRID_OVERRIDES[name])
    mode, values = OPTIMIZERS[name]["grid"]
    d = default_lr(name)
    grid = ([float(f"{d * f:.6g}") for f in values] if mode == "x"
            else [float(v) for v in values])
    return _thin(grid, points, d)


def make_optimizer(name, lr, overrides=None):
    kw = optimizer_kwargs(name)
    kw.update(overrides or {})
    kw["learning_rate"] = lr
    return optimizer_class(name)(**kw)


def uses_fisher(name):
    return OPTIMIZERS[name]["kind"] == "ginger"


def _numpy(v):
    import keras

    return np.array(keras.ops.convert_to_numpy(v))


def _step_timer():
    import keras

    class StepTimer(keras.callbacks.Callback):
        """Wall time between consecutive train-batch ends within an epoch
        (the logs are read every batch, so each is a synchronised step)."""

        def __init__(self):
            super().__init__()
            self.steps = []
            self._last = None

        def on_epoch_begin(self, epoch, logs=None):
            self._last = None

        def on_train_batch_begin(self, batch, logs=None):
            if self._last is None:
                self._last = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            now = time.perf_counter()
            if batch > 0 and self._last is not None:
                self.steps.append(now - self._last)
            self._last = now

    return StepTimer()


class CompiledRun:
    """One compiled (task, optimizer); `run(lr, seed)` resets and trains."""

    def __init__(self, task, opt_name, overrides=None, init_cache=None,
                 run_eagerly=False, fisher=None):
        import keras
        from keras_ginger import with_fisher

        self.task = task
        self.opt_name = opt_name
        self.init_cache = {} if init_cache is None else init_cache
        model = task.build(0)
        # fisher: wrap with `with_fisher` (sampled-label d); None: for
        # Ginger. False gives Ginger d = g (the empirical Fisher).
        if uses_fisher(opt_name) if fisher is None else fisher:
            model = with_fisher(model)
        self.optimizer = make_optimizer(opt_name, 1e-3, overrides)
        task.compile(model, self.optimizer)
        if run_eagerly:
            model.run_eagerly = True
        self.model = model
        self._ensure_built()
        self.optimizer.build(model.trainable_variables)
        self.opt_init = [_numpy(v) for v in self.optimizer.variables]
        self.keras = keras

    def _first(self):
        (x, _, _), _ = self.task.data()
        return ({k: v[:1] for k, v in x.items()} if isinstance(x, dict)
                else x[:1])

    def _ensure_built(self):
        if not self.model.built or not self.model.trainable_variables:
            self.model(self._first())

    def init_weights(self, seed):
        key = (self.task.name, seed)
        if key not in self.init_cache:
            fresh = self.task.build(seed)
            if not fresh.built or not fresh.trainable_variables:
                fresh(self._first())
            self.init_cache[key] = fresh.get_weights()
        return self.init_cache[key]

    def run(self, lr, seed, epochs, steps_per_epoch=None, verbose=0):
        keras = self.keras
        self.model.set_weights(self.init_weights(seed))
        for v, value in zip(self.optimizer.variables, self.opt_init):
            v.assign(value)
        # Dropout and Fisher-sampling seeds: per run, not left over from the
        # previous run, so that a run does not depend on the run order.
        i = 0
        for v in self.model.non_trainable_variables:
            if "seed_generator_state" in v.path:
                i += 1
                v.assign(keras.ops.convert_to_tensor(
                    np.array([1000 * (seed + 1) + i, 0]), dtype=v.dtype))
        self.optimizer.learning_rate = lr
        keras.utils.set_random_seed(1000 + seed)  # batch order, dropout
        spe = steps_per_epoch or self.task.fixed_steps_per_epoch
        timer = _step_timer()
        t0 = time.perf_counter()
        history = self.model.fit(
            epochs=epochs, steps_per_epoch=spe, verbose=verbose,
            callbacks=[keras.callbacks.TerminateOnNaN(), timer],
            **self.task.fit_kwargs(seed))
        seconds = time.perf_counter() - t0
        hist = {k: [float(x) for x in v] for k, v in history.history.items()}
        self.task.add_metrics(hist)
        losses = hist.get("loss", [])
        vals = hist.get("val_loss", [])
        diverged = (len(losses) < epochs
                    or not all(math.isfinite(x) for x in losses + vals))
        final, final_s = None, 0.0
        if not diverged:
            t1 = time.perf_counter()
            final = self.task.final_metrics(self.model)
            final_s = time.perf_counter() - t1
        steps = epochs * (spe or self.task.steps_per_epoch())
        key, _, _ = self.task.metric
        if diverged:
            metric = math.nan
        elif final and key in final:
            metric = float(final[key])
        else:
            metric = hist[key][-1] if key in hist else math.nan
        ms = (1000 * float(np.median(timer.steps)) if timer.steps
              else 1000 * seconds / max(steps, 1))
        inf = math.inf
        return {
            "task": self.task.name,
            "optimizer": self.opt_name,
            "learning_rate": lr,
            "seed": seed,
            "epochs": epochs,
            "steps": steps,
            "history": hist,
            "final": final,
            "diverged": bool(diverged),
            "train_loss": losses[-1] if not diverged else inf,
            "val_loss": vals[-1] if not diverged else inf,
            "best_val_loss": min(vals) if not diverged else inf,
            "metric": metric,
            "ms_per_step": round(ms, 3),
            "seconds": round(seconds, 3),
            "final_seconds": round(final_s, 3),
        }


def _mean(xs):
    xs = list(xs)
    return float(np.mean(xs)) if xs and all(map(math.isfinite, xs)) else math.inf


def select_lr(runs):
    """lr with the lowest mean best validation loss (diverged = inf), over
    the seeds every lr was run with (the grid's seed where the others ran
    only at the selected lr: an lr is not chosen for a lucky single seed)."""
    seeds = {}
    for r in runs:
        seeds.setdefault(r["learning_rate"], set()).add(r.get("seed"))
    common = set.intersection(*seeds.values()) if seeds else set()
    by_lr = {}
    for r in runs:
        if r.get("seed") in common:
            by_lr.setdefault(r["learning_rate"], []).append(
                r["best_val_loss"])
    return min(sorted(by_lr), key=lambda lr: _mean(by_lr[lr]))


def run_suite(task_names, opt_names, seeds, *, epochs_scale=1.0,
              steps_per_epoch=None, epochs=None, grid=True, lr_points=None,
              quick=False, verbose=0, log=print, run_eagerly=False,
              task_info=None):
    """Every (task, optimizer): the grid and seeds by the task's protocol.

    Returns (runs, timings); `task_info` (a dict) receives each task's
    `describe()`.
    """
    runs = []
    timings = {}
    for tname in task_names:
        task = TASKS[tname](quick=quick)
        t_epochs = epochs or max(1, int(round(task.epochs * epochs_scale)))
        init_cache = {}
        for oname in opt_names:
            t0 = time.perf_counter()
            cr = CompiledRun(task, oname, init_cache=init_cache,
                             run_eagerly=run_eagerly)
            dl = default_lr(oname)
            lrs = lr_grid(oname, lr_points) if grid else [dl]
            if OPTIMIZERS[oname]["default_row"] and dl not in lrs:
                lrs.append(dl)
            done = []

            def go(lr, seed):
                r = cr.run(lr, seed, t_epochs, steps_per_epoch, verbose)
                extra = ""
                if r["final"]:
                    extra = " " + " ".join(
                        f"{k}={v:.3g}" for k, v in r["final"].items()
                        if isinstance(v, float))
                log(f"  {tname:<14}{oname:<20} lr={lr:<9.3g} seed={seed} "
                    f"train={r['train_loss']:.4g} "
                    f"val={r['best_val_loss']:.4g}/{r['val_loss']:.4g}"
                    f"{extra} {'DIVERGED ' if r['diverged'] else ''}"
                    f"({r['seconds']:.1f}s, {r['ms_per_step']:.1f} ms/step)")
                done.append(r)

            if task.seed_protocol == "all" or len(lrs) == 1:
                for lr in lrs:
                    for s in seeds:
                        go(lr, s)
            else:
                for lr in lrs:
                    go(lr, seeds[0])
                best = select_lr(done)
                extra = {best}
                if OPTIMIZERS[oname]["default_row"]:
                    extra.add(dl)
                for lr in sorted(extra):
                    for s in seeds[1:]:
                        go(lr, s)
            runs.extend(done)
            timings[f"{tname}/{oname}"] = round(time.perf_counter() - t0, 1)
            del cr
        if task_info is not None:
            task_info[tname] = task.describe()
    return runs, timings


# -------------------------------------------------------------------- sweep
SWEEP_LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
SWEEP_DAMPINGS = [1e-3, 1e-2, 1e-1, 1.0]


def sweep_candidates(args):
    """[(lr, damping, beta_2, global_clipnorm)]: --sweep-candidates, else
    the lr x damping grid at the default beta_2 plus the other beta_2 at
    the defaults (no clipping)."""
    gd = ginger_defaults()
    b2 = gd["beta_2"]
    if args.sweep_candidates:
        out = []
        for spec in args.sweep_candidates:
            parts = [float(p) for p in spec.split(":")]
            out.append((parts[0], parts[1],
                        parts[2] if len(parts) > 2 else b2,
                        parts[3] if len(parts) > 3 else None))
        return out
    out = [(lr, d, b2, None) for d in args.sweep_dampings
           for lr in args.sweep_lrs]
    out += [(gd["learning_rate"], gd["damping"], b, None)
            for b in args.sweep_beta2s if b != b2]
    return out


def run_sweep(task_names, seeds, candidates, verbose, log):
    """Adam() and Ginger(tau=8) at each (lr, damping, beta_2, clip); Ginger's
    other hyperparameters at the package defaults."""
    runs = []
    adam_lr = default_lr("adam")
    for tname in task_names:
        task = TASKS[tname]()
        init_cache = {}
        cr = CompiledRun(task, "adam", init_cache=init_cache)
        adam = []
        for s in seeds:
            r = cr.run(adam_lr, s, task.epochs, None, verbose)
            r.update(damping=None, beta_2=None, global_clipnorm=None)
            adam.append(r)
        runs += adam
        log(f"{tname}: Adam() train={_mean(r['train_loss'] for r in adam):.4g}"
            f" best val={_mean(r['best_val_loss'] for r in adam):.4g}")
        groups = {}
        for lr, d, b2, clip in candidates:
            groups.setdefault((d, b2, clip), []).append(lr)
        for (d, b2, clip), lrs in groups.items():
            overrides = {"damping": d, "beta_2": b2}
            if clip:
                overrides["global_clipnorm"] = clip
            cr = CompiledRun(task, "ginger", overrides=overrides,
                             init_cache=init_cache)
            for lr in lrs:
                these = []
                for s in seeds:
                    r = cr.run(lr, s, task.epochs, None, verbose)
                    r.update(damping=d, beta_2=b2, global_clipnorm=clip)
                    these.append(r)
                runs += these
                log(f"  {tname:<14} lr={lr:<7g} damping={d:<6g} "
                    f"beta_2={b2:<6g} clip={clip} "
                    f"train={_mean(r['train_loss'] for r in these):.4g} "
                    f"best val={_mean(r['best_val_loss'] for r in these):.4g}")
    return runs
