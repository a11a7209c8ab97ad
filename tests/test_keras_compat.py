"""Each Keras internal in keras_ginger._keras_compat resolves on the Keras
that `make test` installs, and does what keras-ginger relies on."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_ginger
from keras_ginger import _keras_compat as compat

BACKEND = keras.backend.backend()


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras_ginger.Ginger(tau=2), loss="mse")
    x = np.ones((4, 3), "float32")
    y = np.zeros((4, 2), "float32")
    model.fit(x, y, verbose=0)
    return model, x, y


def test_module_level_internals_resolve():
    assert "weight_decay" in compat.base_optimizer_keyword_args
    assert "weight_decay" in keras_ginger.Ginger.__doc__
    emb = keras.layers.Embedding(5, 2, mask_zero=True)
    out = emb(np.array([[1, 0]]))
    np.testing.assert_array_equal(
        ops.convert_to_numpy(compat.get_keras_mask(out)), [[True, False]])
    loss = ops.convert_to_tensor(3.0)
    assert float(compat.unscale_loss_for_distribution(loss)) == 3.0


def test_jax_tracing_scope():
    assert not compat.is_in_jax_tracing_scope(ops.ones((2,)))
    if BACKEND == "jax":
        import jax

        seen = []
        jax.jit(lambda x: seen.append(compat.is_in_jax_tracing_scope(x))
                or x)(ops.ones((2,)))
        assert seen == [True]


def test_register_like_copies_serialization_names():
    @keras.saving.register_keras_serializable(package="compat_test")
    class Base(keras.layers.Layer):
        pass

    class New(Base):
        pass

    compat.register_like(New, Base)
    assert (keras.saving.get_registered_name(New)
            == keras.saving.get_registered_name(Base) == "compat_test>Base")


def test_model_internals(trained):
    model, x, y = trained
    loss = compat.compile_loss(model)
    assert loss is not None and loss.built
    ((path, loss_obj, weight, name),) = compat.flat_losses(loss)
    assert isinstance(loss_obj, keras.losses.Loss)
    assert len(compat.build_structures(loss)) == 2
    assert compat.call_has_training_arg(model) in (True, False)
    value = compat.compute_loss(model, x=x, y=y, y_pred=model(x),
                                sample_weight=None, training=False)
    expected = np.mean(ops.convert_to_numpy(model(x)) ** 2)
    np.testing.assert_allclose(float(value), expected, rtol=1e-6)
    assert isinstance(compat.loss_tracker(model), keras.metrics.Mean)
    if BACKEND == "jax":
        logs, _ = compat.update_metrics_variables(
            model, [v.value for v in model.metrics_variables], value, x, y,
            model(x), None)
        assert "loss" in logs
    uncompiled = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert compat.compile_loss(uncompiled) is None


def test_tracker_unlocked_and_post_track(trained):
    model, *_ = trained
    with compat.tracker_unlocked(model):
        model.compat_probe = keras.Variable(np.zeros(2), trainable=False)
    compat.post_track_variable(model, model.compat_probe)
    assert any(v is model.compat_probe for v in model.non_trainable_variables)


def test_optimizer_internals(trained):
    model, *_ = trained
    opt = model.optimizer
    assert int(ops.convert_to_numpy(compat.micro_step(opt))) == 1
    kernel = model.layers[0].kernel
    assert compat.tracked_variables(opt)[compat.variable_index(opt, kernel)] \
        is kernel
    other = keras.Variable(np.zeros(3), name="not_tracked")
    with pytest.raises(ValueError, match="not_tracked"):
        compat.variable_index(opt, other)
    assert compat.overwrites_with_gradient(opt, kernel) is False
    assert compat.variable_layout(kernel) is None
    strategy = compat.distribution_strategy(opt)
    if BACKEND == "tensorflow":
        assert strategy.num_replicas_in_sync == 1
        assert compat.maybe_merge_call(lambda s, a: a + 1, strategy, 1) == 2
    else:
        assert strategy is None


def test_jax_step_loop(trained):
    """Keras's JAX step loop calls the step once per batch and threads the
    state through (`steps_per_execution` batches per call)."""
    if BACKEND != "jax":
        pytest.skip("JAXTrainer's step loop: JAX only")
    model, *_ = trained
    seen = []

    def step(state, data):
        seen.append(data)
        return {"n": len(seen)}, state + 1

    loop = compat.jax_step_loop(model, step)
    logs, state = loop(0, iter(["a", "b", "c"]))
    assert model.steps_per_execution == 1
    assert seen == ["a"] and state == 1 and logs == {"n": 1}


def test_missing_internal_names_keras_version():
    with pytest.raises(compat.KerasCompatError,
                       match=f"Keras {keras.__version__}.*keras>=3"):
        compat.loss_tracker(object())


def test_seed_stream_draws_like_a_seed_generator():
    """`SeedStream(base, offset)` gives keras.random the seeds a
    SeedGenerator with state (base, offset) gives, one per draw, and
    changes no state."""
    sg = keras.random.SeedGenerator(0)
    sg.state.assign(ops.convert_to_tensor([12, 32], dtype=sg.state.dtype))
    stream = compat.SeedStream(12, ops.convert_to_tensor(32))
    for draw in (keras.random.uniform, keras.random.normal):
        np.testing.assert_array_equal(
            ops.convert_to_numpy(draw((5,), seed=stream)),
            ops.convert_to_numpy(draw((5,), seed=sg)))
    logits = ops.zeros((4, 6))
    np.testing.assert_array_equal(
        ops.convert_to_numpy(keras.random.categorical(logits, 3, seed=stream)),
        ops.convert_to_numpy(keras.random.categorical(logits, 3, seed=sg)))
    assert compat.random_seed_dtype() == sg.state.dtype
