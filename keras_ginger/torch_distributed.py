"""`torch.distributed` support for Ginger (PyTorch backend only).

Keras's guide to multi-GPU training on the torch backend wraps the model in
`torch.nn.parallel.DistributedDataParallel` (DDP) and writes the training
loop. DDP averages the loss gradient g across ranks inside ``backward()``;
the Fisher gradient d is a second gradient (`torch.autograd.grad`), which
DDP never sees, so without a reduction every rank would grow its own
curvature and the replicas would drift apart. `all_reduce_fisher_grads`
combines d as one process would on the global batch: with R ranks of N/R
examples each,

    d = (1/√N) Σᵢ ∇ℓᵢ = (1/√R) Σ_r d_r,     d_r = (1/√(N/R)) Σ_{i∈r} ∇ℓᵢ,

the same rule as `keras_ginger.tf_distribute` uses for tf.distribute. Every
rank then applies the same (g, d) and stays bit-identical to the others.

    from keras_ginger.fisher_loss import REPLICA_SEED_STRIDE
    from keras_ginger.torch_distributed import all_reduce_fisher_grads

    # Each rank samples labels for its own rows, from its own stream.
    seed = 7 + REPLICA_SEED_STRIDE * torch.distributed.get_rank()
    y_pred = ddp_model(x)
    loss = loss_fn(y, y_pred)
    fisher = keras_ginger.fisher_loss(y_pred, loss_fn, seed=seed,
                                      step=optimizer.iterations)
    fisher_grads = torch.autograd.grad(fisher, params, retain_graph=True)
    loss.backward()                            # DDP: g averaged across ranks
    grads = [p.grad for p in params]
    optimizer.apply(grads, model.trainable_variables,
                    fisher_grads=all_reduce_fisher_grads(fisher_grads))

Keras's own `fit` does not run data-parallel on torch (it has no torch
distribution), so this is for custom loops.
"""

import math

import torch
import torch.distributed as dist

__all__ = ["all_reduce_fisher_grads"]


def all_reduce_fisher_grads(fisher_grads, group=None):
    """(1/√R) Σ_r d_r for each tensor in ``fisher_grads`` (None stays None),
    over the ranks of ``group`` (default: the whole process group), in one
    all-reduce. Without an initialised process group, or with one rank, the
    tensors are returned as they are."""
    fisher_grads = list(fisher_grads)
    if not (dist.is_available() and dist.is_initialized()):
        return fisher_grads
    ranks = dist.get_world_size(group)
    if ranks == 1:
        return fisher_grads
    present = [i for i, d in enumerate(fisher_grads) if d is not None]
    if not present:
        return fisher_grads
    flat = torch.cat([fisher_grads[i].detach().reshape(-1) for i in present])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat = flat / math.sqrt(ranks)
    out = list(fisher_grads)
    offset = 0
    for i in present:
        size = fisher_grads[i].numel()
        out[i] = flat[offset:offset + size].reshape(fisher_grads[i].shape)
        offset += size
    return out
