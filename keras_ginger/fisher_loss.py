"""The Fisher loss: the scalar whose gradient is the Fisher gradient d_t.

Ginger's curvature is an EMA of d_t d_tᵀ. With d_t the gradient of the loss
at the *true* labels one gets the empirical Fisher; with labels sampled from
the model's own predictive distribution (paper Eq. 6-8),

    d_t = (1/√N) Σᵢ √wᵢ ∇θ ℓ(ŷᵢ, f(xᵢ; θ)),     ŷᵢ ~ p_θ(· | xᵢ),

E[d_t d_tᵀ] is the Fisher = the generalized Gauss-Newton matrix of the loss
(see `keras_ginger.samplers` for the built-in losses and why).

This module builds that scalar from a compiled model's loss (one sampler per
output with a loss, chosen from the loss or given by the user). It holds no
train step: `keras_ginger.train_step` and the per-backend trainers call it,
and so can a custom training loop (`fisher_loss`).
"""

import math

from keras import ops
from keras import tree

from keras_ginger import _keras_compat
from keras_ginger import samplers

__all__ = ["fisher_loss"]


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
        values = loss_obj.call(
            ops.convert_to_tensor(y_sampled, dtype=dtype), y_pred
        )
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


def fisher_loss(model, y, y_pred, sample_weight, seed):
    """The scalar whose gradient is d: for every output k with compiled loss
    weight λₖ, √λₖ Σᵢ √wᵢ ℓₖ(ŷᵢ, fᵢ) / √Nₖ (independent samples per output,
    so E[d dᵀ] = Σₖ λₖ Fₖ). No regularization losses."""
    compile_loss = _keras_compat.compile_loss(model)
    if compile_loss is None:
        raise ValueError(
            "keras_ginger: the Fisher train step needs a compiled loss to "
            "sample the Fisher gradient from. Compile with `loss=...`."
        )
    if not compile_loss.built:
        compile_loss.build(y, y_pred)
    chosen = _resolved_samplers(model, compile_loss)
    y, y_pred = _align_like_compile_loss(compile_loss, y, y_pred)
    total = None
    flat = _keras_compat.flat_losses(compile_loss)
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
        raise ValueError("keras_ginger: the compiled loss has no outputs.")
    return total


def _resolved_samplers(model, compile_loss):
    cache = getattr(model, "_fisher_cache", None)
    if cache is not None and cache[0] is compile_loss:
        return cache[1]
    flat = _keras_compat.flat_losses(compile_loss)
    names = [entry[3] for entry in flat]
    spec = getattr(model, "_fisher_sampler_spec", None)
    if spec is None:
        spec = getattr(model, "fisher_sampler", None)
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
    resolved = [
        samplers.get(s)
        if s is not None
        else samplers.sampler_for_loss(entry[1], entry[3])
        for s, entry in zip(chosen, flat)
    ]
    object.__setattr__(model, "_fisher_cache", (compile_loss, resolved))
    return resolved
