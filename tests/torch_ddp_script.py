"""Ginger under `torch.distributed` + DistributedDataParallel, one rank per
process (gloo on localhost), as Keras's torch multi-GPU guide trains.

    python -m tests.torch_ddp_script RANK WORLD PORT MODE OUT

Each rank trains on its shard of every global batch; `run` with WORLD = 1
is the one-process reference on the global batch. MODE: ``shifted`` (a
deterministic sampler, ŷ = f + 0.5, so that d does not depend on how the
batch is split), ``sampled`` (the Gaussian sampler of the MSE loss) or
``unreduced`` (the control: d not combined across ranks).
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "torch"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import keras_ginger  # noqa: E402
from keras_ginger.fisher_loss import REPLICA_SEED_STRIDE  # noqa: E402
from keras_ginger.torch_distributed import all_reduce_fisher_grads  # noqa: E402
from tests.multiprocess import shifted_mean  # noqa: E402

GLOBAL_BATCH, STEPS = 16, 6


def run(rank, world, mode):
    """Weights and optimizer variables after STEPS steps, as NumPy arrays."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)),
                              keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(3)])
    opt = keras_ginger.Ginger(learning_rate=0.01, tau=4)
    opt.build(model.trainable_variables)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    params = [v.value for v in model.trainable_variables]
    loss_fn = keras.losses.MeanSquaredError()
    rng = np.random.default_rng(0)
    X = rng.standard_normal((GLOBAL_BATCH * STEPS, 5)).astype("float32")
    Y = rng.standard_normal((GLOBAL_BATCH * STEPS, 3)).astype("float32")
    shard = GLOBAL_BATCH // world
    sampler = None if mode == "sampled" else shifted_mean
    for step in range(STEPS):
        lo = step * GLOBAL_BATCH + rank * shard
        x = torch.from_numpy(X[lo:lo + shard])
        y = torch.from_numpy(Y[lo:lo + shard])
        y_pred = net(x)
        loss = loss_fn(y, y_pred)
        # Each rank samples its own rows from its own stream.
        fisher = keras_ginger.fisher_loss(
            y_pred, loss_fn, seed=7 + REPLICA_SEED_STRIDE * rank, step=step,
            sampler=sampler)
        fisher_grads = torch.autograd.grad(fisher, params, retain_graph=True)
        for p in params:
            p.grad = None
        loss.backward()  # DDP: g averaged across the ranks
        grads = [p.grad for p in params]
        if mode != "unreduced":
            fisher_grads = all_reduce_fisher_grads(fisher_grads)
        with torch.no_grad():
            opt.apply(grads, model.trainable_variables,
                      fisher_grads=fisher_grads)
    return ([np.array(keras.ops.convert_to_numpy(v))
             for v in model.trainable_variables],
            [np.array(keras.ops.convert_to_numpy(v)) for v in opt.variables])


def main():
    rank, world, port, mode, out = sys.argv[1:6]
    rank, world = int(rank), int(world)
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
        world_size=world)
    try:
        weights, state = run(rank, world, mode)
    finally:
        torch.distributed.destroy_process_group()
    np.savez(out, *weights, *state, n=len(weights))


if __name__ == "__main__":
    main()
