"""The first train step with JAX's persistent compilation cache (JAX only).

    python benchmarks/first_step_cache.py [--model char_lm]

A user waits for the first step's compilation on every run. JAX can keep
compiled programs on disk (`jax_compilation_cache_dir`); this times the
first `train_on_batch` of `benchmarks/train_step.py`'s model, for Adam and
for Ginger + `with_fisher`, in fresh processes: without the cache, then
twice with a new, empty cache directory (the first run fills it, the second
reads it). Prints seconds and writes results/first_step_cache.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# JAX only; set before `bench_env` imports Keras.
os.environ["KERAS_BACKEND"] = "jax"

HERE = os.path.dirname(os.path.abspath(__file__))


def _worker(model, key, cache):
    sys.path.insert(0, os.path.dirname(HERE))
    sys.path.insert(0, HERE)
    import jax

    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import numpy as np

    import train_step

    spec = train_step.MODELS[model]
    net, _ = train_step.make(spec.build, train_step.CONFIGS[key], "auto")
    x, y = spec.inputs(np.random.default_rng(0), spec.batch_size)
    t0 = time.perf_counter()
    net.train_on_batch(x, y)
    print("SECONDS", time.perf_counter() - t0)


def _run(model, key, cache):
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", key,
         "--model", model] + (["--cache", cache] if cache else []),
        env=dict(os.environ, KERAS_BACKEND="jax"), capture_output=True,
        text=True, check=True).stdout
    return float(out.split("SECONDS")[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="char_lm")
    parser.add_argument("--worker", default=None)
    parser.add_argument("--cache", default=None)
    args = parser.parse_args()
    if args.worker:
        return _worker(args.model, args.worker, args.cache)
    rows = {}
    for key in ("adam", "ginger_fisher"):
        with tempfile.TemporaryDirectory() as cache:
            rows[key] = {
                "no_cache_s": _run(args.model, key, None),
                "cache_first_run_s": _run(args.model, key, cache),
                "cache_second_run_s": _run(args.model, key, cache),
            }
        print(key, {k: round(v, 2) for k, v in rows[key].items()},
              flush=True)
    sys.path.insert(0, HERE)
    import bench_env

    result = dict(bench_env.stamp(), model=args.model, first_step=rows)
    out = os.path.join(HERE, "results", "first_step_cache.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
