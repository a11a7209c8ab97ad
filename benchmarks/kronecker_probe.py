"""Probe: variants of Ginger's Kronecker block on chosen suite tasks, at a
few learning rates and seeds, best validation loss (the measurements behind
the Kronecker block's defaults; see benchmarks/README.md).

    KERAS_BACKEND=jax python benchmarks/kronecker_probe.py --tasks char_lm \\
        --seeds 1 --lrs 3e-3 1e-2 \\
        --config 'full={"kronecker_full_size": 256}' \\
        --config 'adam_metric={"metric": "adam"}' \\
        --config 'g={"_fisher": false}' --tag first

A config is NAME=JSON: keyword arguments of `keras_ginger.Ginger` over its
defaults (the suite's "ginger" entry); the key "_fisher": false trains
without `with_fisher` (d = g, the loss gradient); "_optimizer": "adam"
runs a suite optimizer other than Ginger. Writes
results/kronecker_probe_<tag>.json and prints one line per run.
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import convergence  # noqa: E402,F401  (sets up sys.path for the tasks)
from convergence_harness import CompiledRun  # noqa: E402
from convergence_tasks import TASKS  # noqa: E402
import bench_env  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), required=True)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3])
    p.add_argument("--config", action="append", default=[],
                   metavar="NAME=JSON")
    p.add_argument("--runs", nargs="+", default=None, metavar="LR:SEED",
                   help="explicit (learning rate, seed) pairs instead of "
                        "--lrs x --seeds")
    p.add_argument("--tag", default="probe")
    args = p.parse_args()
    configs = []
    for spec in args.config or ["default={}"]:
        name, _, text = spec.partition("=")
        configs.append((name, json.loads(text or "{}")))
    out = {"meta": {"argv": sys.argv[1:], **bench_env.stamp()},
           "runs": []}
    path = os.path.join(HERE, "results", f"kronecker_probe_{args.tag}.json")
    pairs = ([(float(a), int(b)) for a, b in
              (r.split(":") for r in args.runs)] if args.runs else
             [(lr, seed) for lr in args.lrs for seed in range(args.seeds)])
    for tname in args.tasks:
        task = TASKS[tname]()
        cache = {}
        for name, overrides in configs:
            overrides = dict(overrides)
            fisher = overrides.pop("_fisher", None)
            opt = overrides.pop("_optimizer", "ginger")
            run = CompiledRun(task, opt, overrides=overrides or None,
                              init_cache=cache, fisher=fisher)
            for lr, seed in pairs:
                r = run.run(lr, seed, task.epochs)
                r.pop("history")
                r.update(config=name, overrides=overrides, fisher=fisher)
                out["runs"].append(r)
                print(f"{tname:<12} {name:<16} lr={lr:<8g} seed={seed} "
                      f"best_val={r['best_val_loss']:.4f} "
                      f"ms/step={r['ms_per_step']:.1f}", flush=True)
                with open(path, "w") as f:
                    json.dump(out, f, indent=1)
    print(path)


if __name__ == "__main__":
    main()
