"""Fisher train step for the JAX backend (stateless, like JAXTrainer)."""

import contextlib
import functools

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

    With ``curvature_interval`` > 1, `make_train_function` compiles two
    steps, with and without the Fisher pass (no sampled labels, no second
    VJP), and picks one per batch on the host from the optimizer's step
    count in the train state (one scalar read per step). A backward pass
    inside `jax.lax.cond` runs far slower on XLA:CPU than outside it
    (a convolution's VJP 34×, benchmarks/results/xla_cond_probe.md), so the
    in-graph `lax.cond` is only the fallback: under a
    `keras.distribution`, with NNX, or where Keras's JAX trainer lacks the
    step loop this relies on.
    """

    # None: decide in the graph whether d is due; True / False: the step
    # being traced is the one with / without the Fisher pass.
    _static_fisher_due = None

    @contextlib.contextmanager
    def _tracing_fisher_due(self, due):
        previous = self._static_fisher_due
        self._static_fisher_due = due
        try:
            yield
        finally:
            self._static_fisher_due = previous

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        super().make_train_function(force=force)
        if not self._dispatch_fisher_on_host():
            return self.train_function

        def compiled(due):
            def step(state, data):
                with self._tracing_fisher_due(due):
                    return self.train_step(state, data)

            return jax.jit(step, donate_argnums=0)

        steps = {True: compiled(True), False: compiled(False)}

        def dispatch(state, data):
            return steps[self._host_fisher_due(state)](state, data)

        self.train_function = _keras_compat.jax_step_loop(self, dispatch)
        return self.train_function

    def _dispatch_fisher_on_host(self):
        """Whether `make_train_function` picks the step on the host."""
        return (self._fisher_active()
                and self._fisher_due() is not None
                and not self.run_eagerly
                and self.jit_compile
                and keras.distribution.distribution() is None
                and not keras.config.is_nnx_enabled()
                and hasattr(self, "_make_function"))

    def _host_fisher_due(self, state):
        """Python bool: is d due at the step that `state` is about to take
        (`Ginger.fisher_due()` evaluated on the state's optimizer
        variables)?"""
        return bool(self._fisher_due_in(state[2]))

    def _fisher_due_in(self, optimizer_variables):
        """`_fisher_due()` on the given optimizer variables (stateless)."""
        with keras.StatelessScope(state_mapping=list(
                zip(self.optimizer.variables, optimizer_variables))):
            return self._fisher_due()

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
        # Is d due: True or False where known while tracing (every step;
        # the step `make_train_function` compiled with or without d; eager),
        # else a traced boolean for the in-graph `lax.cond`.
        due = self._fisher_due_in(optimizer_variables)
        if due is None:
            due = True
        elif self._static_fisher_due is not None:
            due = self._static_fisher_due
        elif not _keras_compat.is_in_jax_tracing_scope(due):
            due = bool(due)

        seed_generator = self._fisher_seed_generator
        seed_index = next(
            i
            for i, v in enumerate(self.non_trainable_variables)
            if v is seed_generator.state
        )

        def losses_fn(trainable_variables, with_fisher=True):
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
            if not with_fisher:
                return (loss, keras.ops.zeros_like(loss)), (
                    unscaled_loss, y_pred, new_non_trainable, new_metrics)
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
            functools.partial(losses_fn, with_fisher=due is not False),
            trainable_variables, has_aux=True
        )
        one, zero = jax.numpy.ones_like(loss), jax.numpy.zeros_like(loss)
        (grads,) = vjp_fn((one, zero))
        if due is True:
            (fisher_grads,) = vjp_fn((zero, one))
        elif due is False:
            fisher_grads = [jax.numpy.zeros_like(g) for g in grads]
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
