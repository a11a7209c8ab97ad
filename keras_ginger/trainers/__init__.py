"""`FisherTrainStep` for the active Keras backend.

Each backend module subclasses `keras_ginger.train_step.FisherTrainStepBase`
with a `train_step` modelled on Keras's own (keras/src/backend/*/trainer.py):
JAX stateless with `jax.vjp`, TensorFlow with a persistent `GradientTape`,
PyTorch with `torch.autograd.grad`.
"""

import keras

_backend = keras.backend.backend()
if _backend == "jax":
    from keras_ginger.trainers.jax_trainer import FisherTrainStep
elif _backend == "tensorflow":
    from keras_ginger.trainers.tensorflow_trainer import FisherTrainStep
elif _backend == "torch":
    from keras_ginger.trainers.torch_trainer import FisherTrainStep
else:  # pragma: no cover
    raise ImportError(
        f"keras_ginger: the Fisher train step supports the jax, tensorflow and "
        f"torch backends. Received: KERAS_BACKEND={_backend!r}"
    )

__all__ = ["FisherTrainStep"]
