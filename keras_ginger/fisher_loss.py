"""The Fisher loss: the scalar whose gradient is the Fisher gradient d_t.

Ginger's curvature is an EMA of d_t d_tᵀ. With d_t the gradient of the loss
at the *true* labels one gets the empirical Fisher; with labels sampled from
the model's own predictive distribution (paper, Eq. 6-8),

    d_t = (1/√N) Σᵢ √wᵢ ∇θ ℓ(ŷᵢ, f(xᵢ; θ)),     ŷᵢ ~ p_θ(· | xᵢ),

E[d_t d_tᵀ] is the Fisher = the generalized Gauss-Newton matrix of the loss
(see `keras_ginger.samplers` for the built-in losses and why).

`fisher_loss` builds that scalar from predictions and a loss (or a compiled
model), for custom training loops; `model_fisher_loss` is what the train
step (`keras_ginger.train_step`) calls. Both run the same code. Seeds:
step t of a run with base seed s draws from the stream (s, SEED_STRIDE·t),
(s, SEED_STRIDE·t + 1), ... (one seed per output with a loss), so a custom
loop with ``seed=s, step=t`` samples the labels that `fit` samples at
optimizer step t of ``with_fisher(model, seed=s)``. Data-parallel replicas
that each sample their own rows must not share a stream (their draws would
be correlated, biasing E[ddᵀ]): replica r uses base seed
s + REPLICA_SEED_STRIDE·r (the tf.distribute train step does; a
torch.distributed loop passes ``seed=s + REPLICA_SEED_STRIDE * rank``), so
replica 0 draws what one process draws.
"""

import math

import keras
from keras import ops
from keras import tree

from keras_ginger import _keras_compat
from keras_ginger import samplers

__all__ = ["fisher_loss", "model_fisher_loss", "seed_stream", "SEED_STRIDE",
           "REPLICA_SEED_STRIDE"]

# Seeds one train step may draw (one per output with a loss) before the
# next step's stream starts.
SEED_STRIDE = 16

# Base-seed offset between data-parallel replicas that sample their own rows.
REPLICA_SEED_STRIDE = 1_000_003


def fisher_loss(y_pred, loss, *, seed=None, step=None, y_true=None,
                sample_weight=None, loss_weights=None, sampler=None):
    """The scalar whose gradient is Ginger's Fisher gradient d, for custom
    training loops.

    Differentiate it with respect to the trainable variables (like the loss,
    from the same forward pass) and pass the result as ``fisher_grads`` to
    `Ginger.apply` / `Ginger.stateless_apply`. For output k (with loss
    weight λₖ, per-example loss ℓₖ and sample weights wᵢ):

        √λₖ Σᵢ √wᵢ ℓₖ(ŷᵢ, fᵢ) / √Nₖ,    ŷᵢ ~ p(· | fᵢ) (labels sampled from
                                         the predictions, not the data),

    summed over outputs, Nₖ = #{wᵢ > 0}: the same code as the train step of
    `with_fisher`. No regularization losses (they have no Fisher).

    Args:
        y_pred: the model's predictions (a tensor or a structure of them),
            from the forward pass you also take the loss gradient from.
        loss: what ``compile(loss=...)`` takes: a Keras loss (name, object
            or function) applied to every output, or a structure of them
            matching ``y_pred``; or a compiled `keras.Model`, whose compiled
            loss, loss weights and `with_fisher` sampler are used.
        seed: an int (or a scalar int tensor): the draws of optimizer step
            ``step`` are then a function of (seed, step) alone, as in the
            train step of ``with_fisher(model, seed=seed)``; works under
            ``jit`` and ``tf.function``. Or a `keras.random.SeedGenerator`
            (its stream advances, as stateful Keras code expects), or None
            (Keras's global stream; not under JAX ``jit``).
        step: with an int ``seed``, the optimizer step (e.g.
            ``optimizer.iterations``; a tensor is fine); pass a new one on
            every step, or every step samples the same labels. Default 0.
            (`fit` counts the optimizer's applies, which is `iterations`
            unless ``gradient_accumulation_steps`` is set.)
        y_true: the true targets; needed only for a loss with
            ``ignore_class`` (its tokens are left out).
        sample_weight: sample weights (a structure for several outputs), as
            in `fit`.
        loss_weights: as ``compile(loss_weights=...)`` (not with a model).
        sampler: a sampler for every output, or a list / dict of them (see
            `with_fisher`); by default picked from each loss.

    Returns:
        A float32 scalar tensor.
    """
    seed = seed_stream(seed, step)
    if isinstance(loss, keras.Model):
        if loss_weights is not None:
            raise ValueError(
                "keras_ginger.fisher_loss: `loss_weights` cannot be combined "
                "with a compiled model as `loss` (its compiled loss weights "
                f"are used). Received: loss_weights={loss_weights!r}")
        return model_fisher_loss(loss, y_true, y_pred, sample_weight, seed,
                                 sampler=sampler)
    flat = _flat_user_losses(loss, loss_weights, y_pred)
    chosen = _samplers_from_spec(flat, sampler)
    return _sum_over_outputs(flat, chosen, y_true, y_pred, sample_weight,
                             seed)


