"""The scale-free step: grafting to Adam's norm and damping relative to the
curvature, against a dense float64 reference of the same formula; scale
invariance of the default; which settings are not invariant."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_ginger
from tests.reference import PAPER, DenseGinger, rel_err, separated_stream
from tests.test_optimizer import drive, f32



@pytest.mark.parametrize("relative,damping", [(False, 1e-1), (True, 1e-4)])
def test_grafted_step_matches_dense_reference(relative, damping):
    """60 steps, truncated after τ: direction (γI + M)⁻¹m̂ (γ absolute or
    γ·σ₁), norm of Adam's step, against a float64 dense solve."""
    rng = np.random.default_rng(3)
    n, tau, steps = 120, 6, 60
    ds = [f32(d) for d in separated_stream(rng, n, tau, steps)]
    gs = [f32(rng.standard_normal(n) * rng.uniform(0.1, 3.0, n))
          for _ in range(steps)]
    ref = DenseGinger(n, tau, 0.9, 0.99, damping, graft="adam",
                      relative_damping=relative)
    var = keras.Variable(np.zeros((12, 10), np.float32))
    opt = keras_ginger.Ginger(learning_rate=1.0, tau=tau, damping=damping,
                              graft="adam", relative_damping=relative,
                              metric=None)
    worst = 0.0
    for got, g, d in zip(drive(opt, var, gs, ds), gs, ds):
        worst = max(worst, rel_err(got, ref.step(g, d)))
    assert worst <= 1e-4


@pytest.mark.parametrize("relative,graft", [(False, None), (True, None),
                                            (True, "adam")])
def test_adam_metric_step_matches_dense_reference(relative, graft):
    """metric='adam': curvature of D^{-1/2}d, step γ·D^{-1/2}(γI + M̃)⁻¹
    D^{-1/2}m̂ (grafted: that direction with Adam's norm), against a
    float64 dense solve over 60 steps."""
    rng = np.random.default_rng(8)
    n, tau, steps = 120, 6, 60
    ds = [f32(d) for d in separated_stream(rng, n, tau, steps)]
    gs = [f32(rng.standard_normal(n) * rng.uniform(0.1, 3.0, n))
          for _ in range(steps)]
    kwargs = dict(graft=graft, relative_damping=relative, metric="adam")
    ref = DenseGinger(n, tau, 0.9, 0.99, 0.1, **kwargs)
    var = keras.Variable(np.zeros((12, 10), np.float32))
    opt = keras_ginger.Ginger(learning_rate=1.0, tau=tau, damping=0.1,
                              **kwargs)
    worst = 0.0
    for got, g, d in zip(drive(opt, var, gs, ds), gs, ds):
        worst = max(worst, rel_err(got, ref.step(g, d)))
    assert worst <= 1e-4


@pytest.mark.parametrize("compile", [True, False])
@pytest.mark.parametrize("metric,relative,damping", [
    (None, True, 1e-4), ("adam", True, 1e-4), ("adam", False, 1e-6)])
def test_grafted_length_when_momentum_lies_in_the_basis(metric, relative,
                                                        damping, compile):
    """g = d in a 3-dimensional subspace (τ = 6): m̂ lies in span(U) and
    σ ≫ γ. The direction's norm from small space would subtract two nearly
    equal numbers and divide by γ² (85 % off in float32 for the Euclidean
    metric here), so the step is formed and its norm taken: the step's
    length, in the metric, is the float64 reference's (Adam's), compiled
    (the branch under `cond`) and eager (a Python branch on JAX). (Its
    direction is as float32 allows: U holds m̂ to ε, and the ε outside
    span(U) is divided by γ = 1e-4·σ₁.)"""
    rng = np.random.default_rng(11)
    n, tau, steps = 40, 6, 40
    basis, _ = np.linalg.qr(rng.standard_normal((n, 3)))
    gs = [f32(basis @ rng.standard_normal(3) * (1.0 + 0.1 * t))
          for t in range(steps)]
    kwargs = dict(graft="adam", relative_damping=relative, metric=metric)
    ref = DenseGinger(n, tau, 0.9, 0.99, damping, **kwargs)
    var = keras.Variable(np.zeros(n, np.float32))
    opt = keras_ginger.Ginger(learning_rate=1.0, tau=tau, damping=damping,
                              **kwargs)
    worst = 0.0
    for got, g in zip(drive(opt, var, gs, gs, compile=compile), gs):
        want = ref.step(g, g)
        w = np.sqrt(ref.D) if metric == "adam" else 1.0
        length = np.linalg.norm(w * np.ravel(got)) / np.linalg.norm(w * want)
        worst = max(worst, abs(length - 1.0))
    assert worst <= 1e-4


