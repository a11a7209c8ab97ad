"""How well a low-rank Kronecker side tracks the exact EMA of its factor.

For each tail rule of `keras_ginger.kronecker.lowrank_finish` ("fd",
"next", "accumulate"), feed the same stream of Kronecker-structured
matrix gradients (A ξ Bᵀ, A and B with geometrically decaying spectra) to
the small-space update and to the exact EMA A_t = α A_{t-1} + (1-α) Y Yᵀ
kept dense in float64, and report after a 50-step warm-up: the largest
principal angle between span(U) and A's top-k eigenvectors (worst and
median), the relative error of each kept eigenvalue (median), and the tail
level ρ against A's (k+1)-th eigenvalue (median ratio).

    KERAS_BACKEND=jax python benchmarks/kronecker_tracking.py

Writes results/kronecker_tracking.json.
"""

import json
import os
import sys

import numpy as np
from keras import ops

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from keras_ginger import kronecker  # noqa: E402
import bench_env  # noqa: E402


def stream(rng, shape, steps, decay):
    m, n = shape
    A = np.linalg.qr(rng.standard_normal((m, m)))[0] * decay ** np.arange(m)
    B = np.linalg.qr(rng.standard_normal((n, n)))[0] * decay ** np.arange(n)
    return [A @ rng.standard_normal((m, n)) @ B.T for _ in range(steps)]


def track(tail, s=48, k=6, w=4, alpha=0.95, decay=0.6, steps=200, seed=1):
    rng = np.random.default_rng(seed)
    U = ops.convert_to_tensor(np.eye(s, k, dtype=np.float32))
    sigma, rho = ops.zeros((k,)), ops.zeros(())
    A = np.zeros((s, s))
    angles, errs, ratios = [], [], []
    for t, Y in enumerate(stream(rng, (s, w), steps, decay)):
        Q, C = kronecker.lowrank_small(U, sigma, Y.astype(np.float32), alpha)
        lam, V = kronecker.eigh_desc(C)
        U, sigma, rho = kronecker.lowrank_finish(Q, lam, V, rho, k, alpha,
                                                 tail)
        A = alpha * A + (1 - alpha) * Y @ Y.T
        if t < 50:
            continue
        e, E = np.linalg.eigh(A)
        e, E = e[::-1], E[:, ::-1]
        Un = np.asarray(ops.convert_to_numpy(U), np.float64)
        sn = np.asarray(ops.convert_to_numpy(sigma), np.float64)
        cos = np.linalg.svd(Un.T @ E[:, :k], compute_uv=False)
        angles.append(float(np.sqrt(max(1 - cos.min() ** 2, 0.0))))
        errs.append(np.abs(sn - e[:k]) / e[:k])
        ratios.append(float(np.asarray(ops.convert_to_numpy(rho))) / e[k])
    return {"tail": tail, "s": s, "k": k, "w": w, "alpha": alpha,
            "decay": decay, "steps": steps,
            "angle_worst": max(angles), "angle_median": float(np.median(angles)),
            "sigma_rel_err_median": np.median(errs, 0).round(4).tolist(),
            "rho_over_next_eig_median": float(np.median(ratios))}


def main():
    rows = []
    for decay, alpha in ((0.6, 0.95), (0.6, 0.99), (0.8, 0.95)):
        for tail in kronecker.TAILS:
            r = track(tail, alpha=alpha, decay=decay)
            rows.append(r)
            print(f"decay={decay} alpha={alpha} {tail:<10} "
                  f"angle worst {r['angle_worst']:.3f} "
                  f"median {r['angle_median']:.3f}  sigma err "
                  f"{r['sigma_rel_err_median']}  rho/lambda_k+1 "
                  f"{r['rho_over_next_eig_median']:.2f}", flush=True)
    path = os.path.join(HERE, "results", "kronecker_tracking.json")
    with open(path, "w") as f:
        json.dump({"meta": bench_env.stamp(), "rows": rows}, f, indent=1)
    print(path)


if __name__ == "__main__":
    main()
