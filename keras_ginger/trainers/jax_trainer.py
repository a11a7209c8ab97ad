"""Fisher train step for the JAX backend (stateless, like JAXTrainer)."""

import jax
import keras

from keras_ginger import _keras_compat
from keras_ginger import train_step


class FisherTrainStep(train_step.FisherTrainStepBase):
    """Mixin: ``class Net(FisherTrainStep, keras.Model)``.

    With an optimizer that takes ``fisher_grads`` (Ginger), one forward pass
    and two VJPs from it (`jax.vjp`): g, the gradient of Keras's own (scaled)
    loss, and d, the gradient of the sampled-label Fisher loss. Otherwise
    this is Keras's `JAXTrainer.train_step`.

    The sampling seed is (the base seed held by
    ``self._fisher_seed_generator``, one of ``self.non_trainable_variables``,
    the optimizer's micro-step), read from the stateless train state, so
    every step (also under jit, and with steps_per_execution > 1) draws
    fresh samples.
    """

    def train_step(self, state, data):
        if not self._fisher_active():
            return super().train_step(state, data)
        (
            trainable_variables,
            non_trainable_variables,
            optimizer_variables,
            metrics_variables,
        ) = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)

        seed_generator = self._fisher_seed_generator
        seed_index = next(
            i
            for i, v in enumerate(self.non_trainable_variables)
            if v is seed_generator.state
        )

        def losses_fn(trainable_variables):
            # Keras's own loss: forward pass, compute_loss (regularization
            # losses, sample weights), scale_loss.
            loss, aux = self.compute_loss_and_updates(
                trainable_variables,
                non_trainable_variables,
                metrics_variables,
                x,
                y,
                sample_weight,
                training=True,
                optimizer_variables=optimizer_variables,
            )
            unscaled_loss, y_pred, new_non_trainable, new_metrics = aux
            new_non_trainable = list(new_non_trainable)
            # The Fisher loss, from the same y_pred; the base seed is read
            # from the train state (the step's draws are derived from it,
            # nothing is written back).
            with keras.StatelessScope(
                state_mapping=[
                    (seed_generator.state, new_non_trainable[seed_index])
                ]
                + list(zip(self.optimizer.variables, optimizer_variables))
            ):
                f_loss = self._fisher_loss(y, y_pred, sample_weight)
            with keras.StatelessScope(
                state_mapping=list(
                    zip(self.optimizer.variables, optimizer_variables)
                )
            ):
                f_loss = self.optimizer.scale_loss(f_loss)
            f_loss = keras.ops.cast(f_loss, loss.dtype)
            return (loss, f_loss), (
                unscaled_loss,
                y_pred,
                new_non_trainable,
                new_metrics,
            )

        (loss, f_loss), vjp_fn, aux = jax.vjp(
            losses_fn, trainable_variables, has_aux=True
        )
        one, zero = jax.numpy.ones_like(loss), jax.numpy.zeros_like(loss)
        (grads,) = vjp_fn((one, zero))
        with keras.StatelessScope(
            state_mapping=list(zip(self.optimizer.variables,
                                   optimizer_variables))
        ):
            due = self._fisher_due()
        if due is None:
            (fisher_grads,) = vjp_fn((zero, one))
        else:  # curvature_interval > 1: the second backward pass only when due
            fisher_grads = jax.lax.cond(
                due,
                lambda: list(vjp_fn((zero, one))[0]),
                lambda: [jax.numpy.zeros_like(g) for g in grads],
            )
        unscaled_loss, y_pred, non_trainable_variables, metrics_variables = aux

        trainable_variables, optimizer_variables = (
            train_step.stateless_apply_with_fisher(
                self.optimizer,
                optimizer_variables,
                grads,
                trainable_variables,
                fisher_grads,
            )
        )

        logs, metrics_variables = _keras_compat.update_metrics_variables(
            self, metrics_variables, unscaled_loss, x, y, y_pred, sample_weight
        )
        state = (
            trainable_variables,
            non_trainable_variables,
            optimizer_variables,
            metrics_variables,
        )
        return logs, state
