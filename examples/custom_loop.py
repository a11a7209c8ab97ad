"""Ginger in your own training loop: one recipe per backend.

Each recipe takes the loss gradient g and the Fisher gradient d from one
forward pass and hands both to the optimizer. d is the gradient of
`keras_ginger.fisher_loss` (labels sampled from the model's predictions):
with ``seed=s`` and ``step=`` the optimizer step, a loop samples exactly the
labels that ``fit`` samples with ``with_fisher(model, seed=s)``, and ends at
the same weights (tests/test_custom_loop.py checks it on every backend).

    KERAS_BACKEND=jax python examples/custom_loop.py      # or tensorflow, torch
"""

import numpy as np

import keras

import keras_ginger

SEED = 7  # the Fisher sampling seed (as with_fisher(model, seed=SEED))
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def train_jax(model, optimizer, batches):
    """JAX: `jax.vjp` of (loss, Fisher loss), `stateless_apply` under jit."""
    import jax

    optimizer.build(model.trainable_variables)

    def losses(trainable, non_trainable, x, y, step):
        y_pred, non_trainable = model.stateless_call(
            trainable, non_trainable, x, training=True)
        loss = LOSS(y, y_pred)
        fisher = keras_ginger.fisher_loss(y_pred, LOSS, y_true=y, seed=SEED,
                                          step=step)
        return (loss, fisher), non_trainable

    @jax.jit
    def train_step(state, x, y, step):
        trainable, non_trainable, opt_vars = state
        (loss, _), vjp, non_trainable = jax.vjp(
            lambda t: losses(t, non_trainable, x, y, step), trainable,
            has_aux=True)
        (grads,) = vjp((1.0, 0.0))         # g: gradient of the loss
        (fisher_grads,) = vjp((0.0, 1.0))  # d: gradient of the Fisher loss
        trainable, opt_vars = optimizer.stateless_apply(
            opt_vars, grads, trainable, fisher_grads=fisher_grads)
        return loss, (trainable, non_trainable, opt_vars)

    state = ([v.value for v in model.trainable_variables],
             [v.value for v in model.non_trainable_variables],
             [v.value for v in optimizer.variables])
    for step, (x, y) in enumerate(batches):
        loss, state = train_step(state, x, y, step)
    for variables, values in zip(
            (model.trainable_variables, model.non_trainable_variables,
             optimizer.variables), state):
        for variable, value in zip(variables, values):
            variable.assign(value)
    return float(loss)


def train_tensorflow(model, optimizer, batches):
    """TensorFlow: a persistent `GradientTape`, `apply` in a tf.function."""
    import tensorflow as tf

    optimizer.build(model.trainable_variables)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape(persistent=True) as tape:
            y_pred = model(x, training=True)
            loss = LOSS(y, y_pred)
            fisher = keras_ginger.fisher_loss(
                y_pred, LOSS, y_true=y, seed=SEED, step=optimizer.iterations)
        grads = tape.gradient(loss, model.trainable_variables)
        fisher_grads = tape.gradient(fisher, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables,
                        fisher_grads=fisher_grads)
        return loss

    for x, y in batches:
        loss = train_step(x, y)
    return float(loss)


def train_torch(model, optimizer, batches):
    """PyTorch: two `torch.autograd.grad` calls from one forward pass."""
    import torch

    optimizer.build(model.trainable_variables)
    params = [v.value for v in model.trainable_variables]
    for x, y in batches:
        y_pred = model(x, training=True)
        loss = LOSS(y, y_pred)
        fisher = keras_ginger.fisher_loss(
            y_pred, LOSS, y_true=y, seed=SEED, step=optimizer.iterations)
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        fisher_grads = torch.autograd.grad(fisher, params)
        with torch.no_grad():
            optimizer.apply(grads, model.trainable_variables,
                            fisher_grads=fisher_grads)
    return float(loss.detach())


TRAIN = {"jax": train_jax, "tensorflow": train_tensorflow,
         "torch": train_torch}


def make_model():
    return keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(10),
    ])


def main():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    y = y.astype("int32")
    keras.utils.set_random_seed(0)
    model = make_model()
    optimizer = keras_ginger.Ginger(tau=8)
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 1728, 64)] * 3
    train = TRAIN[keras.backend.backend()]
    first = float(keras.ops.convert_to_numpy(LOSS(y, model(x))))
    last = train(model, optimizer, batches)
    print(f"loss on all data before {first:.3f}, last batch after {last:.3f}")


if __name__ == "__main__":
    main()
