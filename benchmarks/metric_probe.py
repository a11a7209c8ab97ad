"""Probe: Ginger in Adam's diagonal metric (`metric="adam"`, with and
without grafting to Adam's step norm) against the default Ginger and Adam()
at learning rate 1e-3, best validation loss over 3 seeds, on chosen suite
tasks.

The `metric_graft_*` results of 2026-11-29 07:30-09:30 graft to the
Euclidean norm of Adam's step (the first ones through a probe subclass:
their JSON rows say `probe_class: grafted_metric`, with `graft: None`).
Since commit 6e567b9, `Ginger(metric="adam", graft="adam")` measures both
norms in Adam's metric; its results at lr 1e-3 are the default rows of
results/convergence_default_v2.md.

    KERAS_BACKEND=jax python benchmarks/metric_probe.py digits breast_cancer
    KERAS_BACKEND=jax python benchmarks/metric_probe.py embeddings \
        --configs adam,metric_0.3,metric_1

Writes results/metric_probe_<tasks>.json.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import convergence  # noqa: E402,F401  (sets up sys.path for the tasks)
from convergence_harness import CompiledRun  # noqa: E402
from convergence_tasks import TASKS  # noqa: E402

CONFIGS = {
    "adam": ("adam", None),
    "ginger": ("ginger", None),
    "metric_0.1": ("ginger", dict(graft=None, metric="adam",
                                  relative_damping=True, damping=0.1)),
    "metric_0.3": ("ginger", dict(graft=None, metric="adam",
                                  relative_damping=True, damping=0.3)),
    "metric_1": ("ginger", dict(graft=None, metric="adam",
                                relative_damping=True, damping=1.0)),
    "metric_graft_0.1": ("ginger", dict(graft="adam", metric="adam",
                                        relative_damping=True,
                                        damping=0.1)),
    "metric_graft_0.3": ("ginger", dict(graft="adam", metric="adam",
                                        relative_damping=True,
                                        damping=0.3)),
    "metric_graft_1": ("ginger", dict(graft="adam", metric="adam",
                                      relative_damping=True, damping=1.0)),
}
DEFAULT_CONFIGS = ("adam", "ginger", "metric_0.1", "metric_1")


def main(task_names, seeds=(0, 1, 2), lr=1e-3, configs=DEFAULT_CONFIGS,
         tag=""):
    out = []
    for tname in task_names:
        task = TASKS[tname]()
        cache = {}
        for opt, overrides in (CONFIGS[c] for c in configs):
            run = CompiledRun(task, opt, overrides=overrides, init_cache=cache)
            for seed in seeds:
                r = run.run(lr, seed, task.epochs)
                r.pop("history")
                r["overrides"] = overrides
                out.append(r)
                print(tname, opt, overrides, seed,
                      round(r["best_val_loss"], 4), flush=True)
    path = os.path.join(HERE, "results",
                        f"metric_probe_{'_'.join(task_names)}{tag}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    # metric_probe.py TASK... [--configs adam,metric_1]
    args = sys.argv[1:]
    configs = DEFAULT_CONFIGS
    tag = ""
    if "--configs" in args:
        i = args.index("--configs")
        configs = tuple(args[i + 1].split(","))
        tag = "_" + "_".join(configs)
        del args[i:i + 2]
    main(args, configs=configs, tag=tag)