def seed_stream(seed, step):
    """What `keras.random` takes as the seed of step ``step``: the stream
    (seed, SEED_STRIDE·step + j) for an int seed (the train step's too), or
    a `SeedGenerator` / None as given."""
    if isinstance(seed, keras.random.SeedGenerator) or seed is None:
        if step is not None:
            raise ValueError(
                "keras_ginger.fisher_loss: `step` goes with an integer `seed` "
                f"(the draws are a function of both). Received: seed={seed!r},"
                f" step={step!r}")
        return seed
    if isinstance(seed, (bool, float)) or (
        not isinstance(seed, int)
        and "int" not in str(getattr(seed, "dtype", ""))
    ):
        raise ValueError(
            "keras_ginger.fisher_loss: `seed` must be an int, an integer "
            f"tensor, a keras.random.SeedGenerator or None. Received: "
            f"seed={seed!r}")
    step = 0 if step is None else step
    offset = ops.cast(step, _keras_compat.random_seed_dtype()) * SEED_STRIDE
    return _keras_compat.SeedStream(seed, offset)


def _flat_user_losses(loss, loss_weights, y_pred):
    """[(path, loss object, weight, name)] like `CompileLoss`'s, from a loss
    (every output) or a structure of losses matching y_pred."""
    if loss is None:
        raise ValueError("keras_ginger.fisher_loss: `loss` is required: a "
                         "Keras loss or a compiled keras.Model.")
    if tree.is_nested(loss):
        entries = tree.flatten_with_path(loss)
    else:
        entries = [(path, loss) for path, _ in tree.flatten_with_path(y_pred)]
    entries = [(path, obj) for path, obj in entries if obj is not None]
    if loss_weights is None:
        weights = [None] * len(entries)
    elif not tree.is_nested(loss_weights):
        weights = [float(loss_weights)] * len(entries)
    else:
        weights = [w for _, w in tree.flatten_with_path(loss_weights)]
        if len(weights) != len(entries):
            raise ValueError(
                f"keras_ginger.fisher_loss: got {len(weights)} loss weights "
                f"for {len(entries)} losses. Received: "
                f"loss_weights={loss_weights!r}")
    flat = []
    for (path, obj), weight in zip(entries, weights):
        name = "/".join(str(p) for p in path) or None
        flat.append((tuple(path), _loss_object(obj), weight, name))
    return flat


def _loss_object(obj):
    if isinstance(obj, (str, dict)):
        obj = keras.losses.get(obj)
    if callable(obj):  # a keras.losses.Loss or a loss function
        return obj
    raise ValueError(
        "keras_ginger.fisher_loss: `loss` must be a Keras loss (a name, a "
        f"keras.losses.Loss or a function). Received: loss={obj!r}")


def _resolve_path(path, obj):
    for p in path:
        obj = obj[p]
    return obj


def _align_like_compile_loss(compile_loss, y_true, y_pred):
    """y_true, y_pred restructured as `CompileLoss.call` does (Keras 3)."""
    if not tree.is_nested(y_true) and not tree.is_nested(y_pred):
        return y_true, y_pred
    build_true, build_pred = _keras_compat.build_structures(compile_loss)
    if build_pred is not None:
        try:
            tree.assert_same_structure(build_pred, y_pred)
        except ValueError:
            y_pred = tree.pack_sequence_as(build_pred, tree.flatten(y_pred))
    if y_true is None:
        return None, y_pred
    try:
        if build_true is not None:
            try:
                tree.assert_same_structure(build_true, y_true)
            except ValueError:
                y_true = tree.pack_sequence_as(build_true, tree.flatten(y_true))
    except Exception:  # only needed for `ignore_class`; degrade gracefully
        y_true = None
    return y_true, y_pred


def _align_weight(weight, values):
    """Sample weight / mask shaped to broadcast against per-example values."""
    weight = ops.convert_to_tensor(weight)
    weight = ops.cast(weight, "float32")
    rank = len(values.shape)
    if len(weight.shape) == rank + 1 and weight.shape[-1] == 1:
        weight = ops.squeeze(weight, -1)
    while len(weight.shape) < rank:
        weight = ops.expand_dims(weight, -1)
    return weight


