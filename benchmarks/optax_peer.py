"""An optax GradientTransformation as a Keras 3 optimizer (JAX backend only).

Benchmark-only: lets a maintained optax optimizer run as a peer in the
convergence suite (`convergence_harness.OPTIMIZERS["psgd_kron"]`) through
`model.fit`, with the suite's resets (optimizer variables assigned back to
their initial values, `optimizer.learning_rate = lr`) working as for any
Keras optimizer.

`psgd_kron()` wraps PSGD Kron from the `distributed-kron` package
(`distributed_kron.kron`, Evan Walters et al.; JAX/optax). It is not a
dependency of keras-ginger: `pip install distributed-kron optax chex`, plus
`flax` (imported by `distributed_kron` although not declared; `flax
--no-deps` with `msgpack` and `treescope` is enough for that import).

Learning rate: the optax transform is built with a learning rate of 1.0
(`distributed_kron.kron(learning_rate=1.0, ...)`, whose last link is
`scale_by_learning_rate(1.0)`, i.e. -1 x the step), and every update is
multiplied by Keras's current `self.learning_rate` before being added to the
variables. So the learning rate is Keras's (settable, resettable, schedules
work) and the package's decoupled weight decay, when enabled, is scaled by
it exactly as optax would do.
"""

import contextlib
import importlib

import keras

_FLOAT_KINDS = "fc"


def _require_jax():
    if keras.backend.backend() != "jax":
        raise RuntimeError(
            "OptaxOptimizer (optax peers such as psgd_kron) runs on the JAX "
            f"backend only; KERAS_BACKEND is {keras.backend.backend()!r}.")


@contextlib.contextmanager
def _subscriptable_partition_spec():
    """distributed-kron 2.0.0 annotates `PartitionSpec[str, str]`, evaluated
    at import; JAX >= 0.8's `PartitionSpec` is not subscriptable. Make it so
    for the import only (annotations are not read again afterwards)."""
    from jax.sharding import PartitionSpec

    try:
        PartitionSpec[str, str]
        subscriptable = True
    except TypeError:
        subscriptable = False
    if subscriptable:
        yield
        return
    PartitionSpec.__class_getitem__ = classmethod(lambda cls, item: cls)
    try:
        yield
    finally:
        del PartitionSpec.__class_getitem__


def import_distributed_kron():
    with _subscriptable_partition_spec():
        return importlib.import_module("distributed_kron")


def kron_transform(**kwargs):
    """`distributed_kron.kron` at the package's defaults (or `kwargs`), with
    learning rate 1.0 (the Keras optimizer scales the step)."""
    dk = import_distributed_kron()
    kwargs["learning_rate"] = 1.0
    return dk.kron(**kwargs)


def _resolve(factory):
    if callable(factory):
        return factory
    module, _, qualname = str(factory).partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _factory_name(factory):
    if isinstance(factory, str):
        return factory
    return f"{factory.__module__}:{factory.__qualname__}"


