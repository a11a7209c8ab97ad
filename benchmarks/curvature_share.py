"""How much the curvature changes the default step, after training: per
variable, the share of the whitened momentum D^{-1/2}m̂ inside span(U) and
the angle between Ginger's step and Adam's step m̂/D.

    KERAS_BACKEND=jax python benchmarks/curvature_share.py \
        [--tasks digits char_lm] [--lr 4e-3] [--seed 0]

Trains `Ginger(tau=8)` (defaults; `with_fisher`) on each task's suite budget
(benchmarks/convergence_tasks.py), then reads the optimizer state (U, σ, m,
v) and computes, in float64 NumPy, for each variable with curvature:

    m̃ = D^{-1/2}m̂,  share = ‖Uᵀm̃‖² / ‖m̃‖²,
    step = D^{-1/2}(γₜI + UΣUᵀ)⁻¹m̃ (γₜ = γσ₁),  cos = ⟨step, m̂/D⟩/(‖·‖‖·‖)

`share` bounds how much the rank-τ curvature can bend the step away from
Adam's; `cos` is how much it did. Reported per variable and as
parameter-weighted means. Writes results/curvature_share.json.
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import convergence  # noqa: E402,F401  (sets up sys.path for the tasks)
import numpy as np  # noqa: E402
from convergence_harness import CompiledRun  # noqa: E402
from convergence_tasks import TASKS  # noqa: E402


def shares(opt):
    """[(path, n, share, cos)] for every variable with curvature."""
    t = int(opt.iterations.numpy() if hasattr(opt.iterations, "numpy")
            else np.asarray(opt.iterations))
    rows = []
    for var in opt._trainable_variables:
        idx = opt._get_variable_index(var)
        block = opt._blocks[idx]
        if block is None or block.kind != "vector":
            continue
        U, sigma = (np.asarray(s.value, np.float64) for s in block.slots)
        m = np.asarray(opt._momentums[idx].value, np.float64).ravel()
        v = np.asarray(opt._second_moments[idx].value, np.float64).ravel()
        m_hat = m / (1 - opt.beta_1 ** t)
        D = (np.sqrt(v) + opt.graft_epsilon) / np.sqrt(
            1 - opt.graft_beta_2 ** t)
        mt = m_hat / np.sqrt(D)
        w = U.T @ mt
        gamma = opt.damping * (sigma[0] if sigma[0] > 0 else 1.0)
        inner = mt / gamma - U @ (w / gamma) + U @ (w / (gamma + sigma))
        step = inner / np.sqrt(D)
        adam = m_hat / D
        share = float(w @ w / (mt @ mt)) if mt @ mt > 0 else 0.0
        cos = float(step @ adam / (np.linalg.norm(step)
                                   * np.linalg.norm(adam)))
        rows.append((var.path, int(m.size), share, cos))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["digits", "char_lm"])
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M"),
                    "lr": args.lr, "seed": args.seed}, "tasks": {}}
    for name in args.tasks:
        task = TASKS[name]()
        run = CompiledRun(task, "ginger")
        r = run.run(args.lr, args.seed, task.epochs)
        rows = shares(run.optimizer)
        n = np.array([x[1] for x in rows], float)
        share = float(np.sum(n * [x[2] for x in rows]) / n.sum())
        cos = float(np.sum(n * [x[3] for x in rows]) / n.sum())
        out["tasks"][name] = {
            "best_val_loss": r["best_val_loss"], "weighted_share": share,
            "weighted_cos": cos,
            "variables": [dict(path=a, n=b, share=c, cos=d)
                          for a, b, c, d in rows]}
        print(f"{name}: best val {r['best_val_loss']:.4f}; "
              f"parameter-weighted share of D^-1/2 m in span(U) "
              f"{share:.3f}, cos(Ginger step, Adam step) {cos:.3f}")
        for a, b, c, d in rows:
            print(f"  {a:<50} n={b:<7} share={c:.3f} cos={d:.3f}")
    path = os.path.join(HERE, "results", "curvature_share.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", os.path.relpath(path))


if __name__ == "__main__":
    main()
