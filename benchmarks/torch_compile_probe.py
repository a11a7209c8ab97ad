"""What `torch.compile` buys Ginger's update math on PyTorch (CPU).

    KERAS_BACKEND=torch python benchmarks/torch_compile_probe.py [--n 1e6]
        [--tau 8] [--repeats 9]

Keras runs optimizers eagerly on PyTorch. This probe times the default
step's curvature math for one variable of n entries (project, the small
eigensolve, the rotation and the pass that writes U' and θ', in Adam's
metric: `keras_ginger.curvature`, as `Ginger` calls it) eagerly and under
`torch.compile` (inductor, shapes static), and how long compiling takes: the
first call, and the first call at a second shape (every distinct variable
shape compiles once). Prints the numbers and writes
results/torch_compile_probe.json.
"""

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bench_env  # noqa: E402
from keras_ginger import curvature  # noqa: E402


def update(U, sigma, theta, d, m, scale):
    """The default step's curvature work for one variable (γ = 0.3σ₁)."""
    k = U.shape[1]
    proj = curvature.project(U, d, m, scale=scale)
    C, c_scale = curvature.small_matrix(sigma, proj, 0.99)
    lam, V = curvature.top_eigh(C, k)
    sigma = lam * c_scale
    damping = 0.3 * torch.where(sigma[0] > 0, sigma[0], 1.0)
    A, b, w, a1 = curvature.rotation(proj, sigma, V, damping)
    return curvature.rotate(U, proj.p, A, b, m, w, a1, damping, theta=theta,
                            eta=1e-3, scale=scale)


def inputs(n, tau, rng):
    U = np.linalg.qr(rng.standard_normal((n, tau)))[0].astype(np.float32)
    vec = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    scale = np.abs(vec[2]) + 0.5
    sigma = np.linspace(1.0, 0.1, tau).astype(np.float32)
    return [torch.from_numpy(x) for x in (U, sigma, vec[0], vec[1], vec[2],
                                          scale)]


def median_ns(fn, args, n, repeats):
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return 1e9 * statistics.median(times[2:]) / n


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=float, default=1e6)
    parser.add_argument("--tau", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    n, rng = int(args.n), np.random.default_rng(0)
    x = inputs(n, args.tau, rng)
    with torch.no_grad():
        eager = median_ns(update, x, n, args.repeats)
        compiled = torch.compile(update, dynamic=False)
        t0 = time.perf_counter()
        compiled(*x)
        first = time.perf_counter() - t0
        fast = median_ns(compiled, x, n, args.repeats)
        half = [t[: n // 2] for t in x]
        half[1] = x[1]  # σ keeps its (τ,) shape
        t0 = time.perf_counter()
        compiled(*half)
        second_shape = time.perf_counter() - t0
    row = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": bench_env.machine(), "torch": torch.__version__,
        "n": n, "tau": args.tau, "repeats": args.repeats,
        "device": "cpu (the probe's tensors are built there)",
        "eager_ns_per_param": eager, "compiled_ns_per_param": fast,
        "speedup": eager / fast, "first_compile_s": first,
        "compile_at_a_second_shape_s": second_shape,
    }
    print(json.dumps(row, indent=1))
    out = os.path.join(HERE, "results", "torch_compile_probe.json")
    with open(out, "w") as f:
        json.dump(row, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