class OptaxOptimizer(keras.optimizers.Optimizer):
    """Runs `transform_factory(**transform_kwargs)` (an optax
    GradientTransformation whose own learning rate is 1.0) on the Keras
    trainable variables; the update is scaled by `self.learning_rate`.

    The optax state is held as Keras optimizer variables, one per leaf of
    its pytree (integer leaves as int32, float leaves in their dtype, PRNG
    keys as their key data), so `optimizer.variables` is the whole state and
    the JAX trainer's stateless, jitted `apply` works.

    `transform_factory`: a callable, or "module:qualname" (what
    `get_config` stores).
    """

    def __init__(self, transform_factory, learning_rate=1e-3,
                 transform_kwargs=None, name=None, **kwargs):
        _require_jax()
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self._factory = transform_factory
        self._transform_kwargs = dict(transform_kwargs or {})
        self._tx = _resolve(transform_factory)(**self._transform_kwargs)

    def build(self, var_list):
        if self.built:
            return
        import jax
        import jax.numpy as jnp

        super().build(var_list)
        state = self._tx.init([v.value for v in var_list])
        leaves, self._treedef = jax.tree_util.tree_flatten(state)
        self._leaf_info = []  # (original dtype, PRNG key impl or None)
        state_vars = []
        for i, leaf in enumerate(leaves):
            leaf = jnp.asarray(leaf)
            impl = None
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                impl = jax.random.key_impl(leaf)
                leaf = jax.random.key_data(leaf)
            if leaf.dtype.kind in "iu" and leaf.dtype.itemsize > 4:
                dtype = "int32" if leaf.dtype.kind == "i" else "uint32"
            else:
                dtype = str(leaf.dtype)
            var = self.add_variable(shape=tuple(leaf.shape), dtype=dtype,
                                    name=f"optax_state_{i}")
            var.assign(leaf.astype(dtype))
            state_vars.append(var)
            self._leaf_info.append((leaf.dtype, impl))
        self._state_vars = state_vars

    def _state(self):
        import jax

        leaves = []
        for var, (dtype, impl) in zip(self._state_vars, self._leaf_info):
            x = var.value.astype(dtype)
            if impl is not None:
                x = jax.random.wrap_key_data(x, impl=impl)
            leaves.append(x)
        return jax.tree_util.tree_unflatten(self._treedef, leaves)

    def _backend_update_step(self, grads, trainable_variables,
                             learning_rate):
        import jax
        import jax.numpy as jnp

        # Inside the JAX trainer's StatelessScope `.value` reads the values
        # being traced and `.assign` records the new ones.
        params = [v.value for v in self._trainable_variables]
        full_grads = [jnp.zeros_like(p) for p in params]
        idx = [self._get_variable_index(v) for v in trainable_variables]
        for i, g in zip(idx, grads):
            full_grads[i] = jnp.asarray(g, dtype=params[i].dtype)
        updates, new_state = self._tx.update(full_grads, self._state(),
                                             params)
        for i, var in zip(idx, trainable_variables):
            lr = jnp.asarray(learning_rate, dtype=params[i].dtype)
            var.assign(params[i] + lr * updates[i].astype(params[i].dtype))
        for var, leaf in zip(self._state_vars,
                             jax.tree_util.tree_leaves(new_state)):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                leaf = jax.random.key_data(leaf)
            var.assign(leaf.astype(var.dtype))

    def get_config(self):
        config = super().get_config()
        config.update({
            "transform_factory": _factory_name(self._factory),
            "transform_kwargs": dict(self._transform_kwargs),
        })
        return config


def psgd_kron(learning_rate=1e-3, **kwargs):
    """PSGD Kron (`distributed_kron.kron`, the package's defaults: b1=0.9,
    weight_decay=0, preconditioner update probability annealed 1 -> 0.03
    after 500 steps, ...) as a Keras optimizer; `kwargs` go to the Keras
    base optimizer (clipnorm, name, ...)."""
    return OptaxOptimizer(kron_transform, learning_rate=learning_rate,
                          **kwargs)


if __name__ == "__main__":
    import numpy as np

    _require_jax()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 16)).astype("float32")
    y = (x @ rng.normal(size=(16, 1)) + 0.1).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,)),
                              keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(1)])
    opt = psgd_kron(learning_rate=1e-2)
    model.compile(optimizer=opt, loss="mse", jit_compile=True)
    opt.build(model.trainable_variables)
    init = [keras.ops.convert_to_numpy(v) for v in opt.variables]
    w0 = model.get_weights()
    print("optimizer variables:",
          [(v.name, tuple(v.shape), v.dtype) for v in opt.variables])
    h = model.fit(x, y, batch_size=256, epochs=5, verbose=0)
    print("loss:", [round(v, 4) for v in h.history["loss"]])
    assert h.history["loss"][-1] < h.history["loss"][0]

    def reset_and_fit(lr):
        """The suite's reset between runs, then 5 steps at ``lr``."""
        model.set_weights(w0)
        for v, value in zip(opt.variables, init):
            v.assign(value)
        opt.learning_rate = lr
        h = model.fit(x, y, batch_size=256, epochs=5, verbose=0)
        print(f"after reset, lr={lr:g}, loss:",
              [round(v, 4) for v in h.history["loss"]])
        return h

    h2 = reset_and_fit(3e-3)
    assert abs(h2.history["loss"][0] - h.history["loss"][0]) < 1e-4
    assert abs(float(opt.learning_rate) - 3e-3) < 1e-9
    assert int(opt.iterations) == 5
    # A reset run at the first learning rate reproduces the first run.
    h3 = reset_and_fit(1e-2)
    np.testing.assert_allclose(h3.history["loss"], h.history["loss"],
                               rtol=1e-5)
    print("config:", {k: opt.get_config()[k]
                      for k in ("learning_rate", "transform_factory")})
