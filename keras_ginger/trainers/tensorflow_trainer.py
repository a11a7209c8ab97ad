"""Fisher train step for the TensorFlow backend (like TensorFlowTrainer)."""

import warnings

import tensorflow as tf
from keras import tree
from keras.utils import unpack_x_y_sample_weight

from keras_ginger import _keras_compat
from keras_ginger import train_step
from keras_ginger.fisher_loss import REPLICA_SEED_STRIDE


def _dense(grads, variables):
    """tf.cond needs the same structure from both branches: no None, no
    IndexedSlices."""
    return [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
            for g, v in zip(grads, variables)]


class FisherTrainStep(train_step.FisherTrainStepBase):
    """Mixin: ``class Net(FisherTrainStep, keras.Model)``.

    With an optimizer that takes ``fisher_grads`` (Ginger), one forward pass
    under a persistent `tf.GradientTape` and two gradients from it: g, of
    Keras's own (scaled) loss, and d, of the sampled-label Fisher loss.
    Otherwise this is Keras's `TensorFlowTrainer.train_step`.
    """

    def _fisher_seed_base(self):
        # Under tf.distribute each replica samples labels for its own rows:
        # replica r draws from base + REPLICA_SEED_STRIDE·r (replica 0 as
        # one device), not all from one stream.
        base = super()._fisher_seed_base()
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return base
        replica = tf.cast(context.replica_id_in_sync_group, base.dtype)
        return base + replica * REPLICA_SEED_STRIDE

    def _scaled_fisher_loss(self, y, y_pred, sample_weight):
        return self.optimizer.scale_loss(
            self._fisher_loss(y, y_pred, sample_weight))

    def train_step(self, data):
        if not self._fisher_active():
            return super().train_step(data)
        x, y, sample_weight = unpack_x_y_sample_weight(data)

        with tf.GradientTape(persistent=True) as tape:
            if _keras_compat.call_has_training_arg(self):
                y_pred = self(x, training=True)
            else:
                y_pred = self(x)
            loss = _keras_compat.compute_loss(
                self,
                x=x,
                y=y,
                y_pred=y_pred,
                sample_weight=sample_weight,
                training=True,
            )
            _keras_compat.loss_tracker(self).update_state(
                _keras_compat.unscale_loss_for_distribution(loss),
                sample_weight=tf.shape(
                    next(i for i in tree.flatten(x) if i is not None)
                )[0],
            )
            loss = self.optimizer.scale_loss(loss)
            # curvature_interval > 1: labels drawn only when d is due.
            due = self._fisher_due()
            if due is None:
                f_loss = self._scaled_fisher_loss(y, y_pred, sample_weight)
            else:
                f_loss = tf.cond(
                    due,
                    lambda: tf.cast(self._scaled_fisher_loss(
                        y, y_pred, sample_weight), loss.dtype),
                    lambda: tf.zeros_like(loss),
                )

        if self.trainable_weights:
            trainable_weights = self.trainable_weights
            gradients = tape.gradient(loss, trainable_weights)
            if due is None:
                fisher_gradients = tape.gradient(f_loss, trainable_weights)
            else:  # curvature_interval > 1: the second pass only when due
                fisher_gradients = tf.cond(
                    due,
                    lambda: _dense(tape.gradient(f_loss, trainable_weights),
                                   trainable_weights),
                    lambda: [tf.zeros_like(v) for v in trainable_weights],
                )
            del tape
            train_step.apply_with_fisher(
                self.optimizer, gradients, trainable_weights, fisher_gradients
            )
        else:
            del tape
            warnings.warn("The model does not have any trainable weights.")

        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