@pytest.mark.parametrize("n,interval", [(40, 3), (3, 1), (3, 2)])
def test_default_reuse_path_and_complete_basis_match_reference(n, interval):
    """The default step (Adam's metric, grafted, relative damping) with the
    curvature reused between refreshes (curvature_interval = 3) and with a
    complete basis (n = 3 < τ), against the float64 solve."""
    rng = np.random.default_rng(12)
    tau, steps = 4, 30
    ds = [f32(rng.standard_normal(n) * rng.uniform(0.2, 2.0, n))
          for _ in range(steps)]
    gs = [f32(rng.standard_normal(n) * rng.uniform(0.1, 3.0, n))
          for _ in range(steps)]
    var = keras.Variable(np.zeros(n, np.float32))
    opt = keras_ginger.Ginger(learning_rate=1.0, tau=tau,
                              curvature_interval=interval)
    got = drive(opt, var, gs, ds, compile=True)
    ref = DenseGinger(n, tau, 0.9, 0.99, 0.3, graft="adam",
                      relative_damping=True, metric="adam")
    for t, (step, g, d) in enumerate(zip(got, gs, ds)):
        expect = ref.step(g, d, update_curvature=t % interval == 0)
        assert rel_err(step, expect) <= 1e-4, t


def test_adam_metric_without_curvature_is_keras_adam():
    rng = np.random.default_rng(9)
    init = f32(rng.standard_normal((5, 4)))
    gs = [ops.convert_to_tensor(f32(rng.standard_normal((5, 4))))
          for _ in range(15)]
    finals = []
    for opt in (keras.optimizers.Adam(learning_rate=1e-2),
                keras_ginger.Ginger(learning_rate=1e-2, graft=None,
                                    metric="adam", damping=1e6,
                                    relative_damping=False)):
        var = keras.Variable(init)
        for g in gs:
            kw = ({"fisher_grads": [g]}
                  if isinstance(opt, keras_ginger.Ginger) else {})
            opt.apply([g], [var], **kw)
        finals.append(ops.convert_to_numpy(var))
    # γ = 1e6 ≫ σ: the curvature is negligible and the step is Adam's.
    np.testing.assert_allclose(finals[1], finals[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("interval", [1, 3])
def test_relative_damping_without_graft_matches_reference(interval):
    """Damping γ·σ₁ alone (paper scale); with curvature_interval = 3 the
    reuse path must apply the same rule (reference: curvature every step
    only when interval = 1)."""
    rng = np.random.default_rng(4)
    n, tau, steps = 40, 4, 30
    ds = [f32(d) for d in separated_stream(rng, n, tau, steps)]
    gs = [f32(rng.standard_normal(n)) for _ in range(steps)]
    var = keras.Variable(np.zeros(n, np.float32))
    opt = keras_ginger.Ginger(learning_rate=1.0, tau=tau, damping=1e-2,
                              graft=None, relative_damping=True,
                              metric=None, curvature_interval=interval)
    got = drive(opt, var, gs, ds, compile=True)
    ref = DenseGinger(n, tau, 0.9, 0.99, 1e-2, relative_damping=True)
    for t, (step, g, d) in enumerate(zip(got, gs, ds)):
        if interval == 1:
            assert rel_err(step, ref.step(g, d)) <= 1e-4
        else:  # the reference takes only every third d
            expect = ref.step(g, d, update_curvature=t % interval == 0)
            assert rel_err(step, expect) <= 1e-4, t


def test_curvature_off_is_keras_adam():
    """With the curvature switched off, the grafted Ginger is Adam():
    every variable takes Keras Adam's step (ε on √v, as Keras adds it)."""
    rng = np.random.default_rng(5)
    shapes = [(6, 4), (4,), (3, 2, 2)]
    init = [f32(rng.standard_normal(s)) for s in shapes]
    # Tensors: Keras's torch Adam takes no NumPy gradients.
    gs = [[ops.convert_to_tensor(
        f32(rng.standard_normal(s) * 10.0 ** rng.integers(-3, 2)))
        for s in shapes] for _ in range(25)]
    finals = []
    for opt in (keras.optimizers.Adam(learning_rate=1e-2),
                keras_ginger.Ginger(learning_rate=1e-2, graft="adam",
                                    relative_damping=True,
                                    exclude_from_curvature=[".*"])):
        variables = [keras.Variable(x) for x in init]
        for g in gs:
            if isinstance(opt, keras_ginger.Ginger):
                opt.apply(g, variables, fisher_grads=g)
            else:
                opt.apply(g, variables)
        finals.append([ops.convert_to_numpy(v) for v in variables])
    for adam, ginger in zip(*finals):
        np.testing.assert_allclose(ginger, adam, rtol=2e-6, atol=1e-7)


def _run(scale, steps=100, **kwargs):
    rng = np.random.default_rng(6)
    n, tau = 48, 4
    ds = separated_stream(rng, n, tau, steps)
    gs = [rng.standard_normal(n) for _ in range(steps)]
    var = keras.Variable(np.zeros((8, 6), np.float32))
    opt = keras_ginger.Ginger(tau=tau, **kwargs)
    for g, d in zip(gs, ds):
        opt.apply([f32(scale * g).reshape(8, 6)], [var],
                  fisher_grads=[f32(scale * d).reshape(8, 6)])
    return np.asarray(ops.convert_to_numpy(var), np.float64)


def test_default_is_invariant_to_the_loss_scale():
    """A loss multiplied by c multiplies g and d by c: with the default
    (grafting + relative damping) 100 updates end where the unscaled run
    does, to 1e-3 of how far the weights moved (only Adam's ε breaks it)."""
    defaults = keras_ginger.Ginger()
    assert defaults.graft == "adam" and defaults.relative_damping
    assert defaults.metric == "adam"
    base = _run(1.0)
    moved = np.linalg.norm(base)
    assert moved > 0
    for c in (1e-2, 1e2):
        assert np.linalg.norm(_run(c) - base) <= 1e-3 * moved, c


def test_grafted_adam_metric_is_invariant_to_the_loss_scale():
    """metric='adam' with grafting and relative damping: as the default."""
    kwargs = dict(metric="adam", graft="adam", relative_damping=True)
    base = _run(1.0, steps=30, **kwargs)
    moved = np.linalg.norm(base)
    assert moved > 0
    for c in (1e-2, 1e2):
        assert np.linalg.norm(_run(c, steps=30, **kwargs) - base) \
            <= 1e-3 * moved, c


@pytest.mark.parametrize("kwargs", [
    dict(PAPER, learning_rate=1e-3, damping=1e-2),          # the paper's
    dict(graft="adam", relative_damping=False, damping=1e-2, metric=None),
    dict(graft=None, relative_damping=True, learning_rate=1e-3,
         metric=None),
], ids=["paper", "graft_only", "relative_only"])
def test_settings_that_are_not_scale_invariant(kwargs):
    """The paper's step (m̂/γ outside span(U)), grafting with an absolute
    damping (the direction depends on σ/γ) and relative damping without
    grafting (the norm scales as 1/c) all move with the loss scale."""
    base = _run(1.0, steps=30, **kwargs)
    moved = np.linalg.norm(base)
    worst = max(np.linalg.norm(_run(c, steps=30, **kwargs) - base)
                for c in (1e-2, 1e2))
    assert worst >= 1e-2 * moved


def test_invalid_scale_arguments():
    for kwargs, needle in [
        (dict(graft="shampoo"), "graft='shampoo'"),
        (dict(relative_damping=1), "relative_damping=1"),
        (dict(graft_beta_2=1.0), "graft_beta_2=1.0"),
        (dict(graft_epsilon=0.0), "graft_epsilon=0.0"),
        (dict(metric="shampoo", graft=None), "metric='shampoo'"),
    ]:
        with pytest.raises(ValueError, match=needle):
            keras_ginger.Ginger(**kwargs)
