"""Ginger under multi-process JAX (`jax.distributed`, one CPU device per
process, gloo collectives on localhost) with `keras.distribution.DataParallel`
over the global device list, as on a multi-host TPU/GPU slice.

    python -m tests.jax_multiprocess_script RANK WORLD PORT OUT CKPT

Each process feeds its own half of every global batch
(``DataParallel(..., auto_shard_dataset=False)``; Keras assembles the global
batch with `jax.make_array_from_process_local_data`), and the train step runs
as one SPMD program over both devices: g and d are the gradients of the loss
of the global batch, reduced by XLA; the labels of d are drawn by the
model's Gaussian sampler (`with_fisher`), and JAX's partitionable
threefry draws the same numbers for a sharded as for an unsharded batch.
Process 0 writes the model to CKPT (.keras): DataParallel's
variables are replicated, so each process can read them whole (see
`save_on_this_process`).

`run` with WORLD = 1 is the one-process reference on the global batch.
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "jax"

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ginger  # noqa: E402
from tests.multiprocess import local_rows  # noqa: E402
from tests.multiprocess import state  # noqa: E402,F401

GLOBAL_BATCH, STEPS, SEED = 16, 8, 3


def data():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((GLOBAL_BATCH * (STEPS + 1), 5)).astype("float32")
    Y = rng.standard_normal((GLOBAL_BATCH * (STEPS + 1), 3)).astype("float32")
    return X, Y


def build():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)),
                              keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(3)])
    model.compile(optimizer=keras_ginger.Ginger(learning_rate=0.01, tau=4),
                  loss="mse")
    return keras_ginger.with_fisher(model, seed=SEED)


def fit(model, X, Y, rank, world, steps):
    x, y = (local_rows(a, rank, world, GLOBAL_BATCH) for a in (X, Y))
    model.fit(x[:steps * GLOBAL_BATCH // world],
              y[:steps * GLOBAL_BATCH // world],
              batch_size=GLOBAL_BATCH // world, epochs=1, shuffle=False,
              verbose=0)


def run(rank, world, ckpt=None):
    """The `state` after STEPS steps on the first STEPS global batches
    (this process's 1/world of each); process 0 saves the model to
    ``ckpt``."""
    model = build()
    X, Y = data()
    fit(model, X, Y, rank, world, STEPS)
    if ckpt and rank == 0:
        save_on_this_process(model, ckpt)
    return state(model)


def save_on_this_process(model, path):
    """``model.save(path)`` from one process of a multi-process run.

    The variables of DataParallel are replicated, so this process reads each
    whole. But `model.save` also creates variables (Keras's saver builds a
    throwaway ``Optimizer(1.0)`` to list the attributes it skips), and under
    a multi-process distribution creating a variable is a collective (JAX's
    `device_put` checks that every process passes the same value): called
    on one process alone, `model.save` hangs. With the distribution unset
    for the call, those variables are local and nothing waits for the other
    processes. (Calling `model.save` on every process, each to a path of
    its own, works too.) A variable sharded across processes (e.g. Ginger's
    state with ``shard_state=True``) cannot be read by one process:
    `model.save` raises "Fetching value for `jax.Array` that spans
    non-addressable (non process local) devices is not possible".
    """
    distribution = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        model.save(path)
    finally:
        keras.distribution.set_distribution(distribution)


def resume(ckpt):
    """Loads ``ckpt`` in this (plain) process and trains one more step on
    global batch STEPS + 1; (state loaded, state after the step)."""
    model = keras_ginger.with_fisher(keras.saving.load_model(ckpt),
                                     seed=SEED)
    loaded = state(model)
    X, Y = data()
    lo = STEPS * GLOBAL_BATCH
    model.fit(X[lo:], Y[lo:], batch_size=GLOBAL_BATCH, epochs=1,
              shuffle=False, verbose=0)
    return loaded, state(model)


def main():
    rank, world, port, out, ckpt = sys.argv[1:6]
    rank, world = int(rank), int(world)
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=world, process_id=rank)
    assert jax.process_count() == world and len(jax.devices()) == world
    keras.distribution.set_distribution(keras.distribution.DataParallel(
        devices=jax.devices(), auto_shard_dataset=False))
    np.savez(out, **run(rank, world, ckpt))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
