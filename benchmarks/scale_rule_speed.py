"""What the scale rule costs: Ginger grafted to Adam (relative damping), in
the Euclidean metric and in Adam's (`metric="adam"`), against the paper's
step and Adam, timed interleaved in one run.

    KERAS_BACKEND=jax python benchmarks/scale_rule_speed.py [--n 4e6]
        [--tau 8] [--repeats 15]

On a shared machine whose speed moves from minute to minute, timing one
optimizer after another makes their ratio noisy; here each repeat times
Adam, the paper's Ginger and the two grafted Gingers back to back (compiled as
`benchmarks/optimizer_speed.py` compiles them) and the report gives the
median of the per-repeat ratios. Writes results/scale_rule_speed_<backend>.json.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import keras
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import keras_ginger  # noqa: E402
from optimizer_speed import BACKEND, RESULTS, _sync, compiled_update  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=float, default=4e6)
    parser.add_argument("--tau", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    n = int(args.n)
    rng = np.random.default_rng(0)
    g = keras.ops.convert_to_tensor(rng.standard_normal(n).astype("float32"))
    d = keras.ops.convert_to_tensor(rng.standard_normal(n).astype("float32"))
    updates = {
        "adam": compiled_update(keras.optimizers.Adam(1e-3),
                                keras.Variable(np.zeros(n, "float32")),
                                False),
        "paper": compiled_update(
            keras_ginger.Ginger(tau=args.tau, graft=None,
                                relative_damping=False, metric=None),
            keras.Variable(np.zeros(n, "float32")), True),
        "graft": compiled_update(
            keras_ginger.Ginger(tau=args.tau, graft="adam", metric=None),
            keras.Variable(np.zeros(n, "float32")), True),
        "metric_graft": compiled_update(
            keras_ginger.Ginger(tau=args.tau, graft="adam", metric="adam"),
            keras.Variable(np.zeros(n, "float32")), True),
    }
    for fn in updates.values():  # compile and settle
        for _ in range(3):
            _sync(fn(g, d))
    times = {k: [] for k in updates}
    for _ in range(args.repeats):
        for name, fn in updates.items():
            t0 = time.perf_counter()
            _sync(fn(g, d))
            times[name].append(time.perf_counter() - t0)
    ratio = {
        f"{a}_over_{b}": statistics.median(
            x / y for x, y in zip(times[a], times[b]))
        for a, b in (("paper", "adam"), ("graft", "adam"),
                     ("metric_graft", "adam"), ("graft", "paper"),
                     ("metric_graft", "paper"))
    }
    ns = {k: 1e9 * statistics.median(v) / n for k, v in times.items()}
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "backend": BACKEND,
            "machine": f"{platform.processor() or platform.machine()}, "
                       f"{os.cpu_count()} cores",
            "keras": keras.__version__, "n": n, "tau": args.tau,
            "repeats": args.repeats}
    print(json.dumps({"meta": meta, "ns_per_param": ns, "ratios": ratio},
                     indent=1))
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"scale_rule_speed_{BACKEND}.json"),
              "w") as f:
        json.dump({"meta": meta, "ns_per_param": ns, "ratios": ratio,
                   "seconds": times}, f, indent=1)


if __name__ == "__main__":
    main()
