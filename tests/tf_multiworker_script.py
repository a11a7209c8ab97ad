"""Ginger under `tf.distribute.MultiWorkerMirroredStrategy`: one worker
per process (TF_CONFIG, CPU, collectives on localhost).

    python -m tests.tf_multiworker_script RANK PORT0,PORT1,... OUT

Each worker feeds its own half of every global batch: the model,
`with_fisher` and `Ginger` are made inside ``strategy.scope()`` (`build`),
and trained on ``strategy.distribute_datasets_from_function`` (worker r:
rows [r·B/R, (r+1)·B/R) of each global batch of B). `global_batches` is
the one-process reference: `fit` on the global batches, no strategy. The
Fisher labels come from a deterministic 'sampler' (ŷ = f + 0.5), so that d
does not depend on how the batch is split (each replica draws labels for
its own rows, replica r from base seed + REPLICA_SEED_STRIDE·r: Gaussian
draws differ from one process's draws on the global batch).

Keras 3 `fit` does not run under MultiWorkerMirroredStrategy with more than
one worker (keras-team/keras#20585, tensorflow/tensorflow#72388): each
worker trains the same way twice, OUT (.npz) holding the `state` of both,
``loop_*``: a custom loop, ``strategy.run(model.train_step)`` (no Keras
internals touched), and ``fit_*``: `fit` with the two Keras bugs worked
around (`symbolic_build_per_leaf`, `mean_of_scalar_logs`).
"""

import contextlib
import json
import os
import sys

os.environ["KERAS_BACKEND"] = "tensorflow"

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ginger  # noqa: E402
from tests.multiprocess import local_rows  # noqa: E402
from tests.multiprocess import shifted_mean  # noqa: E402
from tests.multiprocess import state  # noqa: E402,F401

GLOBAL_BATCH, STEPS, SEED = 16, 6, 3


def data():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((GLOBAL_BATCH * STEPS, 5)).astype("float32")
    Y = rng.standard_normal((GLOBAL_BATCH * STEPS, 3)).astype("float32")
    return X, Y


def build(strategy=None):
    """The model, `with_fisher` and compiled with Ginger, inside
    ``strategy.scope()``."""
    keras.utils.set_random_seed(0)
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = keras.Sequential([keras.Input((5,)),
                                  keras.layers.Dense(8, activation="tanh"),
                                  keras.layers.Dense(3)])
        keras_ginger.with_fisher(model, sampler=shifted_mean, seed=SEED)
        model.compile(optimizer=keras_ginger.Ginger(learning_rate=0.01,
                                                    tau=4),
                      loss="mse")
    return model


def global_batches():
    """The one-process reference: `fit` on the global batches, no
    strategy."""
    model = build()
    X, Y = data()
    model.fit(X, Y, batch_size=GLOBAL_BATCH, shuffle=False, verbose=0)
    return state(model)


def distributed_dataset(strategy):
    """Each worker's input pipeline: its rows of every global batch."""
    import tensorflow as tf

    X, Y = data()

    def dataset_fn(context):
        per_replica = context.get_per_replica_batch_size(GLOBAL_BATCH)
        parts = GLOBAL_BATCH // per_replica
        index = context.input_pipeline_id  # = the worker (1 replica each)
        return tf.data.Dataset.from_tensor_slices(
            (local_rows(X, index, parts, GLOBAL_BATCH),
             local_rows(Y, index, parts, GLOBAL_BATCH))
        ).batch(per_replica)

    return strategy.distribute_datasets_from_function(dataset_fn)


def custom_loop(strategy):
    """STEPS steps of the model's own train step (`with_fisher`'s: g and d
    to Ginger) under ``strategy.run``, as Keras's guide to custom training
    loops with tf.distribute runs them."""
    import tensorflow as tf

    model = build(strategy)
    with strategy.scope():
        # Ginger's state is created here, not in the first replica step.
        model.optimizer.build(model.trainable_variables)

    @tf.function
    def train_step(batch):
        return strategy.run(model.train_step, args=(batch,))

    for batch in distributed_dataset(strategy):
        train_step(batch)
    return state(model)


def fit(strategy):
    """STEPS steps of `fit`, with Keras's multi-worker bugs worked
    around."""
    model = build(strategy)
    symbolic_build_per_leaf(model, strategy)
    with mean_of_scalar_logs():
        model.fit(distributed_dataset(strategy), epochs=1, verbose=0)
    return state(model)


def symbolic_build_per_leaf(model, strategy):
    """Works around keras-team/keras#20585 (Keras 3.15.1 too): under
    MultiWorkerMirroredStrategy with more than one worker, `fit` fails
    before the first step, in ``Trainer._maybe_symbolic_build``: it passes
    the whole first batch, a nest (x, y), to ``strategy.reduce``, which
    reduces one value (``ValueError: Attempt to convert a value (PerReplica:
    ...) with an unsupported type ... to a Tensor``). That batch only gives
    the shapes for building the compiled loss and metrics: here it is this
    worker's own first batch, leaf by leaf."""
    from keras import tree

    build = model._maybe_symbolic_build

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tree.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0],
                    next(batches))
                break
        return build(data_batch=data_batch)

    object.__setattr__(model, "_maybe_symbolic_build", maybe_symbolic_build)


@contextlib.contextmanager
def mean_of_scalar_logs():
    """Works around tensorflow/tensorflow#72388 (Keras 3.15.1 too): under
    MultiWorkerMirroredStrategy, Keras's TF train function reduces the
    logs of every step with ``strategy.reduce("MEAN", v, axis=0)``, and a
    scalar log (the loss) has no axis 0 (``ValueError: Invalid reduction
    dimension 0 for input with 0 dimensions``). Here a scalar is averaged
    over the replicas (axis=None). Only for this worker's `fit` calls made
    inside the context (Keras's TF trainer looks the function up at each
    call of the train function's tracing)."""
    from keras import tree
    from keras.src.backend.tensorflow import trainer

    original = trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction != "auto":
            return original(values, strategy, reduction)
        return tree.map_structure(
            lambda v: strategy.reduce(
                "MEAN", v, axis=None if v.shape.rank == 0 else 0), values)

    trainer.reduce_per_replica = reduce_per_replica
    try:
        yield
    finally:
        trainer.reduce_per_replica = original



def main():
    rank, ports, out = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
        "task": {"type": "worker", "index": rank}})
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    assert strategy.num_replicas_in_sync == len(ports)
    result = {f"loop_{k}": v for k, v in custom_loop(strategy).items()}
    result.update({f"fit_{k}": v for k, v in fit(strategy).items()})
    np.savez(out, **result)


if __name__ == "__main__":
    main()
