"""`tf.distribute` support for Ginger (TensorFlow backend only).

Keras's own TF optimizer all-reduces the gradients in replica context and
then updates each variable on every device inside one merge call. Ginger does
the same for both of its inputs. g is summed across replicas (Keras scales
the loss by 1/replicas, so the sum is the global mean gradient). A sampled d
is summed and divided by √R: with R equal shards of N/R examples,

    d = (1/√N) Σᵢ ∇ℓᵢ = (1/√R) Σ_r d_r,     d_r = (1/√(N/R)) Σ_{i∈r} ∇ℓᵢ.

Where no d was given (the empirical Fisher, d = g) d is the all-reduced g
itself, as on one device.
"""

import math

import keras
import tensorflow as tf

from keras_ginger import _keras_compat


def replica_id():
    """This replica's index in its sync group (a Python int), or None
    outside a replica context or where it is only known at run time."""
    context = tf.distribute.get_replica_context()
    if context is None:
        return None
    replica = tf.get_static_value(context.replica_id_in_sync_group)
    return None if replica is None else int(replica)


def distributed_update_step(optimizer, grads, variables, fisher,
                            learning_rate):
    """All-reduce (g, d) and update every variable on every device."""
    strategy = _keras_compat.distribution_strategy(optimizer)
    replicas = strategy.num_replicas_in_sync
    variables = [v.value if isinstance(v, keras.Variable) else v
                 for v in variables]
    context = tf.distribute.get_replica_context()
    grads = list(grads)
    sampled = [i for i, d in enumerate(fisher) if d is not None]
    if context is not None:
        grads = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        if sampled:
            reduced = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                         [fisher[i] for i in sampled])
            fisher = list(fisher)
            for i, d in zip(sampled, reduced):
                fisher[i] = d / math.sqrt(replicas)
    # The empirical Fisher: d is the (reduced) g.
    fisher = [g if d is None else d for g, d in zip(grads, fisher)]

    def update(var, grad, d, lr):
        optimizer._update_variables([grad], [var], lr, fisher=[d])

    def merge(distribution, grads, variables, fisher, lr):
        for grad, var, d in zip(grads, variables, fisher):
            distribution.extended.update(var, update, args=(grad, d, lr),
                                         group=False)

    _keras_compat.maybe_merge_call(merge, strategy, grads, variables, fisher,
                                   learning_rate)
