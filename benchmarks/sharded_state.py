"""Ginger's state sharded across data-parallel devices (`shard_state=True`,
ZeRO-1) against the replicated state: optimizer-state bytes per device and
train-step time on 1, 2 and 4 simulated CPU devices (JAX).

    python benchmarks/sharded_state.py [--width 512] [--tau 8] [--steps 20]

The devices are XLA's simulated host devices (one process,
--xla_force_host_platform_device_count=4) sharing this machine's cores, so
the step times show the collectives' overhead, not a speed-up. Writes
results/sharded_state_jax.{json,md}.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ginger  # noqa: E402


class _StepTimer(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        jax.block_until_ready(self.model.trainable_variables[0].value)
        self.times.append(time.perf_counter() - self._t0)


def run(devices, shard, args):
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices))
    keras.utils.set_random_seed(0)
    w = args.width
    model = keras.Sequential([
        keras.Input((w,)),
        keras.layers.Dense(w, activation="relu"),
        keras.layers.Dense(w, activation="relu"),
        keras.layers.Dense(16),
    ])
    model = keras_ginger.with_fisher(model)
    model.compile(optimizer=keras_ginger.Ginger(tau=args.tau,
                                                shard_state=shard),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    rng = np.random.default_rng(0)
    batch = 64
    X = rng.standard_normal((batch * args.steps, w)).astype("float32")
    Y = rng.integers(0, 16, batch * args.steps)
    timer = _StepTimer()
    timer.times = []
    model.fit(X, Y, batch_size=batch, epochs=1, verbose=0,
              callbacks=[timer])
    opt = model.optimizer
    first = jax.devices()[0]
    per_device = sum(s.data.nbytes for v in opt.variables
                     for s in v.value.addressable_shards if s.device == first)
    total = sum(int(np.prod(v.shape)) * 4 for v in opt.variables)
    keras.distribution.set_distribution(None)
    return {"devices": len(devices), "shard_state": shard,
            "params": model.count_params(),
            "state_bytes_per_device": per_device,
            "state_bytes_total": total,
            "step_ms": 1e3 * statistics.median(timer.times[2:]),
            "first_step_s": timer.times[0]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--tau", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    devices = keras.distribution.list_devices("cpu")
    rows = []
    for count in (1, 2, 4):
        for shard in (False, True):
            row = run(devices[:count], shard, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = {r["devices"]: r for r in rows if not r["shard_state"]}
    for r in rows:
        ref = base[r["devices"]]
        r["bytes_over_replicated"] = (r["state_bytes_per_device"]
                                      / ref["state_bytes_per_device"])
        r["step_over_replicated"] = r["step_ms"] / ref["step_ms"]
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.processor() or platform.machine()}, "
                       f"{os.cpu_count()} cores",
            "keras": keras.__version__, "jax": jax.__version__,
            "width": args.width, "tau": args.tau, "steps": args.steps,
            "argv": sys.argv[1:]}
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "sharded_state_jax.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [
        f"# Sharded optimizer state ({meta['date']})", "",
        f"{meta['machine']}; Keras {meta['keras']}, JAX {meta['jax']}; "
        f"MLP {args.width}-{args.width}-{args.width}-16 "
        f"({rows[0]['params']:,} parameters), `Ginger(tau={args.tau})` + "
        "`with_fisher`, `keras.distribution.DataParallel` over simulated "
        f"CPU devices, batch 64, median of {args.steps - 2} steps.", "",
        "| devices | shard_state | state MB / device | ÷ replicated | "
        "step ms | ÷ replicated |",
        "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['devices']} | {r['shard_state']} | "
            f"{r['state_bytes_per_device'] / 2**20:.2f} | "
            f"{r['bytes_over_replicated']:.3f} | {r['step_ms']:.1f} | "
            f"{r['step_over_replicated']:.2f} |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(out, "sharded_state_jax.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
