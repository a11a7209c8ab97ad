"""keras-ginger: the Ginger optimizer (arXiv 2402.03295) for Keras 3.

    model = keras_ginger.with_fisher(model)   # sampled-label Fisher gradient
    model.compile(optimizer=keras_ginger.Ginger(tau=8), loss=...)
    model.fit(...)

Modules, imports pointing one way (each imports only those above it):

    _keras_compat   every Keras internal used, in one place
    curvature       pure curvature math of the vector block (no Keras state)
    kronecker       pure math of the Kronecker block (no Keras state)
    blocks          curvature blocks: identity, vector, Kronecker
    optimizer       `Ginger`, the Keras optimizer
    samplers        label samplers (the model's predictive distribution)
    fisher_loss     the Fisher loss whose gradient is d
    train_step      train-step base: seeds, hand-over of g and d
    trainers        the per-backend train steps (`FisherTrainStep`)
    wrapping        `with_fisher` (the class swap)
    callbacks       `CurvatureLogger`, `NonFiniteReporter`, plots
    checkpoint      `load_training_state` (weights + optimizer state)

Backend-only modules, not imported here: `tf_distribute` (tf.distribute,
used by `Ginger` itself) and `torch_distributed` (`all_reduce_fisher_grads`
for torch.distributed custom loops).
"""

from keras_ginger import callbacks
from keras_ginger.checkpoint import load_training_state
from keras_ginger import blocks
from keras_ginger import curvature
from keras_ginger import kronecker
from keras_ginger import samplers
from keras_ginger.fisher_loss import fisher_loss
from keras_ginger.optimizer import Ginger
from keras_ginger.trainers import FisherTrainStep
from keras_ginger.wrapping import with_fisher

__version__ = "0.1.0"

__all__ = ["Ginger", "FisherTrainStep", "with_fisher", "fisher_loss",
           "load_training_state", "callbacks", "curvature", "kronecker",
           "blocks", "samplers"]
