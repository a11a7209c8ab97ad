"""Convergence suite: Ginger vs Adam, AdamW, Lion, Muon and SGD-momentum.

    KERAS_BACKEND=jax python benchmarks/convergence.py            # full suite
    KERAS_BACKEND=jax python benchmarks/convergence.py --quick    # smoke run
    KERAS_BACKEND=jax python benchmarks/convergence.py --sweep    # lr x damping
    KERAS_BACKEND=jax python benchmarks/convergence.py \\
        --tasks char_lm embeddings --optimizers ginger adam --lr-points 3

The suite lives in three modules; this file is the command line:

* convergence_tasks.py: the tasks (digits, breast_cancer, diabetes,
  aclsum_t5, char_lm, embeddings, t5_finetune) and their data, all offline;
* convergence_harness.py: the optimizers and their learning-rate grids,
  `CompiledRun` (one compiled model per task and optimizer, reset between
  runs), `run_suite` (seeds and learning-rate selection), the `--sweep`;
* convergence_report.py: the summary rows, the markdown table, one plot
  per task and the JSON.

Protocol. Every optimizer gets the same model, the same initial weights and
batch order for a given seed, and the same number of steps. Each optimizer
has a 5-point learning-rate grid (`--lr-points` thins it); Ginger's other
hyperparameters are the installed package's defaults. On the small tasks
every (learning rate, seed) pair runs; on the expensive ones (aclsum_t5,
char_lm, embeddings, t5_finetune) the grid runs with the first seed and the
selected learning rate (and the default one, for `Adam()` and
`Ginger(tau=8)`) is then rerun with the other seeds. The learning rate is
selected by the best validation loss over the epochs (what early stopping
would keep), mean over the seeds run. Ginger always trains through
`keras_ginger.with_fisher` (sampled-label Fisher).

Outputs (under --out, default benchmarks/results/):

* convergence.json: machine, versions, protocol and every run's curves;
* convergence.md: the table, dated and with the machine named;
* convergence_<task>.png: training and validation loss curves (mean over
  seeds, min-max band) of each optimizer at its selected learning rate,
  and of `Adam()` / `Ginger(tau=8)` at their defaults.

`--sweep` instead runs Ginger(tau=8) over a learning-rate x damping grid
(and beta_2) on the scikit-learn tasks and writes convergence_sweep.{json,md}.
"""

import argparse
import datetime
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, ROOT, os.path.join(ROOT, "examples")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

RESULTS = os.path.join(HERE, "results")

# Re-exported: tests and scripts import these from `convergence`.
from convergence_tasks import (  # noqa: E402,F401
    TASKS, AclsumT5, BreastCancer, CharLM, Diabetes, Digits, Embeddings,
    T5Finetune, Task)
from convergence_harness import (  # noqa: E402,F401
    COLORS, DEFAULT_OPTIMIZERS, GRID_OVERRIDES, LABELS, OPTIMIZERS,
    SWEEP_DAMPINGS, SWEEP_LRS, CompiledRun, default_lr, ginger_defaults,
    lr_grid, make_optimizer, run_suite, run_sweep, select_lr, sweep_candidates)
from convergence_report import (  # noqa: E402,F401
    _jsonable, machine_info, markdown, plot_task, summarize, sweep_markdown,
    sweep_summary, write_outputs)

SWEEP_TASKS = ("digits", "breast_cancer", "diabetes")


def __getattr__(name):
    # The former constants, now read from the installed packages.
    if name == "GINGER_DEFAULTS":
        return ginger_defaults()
    if name == "ADAM_DEFAULT_LR":
        return default_lr("adam")
    raise AttributeError(name)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=None,
                   help="default: all (with --sweep: the scikit-learn ones)")
    p.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS),
                   default=list(DEFAULT_OPTIMIZERS),
                   help="default: " + " ".join(DEFAULT_OPTIMIZERS))
    p.add_argument("--seeds", type=int, default=3, help="number of seeds")
    p.add_argument("--lr-points", type=int, default=None, metavar="N",
                   help="thin every learning-rate grid to N points (1: the "
                        "default learning rate only)")
    p.add_argument("--lrs", nargs="+", default=[], metavar="NAME=LR,LR,...",
                   help="explicit learning-rate grid for an optimizer "
                        "(e.g. muon=0.003,0.01,0.03); not thinned")
    p.add_argument("--epochs-scale", type=float, default=1.0,
                   help="multiply every task's epoch budget")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 seed, default learning rates only, "
                        "1 epoch of 3 steps, small validation sets (and a "
                        "10-step T5 pretraining for t5_finetune)")
    p.add_argument("--sweep", action="store_true",
                   help="Ginger(tau=8) lr x damping (and beta_2) sweep on "
                        "the scikit-learn tasks")
    p.add_argument("--sweep-lrs", type=float, nargs="+", default=SWEEP_LRS)
    p.add_argument("--sweep-dampings", type=float, nargs="+",
                   default=SWEEP_DAMPINGS)
    p.add_argument("--sweep-beta2s", type=float, nargs="+",
                   default=[0.95, 0.999])
    p.add_argument("--sweep-candidates", nargs="+", default=None,
                   metavar="LR:DAMPING[:BETA_2[:GLOBAL_CLIPNORM]]",
                   help="explicit Ginger settings instead of the grid")
    p.add_argument("--run-eagerly", action="store_true",
                   help="no compiled train step (tests, debugging; timings "
                        "are then meaningless)")
    p.add_argument("--report-only", metavar="JSON", default=None,
                   help="rewrite the Markdown and plots of a results JSON "
                        "(after a change to the report) without training")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--prefix", default=None,
                   help="output file prefix (default: convergence, or "
                        "convergence_sweep with --sweep, convergence_quick "
                        "with --quick)")
    p.add_argument("--verbose", type=int, default=0,
                   help="Keras fit verbosity per run")
    return p.parse_args(argv)


