"""Update time of Ginger per parameter, against Keras Adam in the same run.

    KERAS_BACKEND=jax python benchmarks/optimizer_speed.py [--taus 4 8 16]
        [--sizes 1e5 1e6 4e6] [--repeats 15] [--many 200x5000] [--paper]

For each (τ, n): one float32 variable of n entries, one optimizer update
compiled as training compiles it (JAX: jax.jit of stateless_apply with the
state donated; TF: tf.function with XLA; torch: eager, as Keras runs
optimizers there). Also timed, in the same run: Keras Adam; two memory
floors, reading an (n, τ) float32 array once (d @ U) and copying it (read +
write; an update must write U'); and the rotation floor, U @ A for a τ×τ A
with U' written in place where the backend can (JAX: a loop over blocks of
rows; TF, torch: whole arrays), the one product with τ² multiply-adds per
row that every Ginger update makes (U' = [U, q]V).

Each row prints the ratio Ginger/Adam and, next to it, two floors in units
of Adam's time: the memory-traffic floor (floats an update must move per
parameter over Adam's 7: g, d, m, θ, U read and m, θ, U written, 2τ + 6, and
v read and written for the default step's Adam metric, 2τ + 8) and the
measured rotation floor (U @ A's time over Adam's). ``--many CxN`` adds a
row for C variables of N entries in one update against one variable of C·N
entries: the ratio of their costs per parameter. On JAX each row also gives
XLA's temporaries of the compiled update, in floats per parameter. Every repeat times all
the functions of a row back to back; times are medians over repeats, ratios
medians of the per-repeat ratios (this shared machine's speed drifts from
minute to minute). Prints ns per parameter and writes JSON and Markdown
under benchmarks/results/.
"""

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_env  # noqa: E402
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


def compiled_update(opt, variables, with_fisher):
    """A function (gs, ds) -> a value, running one optimizer update of the
    list ``variables`` with gradients ``gs`` (and Fisher gradients ``ds``)."""
    opt.build(variables)
    if BACKEND == "jax":
        import jax

        # Donated state in and updated state out in the same order, as
        # Keras's JAX trainer passes it: XLA pairs each donated buffer with
        # an output of the same shape in order, so a different order would
        # alias e.g. θ' to m's buffer and add copies.
        def pure(values, opt_vars, gs, ds):
            kwargs = {"fisher_grads": ds} if with_fisher else {}
            return opt.stateless_apply(opt_vars, gs, values, **kwargs)

        pure = jax.jit(pure, donate_argnums=(0, 1))
        state = {"opt": [v.value for v in opt.variables],
                 "vars": [v.value for v in variables]}

        def run(gs, ds):
            state["vars"], state["opt"] = pure(state["vars"], state["opt"],
                                               gs, ds)
            return state["vars"][0]

        # XLA's temporaries of the compiled update (bytes).
        probe = [keras.ops.zeros(v.shape) for v in variables]
        run.temp_bytes = pure.lower(
            state["vars"], state["opt"], probe,
            probe).compile().memory_analysis().temp_size_in_bytes
        return run
    if BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def run(gs, ds):
            kwargs = {"fisher_grads": ds} if with_fisher else {}
            opt.apply(gs, variables, **kwargs)
            return variables[0].value

        return run

    import torch

    def run(gs, ds):
        with torch.no_grad():
            kwargs = {"fisher_grads": ds} if with_fisher else {}
            opt.apply(gs, variables, **kwargs)
        return variables[0].value

    return run


def _compile(fn, donate=()):
    if BACKEND == "jax":
        import jax

        return jax.jit(fn, donate_argnums=donate)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    return fn


def stream_baselines(n, tau):
    """Memory floors: read an (n, τ) array once (d @ U), and copy it (U·2).

    One Ginger update must write U' (a copy's traffic) and read U a few
    times; these two set the scale of what an update can cost here.
    """
    U = keras.ops.ones((n, tau))
    read = _compile(lambda u, d: keras.ops.matmul(d, u))
    copy = _compile(lambda u, d: u * 2.0)
    return (lambda gs, ds: read(U, ds[0])), (lambda gs, ds: copy(U, ds[0]))