def _output_fisher_loss(sampler, loss_obj, y_pred, y_true, sample_weight, seed):
    """Σᵢ √wᵢ ℓ(ŷᵢ, fᵢ) / √N for one output; N = #{wᵢ > 0}."""
    in_mask = _keras_compat.get_keras_mask(y_pred)
    dtype = getattr(loss_obj, "dtype", None) or "float32"
    if dtype not in ("float32", "float64"):
        dtype = "float32"
    y_pred = ops.cast(ops.convert_to_tensor(y_pred), dtype)

    y_sampled = ops.stop_gradient(sampler.sample(y_pred, seed))
    values = sampler.loss(y_sampled, y_pred)
    if values is None:  # a custom sampler: the compiled loss, unreduced
        unreduced = getattr(loss_obj, "call", loss_obj)  # Loss or function
        values = unreduced(ops.convert_to_tensor(y_sampled, dtype=dtype),
                           y_pred)
    out_mask = _keras_compat.get_keras_mask(values)
    values = ops.cast(values, "float32")

    weight = ops.ones_like(values)
    for w in (in_mask, out_mask, sampler.valid_mask(y_true), sample_weight):
        if w is not None:
            weight = weight * _align_weight(w, values)
    weight = ops.maximum(weight, 0.0)
    included = ops.greater(weight, 0.0)
    n = ops.sum(ops.cast(included, "float32"))
    total = ops.sum(ops.where(included, ops.sqrt(weight) * values, 0.0))
    return total / ops.sqrt(ops.maximum(n, 1.0))


def model_fisher_loss(model, y, y_pred, sample_weight, seed, sampler=None):
    """`fisher_loss` from a compiled model's loss (what the train step
    calls): for every output k with compiled loss weight λₖ,
    √λₖ Σᵢ √wᵢ ℓₖ(ŷᵢ, fᵢ) / √Nₖ (independent samples per output, so
    E[d dᵀ] = Σₖ λₖ Fₖ). No regularization losses. ``seed`` as
    `keras.random` takes it."""
    compile_loss = _keras_compat.compile_loss(model)
    if compile_loss is None:
        raise ValueError(
            "keras_ginger: the Fisher loss needs a compiled loss to sample "
            "the Fisher gradient from. Compile with `loss=...`."
        )
    if not compile_loss.built:
        compile_loss.build(y, y_pred)
    flat = _keras_compat.flat_losses(compile_loss)
    if sampler is None:
        chosen = _resolved_samplers(model, compile_loss)
    else:
        chosen = _samplers_from_spec(flat, sampler)
    y, y_pred = _align_like_compile_loss(compile_loss, y, y_pred)
    return _sum_over_outputs(flat, chosen, y, y_pred, sample_weight, seed)


def _sum_over_outputs(flat, chosen, y, y_pred, sample_weight, seed):
    total = None
    for (path, loss_obj, loss_weight, _), sampler in zip(flat, chosen):
        y_p = _resolve_path(path, y_pred)
        try:
            y_t = None if y is None else _resolve_path(path, y)
        except Exception:
            y_t = None
        if sample_weight is not None and tree.is_nested(sample_weight):
            sw = _resolve_path(path, sample_weight)
        else:
            sw = sample_weight
        value = _output_fisher_loss(sampler, loss_obj, y_p, y_t, sw, seed)
        if loss_weight is not None:
            value = value * math.sqrt(float(loss_weight))
        total = value if total is None else total + value
    if total is None:
        raise ValueError("keras_ginger: the loss has no outputs.")
    return total


def _resolved_samplers(model, compile_loss):
    cache = getattr(model, "_fisher_cache", None)
    if cache is not None and cache[0] is compile_loss:
        return cache[1]
    spec = getattr(model, "_fisher_sampler_spec", None)
    if spec is None:
        spec = getattr(model, "fisher_sampler", None)
    resolved = _samplers_from_spec(_keras_compat.flat_losses(compile_loss),
                                   spec)
    object.__setattr__(model, "_fisher_cache", (compile_loss, resolved))
    return resolved


def _samplers_from_spec(flat, spec):
    """One `Sampler` per entry of ``flat``: from ``spec`` (None, one sampler,
    a list in output order or a dict by output name), else from the loss."""
    names = [entry[3] for entry in flat]
    if spec is None:
        chosen = [None] * len(flat)
    elif isinstance(spec, dict):
        chosen = []
        used = set()
        for entry in flat:
            keys = [entry[3]] + [p for p in entry[0] if isinstance(p, str)]
            key = next((k for k in keys if k in spec), None)
            chosen.append(None if key is None else spec[key])
            used.add(key)
        unknown = set(spec) - used
        if unknown:
            raise ValueError(
                f"keras_ginger: `sampler` has keys {sorted(unknown)} that name "
                f"no output with a loss. Outputs with a loss: {names}."
            )
    elif isinstance(spec, (list, tuple)):
        if len(spec) != len(flat):
            raise ValueError(
                f"keras_ginger: got {len(spec)} samplers for {len(flat)} "
                f"outputs with a loss ({names}); pass one per output, in "
                "order, or a dict keyed by output name."
            )
        chosen = list(spec)
    else:  # one sampler for every output
        chosen = [spec] * len(flat)
    return [
        samplers.get(s)
        if s is not None
        else samplers.sampler_for_loss(entry[1], entry[3])
        for s, entry in zip(chosen, flat)
    ]
