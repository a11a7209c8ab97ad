"""Optimizer-state bytes per trainable parameter, per suite task and
optimizer (no training: each task's model is built and each optimizer
built on its variables).

    KERAS_BACKEND=jax python benchmarks/state_bytes.py [--tasks ...]
        [--optimizers ...]

Counts every variable of `optimizer.variables` (the iteration counter and
learning rate included), bytes = size x dtype width, divided by the number
of trainable parameters. Writes results/state_bytes.{json,md}. The
committed table adds `psgd_kron` (`--optimizers adam adamw lion muon
sgd_momentum ginger ginger_kronecker psgd_kron`; it needs the packages
named in benchmarks/optax_peer.py).
"""

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import convergence  # noqa: E402,F401  (sets up sys.path for the tasks)
import bench_env  # noqa: E402
from convergence_harness import OPTIMIZERS  # noqa: E402
from convergence_harness import optimizer_class  # noqa: E402
from convergence_harness import optimizer_kwargs  # noqa: E402
from convergence_tasks import TASKS  # noqa: E402

DEFAULT = ["adam", "adamw", "lion", "muon", "sgd_momentum", "ginger",
           "ginger_kronecker"]


def state_bytes(optimizer):
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
               for v in optimizer.variables)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--optimizers", nargs="+", default=DEFAULT,
                   choices=list(OPTIMIZERS))
    args = p.parse_args()
    out = {"meta": bench_env.stamp(), "bytes_per_param": {}}
    for tname in args.tasks:
        task = TASKS[tname]()
        model = task.build(0)
        params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
        row = {"params": params}
        for name in args.optimizers:
            opt = optimizer_class(name)(**optimizer_kwargs(name))
            opt.build(model.trainable_variables)
            row[name] = state_bytes(opt) / params
        out["bytes_per_param"][tname] = row
        print(tname, {k: (round(v, 2) if isinstance(v, float) else v)
                      for k, v in row.items()}, flush=True)
    lines = ["| task | params | " + " | ".join(args.optimizers) + " |",
             "|---|---|" + "---|" * len(args.optimizers)]
    for tname, row in out["bytes_per_param"].items():
        lines.append(f"| {tname} | {row['params']:,} | " + " | ".join(
            f"{row[n]:.2f}" for n in args.optimizers) + " |")
    path = os.path.join(HERE, "results", "state_bytes")
    with open(path + ".json", "w") as f:
        json.dump(out, f, indent=1)
    with open(path + ".md", "w") as f:
        f.write("Optimizer-state bytes per trainable parameter "
                f"({out['meta'].get('date', '')}).\n\n" + "\n".join(lines)
                + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