def rotation_floor(n, tau, block_rows=16384):
    """U ← U A for a τ×τ A: the product every Ginger update makes.

    JAX: U donated and overwritten block by block (the update's own walk);
    TF, torch: one whole-array product (their update's form)."""
    A = keras.ops.convert_to_tensor(
        np.linalg.qr(np.random.default_rng(1).standard_normal(
            (tau, tau)))[0].astype(np.float32))
    state = {"U": keras.ops.ones((n, tau)) / math.sqrt(tau)}
    if BACKEND == "jax":
        from jax import lax

        def walk(U):
            def body(i, U):
                start = i * block_rows
                block = lax.dynamic_slice(U, (start, 0), (block_rows, tau))
                return lax.dynamic_update_slice(U, block @ A, (start, 0))

            return lax.fori_loop(0, n // block_rows, body, U)

        product = _compile(walk, donate=(0,))
    else:
        product = _compile(lambda U: keras.ops.matmul(U, A))

    def run(gs, ds):
        state["U"] = product(state["U"])
        return state["U"]

    return run


def interleaved_seconds(calls, repeats, warmup=2):
    """{name: per-repeat seconds} of zero-argument ``calls``, every one timed
    once per repeat, back to back: on a shared machine whose speed drifts
    from minute to minute, ratios of the same repeat are what stays
    comparable."""
    for call in calls.values():
        for _ in range(warmup):
            _sync(call())
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            _sync(call())
            times[name].append(time.perf_counter() - t0)
    return times


def _ratio(times, num, den):
    """Median over repeats of the per-repeat ratio."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def _vectors(rng, count, size):
    return [keras.ops.convert_to_tensor(
        rng.standard_normal(size).astype(np.float32)) for _ in range(count)]


def _ginger(tau, paper):
    setting = (dict(graft=None, relative_damping=False, metric=None)
               if paper else {})
    return keras_ginger.Ginger(learning_rate=1e-3, tau=tau, **setting)


def traffic_floor(tau, paper):
    """Floats an update moves per parameter, over Adam's 7 (see doc)."""
    return (2 * tau + (6 if paper else 8)) / 7.0


def time_one(rng, n, tau, args):
    """One row: Ginger, Adam and the floors for one variable of n entries."""
    gs, ds = _vectors(rng, 1, n), _vectors(rng, 1, n)
    adam = compiled_update(keras.optimizers.Adam(1e-3),
                           [keras.Variable(np.zeros(n, np.float32))], False)
    opt = _ginger(tau, args.paper)
    update = compiled_update(opt, [keras.Variable(np.zeros(n, np.float32))],
                             True)
    read, copy = stream_baselines(n, tau)
    rotate = rotation_floor(n, tau)
    times = interleaved_seconds(
        {name: functools.partial(fn, gs, ds) for name, fn in (
            ("adam", adam), ("ginger", update), ("read", read),
            ("copy", copy), ("rotate", rotate))}, args.repeats)
    t = {name: statistics.median(v) for name, v in times.items()}
    state_bytes = sum(4 * int(np.prod(v.shape)) for v in opt.variables)
    return {
        "backend": BACKEND, "n": n, "tau": tau, "paper_step": args.paper,
        "ginger_ns_per_param": 1e9 * t["ginger"] / n,
        "adam_ns_per_param": 1e9 * t["adam"] / n,
        "read_u_ns_per_param": 1e9 * t["read"] / n,
        "copy_u_ns_per_param": 1e9 * t["copy"] / n,
        "rotate_u_ns_per_param": 1e9 * t["rotate"] / n,
        "ginger_over_adam": _ratio(times, "ginger", "adam"),
        "traffic_floor_over_adam": traffic_floor(tau, args.paper),
        "rotation_floor_over_adam": _ratio(times, "rotate", "adam"),
        "state_floats_per_param": state_bytes / (4 * n),
        "update_temp_floats_per_param": (
            getattr(update, "temp_bytes", math.nan) / (4 * n)),
    }


def time_many(rng, count, size, tau, args):
    """``count`` variables of ``size`` entries in one update against one
    variable of count·size entries: per-parameter cost ratio (and each
    against Adam on the same variables)."""
    row = {"backend": BACKEND, "count": count, "size": size, "tau": tau,
           "paper_step": args.paper}
    calls = {}
    for label, c, s in (("one", 1, count * size), ("many", count, size)):
        data = (_vectors(rng, c, s), _vectors(rng, c, s))
        made = [keras.Variable(np.zeros(s, np.float32)) for _ in range(c)]
        t0 = time.perf_counter()
        calls[label] = functools.partial(
            compiled_update(_ginger(tau, args.paper), made, True), *data)
        _sync(calls[label]())
        row[f"{label}_first_call_s"] = time.perf_counter() - t0
        calls[label + "_adam"] = functools.partial(compiled_update(
            keras.optimizers.Adam(1e-3),
            [keras.Variable(np.zeros(s, np.float32)) for _ in range(c)],
            False), *data)
    # All four interleaved, each with its own inputs.
    times = interleaved_seconds(calls, args.repeats)
    for label in ("one", "many"):
        row[f"{label}_ginger_ns_per_param"] = (
            1e9 * statistics.median(times[label]) / (count * size))
        row[f"{label}_ginger_over_adam"] = _ratio(times, label,
                                                  label + "_adam")
    row["many_over_one"] = _ratio(times, "many", "one")
    return row


# (header, row key, format) of each column, printed and in the Markdown.
COLUMNS = (
    ("n", "n", "{:.0e}"), ("τ", "tau", "{}"),
    ("Ginger ns/p", "ginger_ns_per_param", "{:.2f}"),
    ("Adam ns/p", "adam_ns_per_param", "{:.2f}"),
    ("Ginger/Adam", "ginger_over_adam", "{:.2f}"),
    ("traffic floor/Adam", "traffic_floor_over_adam", "{:.2f}"),
    ("U@A floor/Adam", "rotation_floor_over_adam", "{:.2f}"),
    ("read U ns/p", "read_u_ns_per_param", "{:.2f}"),
    ("copy U ns/p", "copy_u_ns_per_param", "{:.2f}"),
    ("state floats/n", "state_floats_per_param", "{:.2f}"),
    ("temporaries/n", "update_temp_floats_per_param", "{:.2f}"),
)


def _cells(row):
    return [fmt.format(row[key]) for _, key, fmt in COLUMNS]


def print_row(row):
    print(" ".join(c.rjust(len(h)) for c, (h, _, _) in
                   zip(_cells(row), COLUMNS)), flush=True)


def write_markdown(path, meta, rows, many):
    step = "the paper's step" if meta["paper_step"] else "the default step"
    with open(path, "w") as f:
        f.write(f"Update time of {step}, ns per parameter (median of "
                f"{meta['repeats']}), backend {BACKEND} ({meta['mode']}), "
                f"{meta['machine']}, {meta['date']}; ratios are medians of "
                "per-repeat ratios to Keras Adam timed back to back in the "
                f"same repeat; {meta['devices']}. Temporaries: XLA's, of "
                "the compiled update (JAX).\n\n")
        f.write("| " + " | ".join(h for h, _, _ in COLUMNS) + " |\n")
        f.write("|" + "---:|" * len(COLUMNS) + "\n")
        for r in rows:
            f.write("| " + " | ".join(_cells(r)) + " |\n")
        if many:
            f.write("\nMany variables against one of the same total size "
                    "(ns per parameter; first call = trace + compile + one "
                    "update, seconds)\n\n| variables | τ | one: Ginger | "
                    "one: /Adam | one: first call | many: Ginger | many: "
                    "/Adam | many: first call | many / one |\n")
            f.write("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
            for r in many:
                f.write(f"| {r['count']} × {r['size']} | {r['tau']} | "
                        f"{r['one_ginger_ns_per_param']:.2f} | "
                        f"{r['one_ginger_over_adam']:.2f} | "
                        f"{r['one_first_call_s']:.1f} | "
                        f"{r['many_ginger_ns_per_param']:.2f} | "
                        f"{r['many_ginger_over_adam']:.2f} | "
                        f"{r['many_first_call_s']:.1f} | "
                        f"**{r['many_over_one']:.2f}** |\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--taus", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--sizes", type=float, nargs="+",
                        default=[1e5, 1e6, 4e6])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--many", nargs="*", default=[],
                        help="COUNTxSIZE, e.g. 200x5000: that many variables "
                             "against one of the same total size (τ = the "
                             "first of --taus)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--paper", action="store_true",
                        help="time the paper's step (graft=None, "
                             "relative_damping=False, metric=None) instead "
                             "of the default (Adam's metric, grafted to "
                             "Adam, relative damping)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    mode = {"jax": "jax.jit, state donated",
            "tensorflow": "tf.function(jit_compile=True)",
            "torch": "eager"}[BACKEND]
    print(f"backend={BACKEND} ({mode})  keras={keras.__version__}  "
          f"machine={bench_env.machine()}")
    print(" ".join(h for h, _, _ in COLUMNS))
    rows = []
    for n in [int(s) for s in args.sizes]:
        for tau in args.taus:
            rows.append(time_one(rng, n, tau, args))
            print_row(rows[-1])
    many = []
    for spec in args.many:
        count, size = (int(float(x)) for x in spec.lower().split("x"))
        many.append(time_many(rng, count, size, args.taus[0], args))
        r = many[-1]
        print(f"{count} x {size}: {r['many_ginger_ns_per_param']:.2f} ns/p "
              f"against one variable's {r['one_ginger_ns_per_param']:.2f}: "
              f"{r['many_over_one']:.2f}x per parameter; first call "
              f"{r['many_first_call_s']:.1f} s against "
              f"{r['one_first_call_s']:.1f} s", flush=True)

    os.makedirs(RESULTS, exist_ok=True)
    out = args.out or os.path.join(RESULTS, f"optimizer_speed_{BACKEND}.json")
    meta = dict(bench_env.stamp(), keras=keras.__version__,
                repeats=args.repeats, statistic="median", mode=mode,
                paper_step=args.paper)
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows, "many": many}, f, indent=1)
    write_markdown(out[:-5] + ".md", meta, rows, many)
    print("wrote", out)


if __name__ == "__main__":
    main()
