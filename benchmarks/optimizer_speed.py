"""Update time of Ginger per parameter, against Keras Adam in the same run.

    KERAS_BACKEND=jax python benchmarks/optimizer_speed.py [--taus 4 8 16]
        [--sizes 1e5 1e6 4e6] [--repeats 9]

For each (τ, n): one float32 variable of n entries, one optimizer update
compiled as training compiles it (JAX: jax.jit of stateless_apply; TF:
tf.function with XLA; torch: eager, as Keras runs optimizers there). Also
timed: Keras Adam, and two memory floors: reading an (n, τ) float32 array
once (d @ U) and copying it (read + write; an update must write U'). Prints medians in
ns per parameter and writes JSON and Markdown under benchmarks/results/.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras_ginger  # noqa: E402

BACKEND = keras.backend.backend()
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _sync(x):
    if BACKEND == "jax":
        import jax

        jax.block_until_ready(x)
    elif BACKEND == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    else:
        keras.ops.convert_to_numpy(keras.ops.sum(x[:1]))


def compiled_update(opt, var, with_fisher):
    """A function (g, d) -> None that runs one optimizer update."""
    opt.build([var])
    if BACKEND == "jax":
        import jax

        def pure(opt_vars, value, g, d):
            kwargs = {"fisher_grads": [d]} if with_fisher else {}
            return opt.stateless_apply(opt_vars, [g], [value], **kwargs)

        pure = jax.jit(pure, donate_argnums=(0, 1))
        state = {"opt": [v.value for v in opt.variables], "var": var.value}
        probe = keras.ops.zeros(var.shape)
        memory = pure.lower(state["opt"], state["var"], probe,
                            probe).compile().memory_analysis()

        def run(g, d):
            (value,), opt_vars = pure(state["opt"], state["var"], g, d)
            state["opt"], state["var"] = opt_vars, value
            return value

        run.memory = memory
        return run
    if BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def run(g, d):
            kwargs = {"fisher_grads": [d]} if with_fisher else {}
            opt.apply([g], [var], **kwargs)
            return var.value

        return run

    import torch

    def run(g, d):
        with torch.no_grad():
            kwargs = {"fisher_grads": [d]} if with_fisher else {}
            opt.apply([g], [var], **kwargs)
        return var.value

    return run


def stream_baselines(n, tau):
    """Memory floors: read an (n, τ) array once (d @ U), and copy it (U·2).

    One Ginger update must write U' (a copy's traffic) and read U a few
    times; these two set the scale of what an update can cost here.
    """
    U = keras.ops.ones((n, tau))
    read = lambda u, d: keras.ops.matmul(d, u)  # noqa: E731
    copy = lambda u, d: u * 2.0  # noqa: E731
    if BACKEND == "jax":
        import jax

        read, copy = jax.jit(read), jax.jit(copy)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        read = tf.function(read, jit_compile=True)
        copy = tf.function(copy, jit_compile=True)
    return (lambda g, d: read(U, d)), (lambda g, d: copy(U, d))


def median_seconds(fn, g, d, repeats, warmup=2):
    for _ in range(warmup):
        _sync(fn(g, d))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _sync(fn(g, d))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--taus", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--sizes", type=float, nargs="+",
                        default=[1e5, 1e6, 4e6])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=None)
    parser.add_argument("--paper", action="store_true",
                        help="time the paper's step (graft=None, "
                             "relative_damping=False, metric=None) instead "
                             "of the default (Adam's metric, grafted to "
                             "Adam, relative damping)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    rows = []
    print(f"backend={BACKEND}  keras={keras.__version__}  "
          f"machine={platform.machine()} {os.cpu_count()} cores")
    print(f"{'n':>10} {'tau':>4} {'ginger ns/p':>12} {'adam ns/p':>10} "
          f"{'read U':>7} {'copy U':>7} {'ginger/adam':>11} "
          f"{'state/n':>7} {'temp/n':>6}")
    for n in [int(s) for s in args.sizes]:
        g = keras.ops.convert_to_tensor(
            rng.standard_normal(n).astype(np.float32))
        d = keras.ops.convert_to_tensor(
            rng.standard_normal(n).astype(np.float32))
        adam_var = keras.Variable(np.zeros(n, np.float32))
        adam = compiled_update(keras.optimizers.Adam(1e-3), adam_var, False)
        t_adam = median_seconds(adam, g, d, args.repeats)
        for tau in args.taus:
            var = keras.Variable(np.zeros(n, np.float32))
            setting = (dict(graft=None, relative_damping=False, metric=None)
                       if args.paper else {})
            opt = keras_ginger.Ginger(learning_rate=1e-3, tau=tau, **setting)
            update = compiled_update(opt, var, True)
            t_ginger = median_seconds(update, g, d, args.repeats)
            state_bytes = sum(4 * int(np.prod(v.shape)) for v in opt.variables)
            read, copy = stream_baselines(n, tau)
            t_read = median_seconds(read, g, d, args.repeats)
            t_copy = median_seconds(copy, g, d, args.repeats)
            row = {
                "backend": BACKEND, "n": n, "tau": tau,
                "ginger_ns_per_param": 1e9 * t_ginger / n,
                "adam_ns_per_param": 1e9 * t_adam / n,
                "read_u_ns_per_param": 1e9 * t_read / n,
                "copy_u_ns_per_param": 1e9 * t_copy / n,
            }
            row["ginger_over_adam"] = t_ginger / t_adam
            # Memory: state (τ+1)·n + k floats; XLA's temporaries of the
            # compiled update (JAX), in units of the variable's size.
            row["state_floats_per_param"] = state_bytes / (4 * n)
            memory = getattr(update, "memory", None)
            if memory is not None:
                row["update_temp_in_variables"] = (
                    memory.temp_size_in_bytes / (4 * n))
            rows.append(row)
            print(f"{n:>10} {tau:>4} {row['ginger_ns_per_param']:>12.2f} "
                  f"{row['adam_ns_per_param']:>10.2f} "
                  f"{row['read_u_ns_per_param']:>7.2f} "
                  f"{row['copy_u_ns_per_param']:>7.2f} "
                  f"{row['ginger_over_adam']:>11.2f} "
                  f"{row['state_floats_per_param']:>7.2f} "
                  f"{row.get('update_temp_in_variables', float('nan')):>6.2f}",
                  flush=True)
            del var, opt

    os.makedirs(RESULTS, exist_ok=True)
    out = args.out or os.path.join(RESULTS, f"optimizer_speed_{BACKEND}.json")
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} cores",
        "keras": keras.__version__, "repeats": args.repeats,
        "statistic": "median",
    }
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(out[:-5] + ".md", "w") as f:
        f.write(f"Update time, ns per parameter (median of {args.repeats}), "
                f"backend {BACKEND}, {meta['machine']}, {meta['date']}\n\n")
        f.write("| n | τ | Ginger | Adam | read U once | copy U | "
                "Ginger/Adam | state floats / n | update temporaries / n |\n")
        f.write("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
        for r in rows:
            f.write(f"| {r['n']:.0e} | {r['tau']} | "
                    f"{r['ginger_ns_per_param']:.2f} | "
                    f"{r['adam_ns_per_param']:.2f} | "
                    f"{r['read_u_ns_per_param']:.2f} | "
                    f"{r['copy_u_ns_per_param']:.2f} | "
                    f"{r['ginger_over_adam']:.2f} | "
                    f"{r['state_floats_per_param']:.2f} | "
                    f"{r.get('update_temp_in_variables', float('nan')):.2f} |\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