def _protocol(task_names, seeds, lr_points):
    every = [t for t in task_names if TASKS[t].seed_protocol == "all"]
    select = [t for t in task_names if TASKS[t].seed_protocol != "all"]
    parts = [f"seeds {seeds}"]
    if every:
        parts.append(f"{', '.join(every)}: every lr x seed")
    if select:
        parts.append(f"{', '.join(select)}: lr grid on seed {seeds[0]}, "
                     "then the selected lr (and the default lr of Adam and "
                     "Ginger) on the other seeds")
    grid = (f"{lr_points}-point learning-rate grids" if lr_points
            else "5-point learning-rate grids")
    if GRID_OVERRIDES:
        grid += " (explicit grids: " + "; ".join(
            f"{k} {', '.join(f'{v:g}' for v in sorted(vs))}"
            for k, vs in GRID_OVERRIDES.items()) + ")"
    return ("; ".join(parts) + f". {grid}; lr selected by the mean best "
            "validation loss. Same initial weights and batch order per seed "
            "for every optimizer; equal steps per task. Ginger via "
            "keras_ginger.with_fisher (sampled Fisher).")


def main(argv=None):
    args = parse_args(argv)
    if args.report_only:
        with open(args.report_only) as f:
            data = json.load(f)
        meta = data["meta"]
        out = os.path.dirname(os.path.abspath(args.report_only))
        prefix = os.path.splitext(os.path.basename(args.report_only))[0]
        write_outputs(data["runs"], data["timings_s"], meta, out, prefix,
                      meta["tasks"], meta["optimizers"])
        print(f"rewrote {os.path.join(out, prefix)}.md")
        return 0
    for spec in args.lrs:
        name, _, values = spec.partition("=")
        if name not in OPTIMIZERS or not values:
            raise SystemExit(f"--lrs: expected NAME=LR,LR,... with NAME one "
                             f"of {sorted(OPTIMIZERS)}; got {spec!r}")
        GRID_OVERRIDES[name] = [float(v) for v in values.split(",")]
    if args.tasks is None:
        args.tasks = list(SWEEP_TASKS) if args.sweep else list(TASKS)

    t_start = time.perf_counter()
    seeds = list(range(1 if args.quick else args.seeds))
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    meta = {"date": date, "machine": machine_info(),
            "seeds": seeds, "tasks": args.tasks,
            "optimizers": args.optimizers,
            "ginger_defaults": _jsonable(ginger_defaults()),
            "grids": {o: lr_grid(o, args.lr_points) for o in args.optimizers},
            "argv": sys.argv[1:] if argv is None else list(argv)}
    print(f"convergence suite on {meta['machine']['backend']} "
          f"({meta['machine']['cpu']}, {meta['machine']['cores']} cores)")

    if args.sweep:
        tasks = args.tasks
        runs = run_sweep(tasks, seeds, sweep_candidates(args),
                         args.verbose, print)
        meta["wall_seconds"] = time.perf_counter() - t_start
        prefix = args.prefix or "convergence_sweep"
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, prefix + ".json"), "w") as f:
            summary = [{"learning_rate": c[0], "damping": c[1], "beta_2": c[2],
                        "global_clipnorm": c[3], "tasks": v}
                       for c, v in sweep_summary(runs, tasks).items()]
            json.dump(_jsonable({"meta": meta, "summary": summary,
                                 "runs": runs}), f, indent=1)
        md = sweep_markdown(runs, meta, tasks)
        with open(os.path.join(args.out, prefix + ".md"), "w") as f:
            f.write(md)
        print(md)
        print(f"wrote {os.path.join(args.out, prefix)}.{{json,md}}")
        return 0

    task_info = {}
    if args.quick:
        runs, timings = run_suite(args.tasks, args.optimizers, seeds,
                                  epochs=1, steps_per_epoch=3, grid=False,
                                  quick=True, verbose=args.verbose, log=print,
                                  run_eagerly=args.run_eagerly,
                                  task_info=task_info)
        meta["grids"] = {o: [default_lr(o)] for o in args.optimizers}
        meta["protocol"] = ("quick smoke run: 1 seed, 3 steps, default lr, "
                            "small validation sets.")
    else:
        runs, timings = run_suite(args.tasks, args.optimizers, seeds,
                                  epochs_scale=args.epochs_scale,
                                  lr_points=args.lr_points,
                                  verbose=args.verbose, log=print,
                                  run_eagerly=args.run_eagerly,
                                  task_info=task_info)
        meta["protocol"] = _protocol(args.tasks, seeds, args.lr_points)
    meta["task_info"] = task_info
    meta["wall_seconds"] = time.perf_counter() - t_start
    prefix = args.prefix or ("convergence_quick" if args.quick
                             else "convergence")
    rows, plots = write_outputs(runs, timings, meta, args.out, prefix,
                                args.tasks, args.optimizers)
    print()
    print(markdown(rows, meta))
    print(f"wrote {os.path.join(args.out, prefix)}.{{json,md}} and "
          f"{len(plots)} plot(s): " + ", ".join(
              os.path.relpath(p) for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
