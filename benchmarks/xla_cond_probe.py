"""A convolution's gradient inside `jax.lax.cond`, and the Kronecker
update inside Ginger's refresh cond, against the same work outside one.

    KERAS_BACKEND=jax python benchmarks/xla_cond_probe.py [--repeats 15]

Why: a train step with `curvature_interval` > 1 runs the Fisher pass in
`lax.cond` (JAX), and on XLA:CPU a convolution inside control flow is much
slower than outside it (jax-ml/jax#12868). Times (median ms of --repeats
jitted calls):

* conv_grad: the gradient of sum(conv(x, w)²), a 3×3 conv 32 → 64 on 128
  8×8 images (the digits CNN's second layer), plain and as the taken
  branch of a `lax.cond`;
* update: `Ginger(curvature="auto").stateless_apply` on the digits CNN's
  variable shapes, jitted, with a refresh at every step
  (curvature_interval=1, no cond) and on the refreshing steps of
  curvature_interval=2 (the refresh inside the cond).

Writes benchmarks/results/xla_cond_probe.{json,md} with date and machine.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import keras  # noqa: E402

import keras_ginger  # noqa: E402

CNN_SHAPES = [(3, 3, 1, 32), (32,), (3, 3, 32, 64), (64,), (1024, 128),
              (128,), (128, 10), (10,)]


def _median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def conv_grad(repeats):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((128, 8, 8, 32), np.float32))
    w = jnp.asarray(rng.random((3, 3, 32, 64), np.float32))

    def loss(w):
        y = jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y * y)

    plain = jax.jit(jax.grad(loss))
    in_cond = jax.jit(lambda w, p: jax.lax.cond(p, jax.grad(loss),
                                                jnp.zeros_like, w))
    jax.block_until_ready(plain(w))
    jax.block_until_ready(in_cond(w, True))
    return {"plain_ms": _median_ms(lambda: plain(w), repeats),
            "in_cond_ms": _median_ms(lambda: in_cond(w, True), repeats)}


def update(repeats, interval):
    """Median ms of the refreshing steps (all steps at interval 1, the even
    ones at interval 2)."""
    rng = np.random.default_rng(0)
    variables = [keras.Variable(0.1 * rng.standard_normal(s).astype("float32"))
                 for s in CNN_SHAPES]
    opt = keras_ginger.Ginger(curvature="auto", curvature_interval=interval)
    opt.build(variables)
    grads = [rng.standard_normal(s).astype("float32") for s in CNN_SHAPES]
    step = jax.jit(lambda tv, ov: opt.stateless_apply(ov, grads, tv))
    tv, ov = [v.value for v in variables], [v.value for v in opt.variables]
    tv, ov = step(tv, ov)  # compile; now at step 1 (not refreshing at 2)
    times = []
    for i in range(1, 2 * repeats + 1):
        start = time.perf_counter()
        tv, ov = step(tv, ov)
        jax.block_until_ready(tv)
        if i % interval == 0:
            times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times[:repeats])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=os.path.join(
        HERE, "results", "xla_cond_probe.json"))
    args = parser.parse_args()
    result = {
        "meta": {"date": time.strftime("%Y-%m-%d %H:%M"),
                 "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                 "jax": jax.__version__, "keras": keras.__version__,
                 "devices": [str(d) for d in jax.devices()],
                 "repeats": args.repeats},
        "conv_grad": conv_grad(args.repeats),
        "update_refresh_every_step_ms": update(args.repeats, 1),
        "update_refresh_in_cond_ms": update(args.repeats, 2),
    }
    c = result["conv_grad"]
    text = (f"XLA conditional probe, {result['meta']['date']}, "
            f"{result['meta']['machine']}, jax {jax.__version__} "
            f"(median ms of {args.repeats})\n\n"
            "| work | outside a cond | inside `lax.cond` (taken) | ratio |\n"
            "|---|---:|---:|---:|\n"
            f"| conv gradient (3x3, 32->64, 128x8x8) | {c['plain_ms']:.1f} | "
            f"{c['in_cond_ms']:.1f} | {c['in_cond_ms'] / c['plain_ms']:.1f}x |\n"
            "| Kronecker update, digits CNN shapes | "
            f"{result['update_refresh_every_step_ms']:.1f} | "
            f"{result['update_refresh_in_cond_ms']:.1f} | "
            f"{result['update_refresh_in_cond_ms'] / result['update_refresh_every_step_ms']:.1f}x |\n")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
