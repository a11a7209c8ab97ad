"""Fisher train step for the PyTorch backend (like TorchTrainer)."""

import warnings

import torch
from keras import tree
from keras.utils import unpack_x_y_sample_weight

from keras_ginger import _keras_compat
from keras_ginger import train_step


class FisherTrainStep(train_step.FisherTrainStepBase):
    """Mixin: ``class Net(FisherTrainStep, keras.Model)``.

    With an optimizer that takes ``fisher_grads`` (Ginger), one forward pass
    and two `torch.autograd.grad` calls on its graph (the first retains it):
    g, of Keras's own (scaled) loss, and d, of the sampled-label Fisher
    loss. Otherwise this is Keras's `TorchTrainer.train_step`.
    """

    def train_step(self, data):
        if not self._fisher_active():
            return super().train_step(data)
        x, y, sample_weight = unpack_x_y_sample_weight(data)

        if _keras_compat.call_has_training_arg(self):
            y_pred = self(x, training=True)
        else:
            y_pred = self(x)

        self.zero_grad()

        loss = _keras_compat.compute_loss(
            self, x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )
        _keras_compat.loss_tracker(self).update_state(
            loss,
            sample_weight=next(
                i for i in tree.flatten(x) if i is not None
            ).shape[0],
        )
        loss = self.optimizer.scale_loss(loss)
        # curvature_interval > 1: labels drawn only when d is due.
        due = self._fisher_due()
        due = True if due is None else bool(due)
        if due:
            f_loss = self.optimizer.scale_loss(
                self._fisher_loss(y, y_pred, sample_weight)
            )

        if self.trainable_weights:
            trainable_weights = self.trainable_weights[:]
            params = [v.value for v in trainable_weights]
            gradients = torch.autograd.grad(
                loss, params, retain_graph=due, allow_unused=True
            )
            if due:
                fisher_gradients = torch.autograd.grad(
                    f_loss, params, allow_unused=True
                )
            else:  # curvature_interval > 1 and not due: skip the pass
                fisher_gradients = [torch.zeros_like(p) for p in params]
            with torch.no_grad():
                train_step.apply_with_fisher(
                    self.optimizer,
                    list(gradients),
                    trainable_weights,
                    list(fisher_gradients),
                )
        else:
            warnings.warn("The model does not have any trainable weights.")

        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
