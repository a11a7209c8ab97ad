"""The Kronecker block against float64 NumPy references.

The math (`keras_ginger.kronecker`) against dense eigendecompositions of
its own formulas; the optimizer's Kronecker step against `DenseKronecker`
(dense factors, dense matrix powers), written independently; the low-rank
side's small-space update against the exact top-k of the EMA it tracks.
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_ginger
from keras_ginger import _keras_compat
from keras_ginger import kronecker
from tests.reference import DenseKronecker, rel_err
from tests.test_optimizer import drive, f32


def np64(x):
    return np.asarray(ops.convert_to_numpy(x), np.float64)


def correlated(rng, shape, steps, decay=0.7):
    """Matrix gradients with a Kronecker-like structure: A ξ B, A and B
    with geometrically decaying spectra, so that each factor's top
    eigenvalues are separated."""
    m, n = shape
    A = np.linalg.qr(rng.standard_normal((m, m)))[0] * decay ** np.arange(m)
    B = np.linalg.qr(rng.standard_normal((n, n)))[0] * decay ** np.arange(n)
    return [A @ rng.standard_normal((m, n)) @ B.T for _ in range(steps)]


def test_lowrank_update_is_the_truncated_recurrence():
    """`lowrank_small` + `lowrank_finish`: the top-k of α UΣUᵀ + (1-α)YYᵀ
    without any s×s matrix, equal to the dense recurrence (eigh of the
    s×s matrix, truncated) for every tail rule, over 30 updates."""
    rng = np.random.default_rng(0)
    s, k, w, alpha = 40, 5, 3, 0.9
    for tail in kronecker.TAILS:
        U = ops.convert_to_tensor(np.eye(s, k, dtype=np.float32))
        sigma = ops.zeros((k,))
        rho = ops.zeros(())
        B, ref_rho = np.zeros((s, s)), 0.0
        for Y in correlated(rng, (s, w), 30):
            Q, C = kronecker.lowrank_small(U, sigma, f32(Y), alpha)
            lam, V = kronecker.eigh_desc(C)
            U, sigma, rho = kronecker.lowrank_finish(Q, lam, V, rho, k,
                                                     alpha, tail)
            F = alpha * B + (1 - alpha) * Y @ Y.T
            e, E = np.linalg.eigh(F)
            e, E = e[::-1], E[:, ::-1]
            shrink = e[k] if tail == "fd" else 0.0
            B = (E[:, :k] * (e[:k] - shrink)) @ E[:, :k].T
            ref_rho = e[k] if tail == "next" else alpha * ref_rho + e[k]
            Un, sn = np64(U), np64(sigma)
            assert rel_err((Un * sn) @ Un.T, B) <= 2e-5, tail
            assert abs(float(np64(rho)) - ref_rho) <= 2e-5 * e[0], tail
            assert np.abs(Un.T @ Un - np.eye(k)).max() <= 2e-6, tail


@pytest.mark.parametrize("tail", kronecker.TAILS)
def test_lowrank_side_tracks_the_exact_ema(tail):
    """Against the EMA A itself (never truncated), over 200 updates of a
    Kronecker-like stream whose top-k eigenvalues stand apart.

    Bounds that hold by construction (truncation only removes PSD mass,
    at most δ = λ_{k+1} per update): T ≼ A for the kept part T = UΣUᵀ,
    and A ≼ T + ρI for "fd" and "accumulate" (ρ = Σ α^{t-s}δ_s); for
    "next", ρ = λ_{k+1}(αT + (1-α)YYᵀ) ≤ λ_{k+1}(A). And how close it
    stays (measured: largest principal angle to A's top-k subspace 0.14
    at worst, 0.03 median; 0.30 and 0.02 for "fd", which shrinks σ, so only the unshrunk rules
    keep the eigenvalues within 1 %; benchmarks/kronecker_tracking.py)."""
    rng = np.random.default_rng(1)
    s, k, w, alpha = 48, 6, 4, 0.95
    U = ops.convert_to_tensor(np.eye(s, k, dtype=np.float32))
    sigma, rho = ops.zeros((k,)), ops.zeros(())
    A = np.zeros((s, s))
    angles, sigma_err = [], []
    for t, Y in enumerate(correlated(rng, (s, w), 200, decay=0.6)):
        Q, C = kronecker.lowrank_small(U, sigma, f32(Y), alpha)
        lam, V = kronecker.eigh_desc(C)
        U, sigma, rho = kronecker.lowrank_finish(Q, lam, V, rho, k, alpha,
                                                 tail)
        A = alpha * A + (1 - alpha) * Y @ Y.T
        e, E = np.linalg.eigh(A)
        e, E = e[::-1], E[:, ::-1]
        Un, sn, r = np64(U), np64(sigma), float(np64(rho))
        T = (Un * sn) @ Un.T
        # The bounds are exact in exact arithmetic; the state is float32,
        # decomposed anew at each update (QR, eigh: a few ε·σ₁ each,
        # decaying with α): -9.9e-6·σ₁ measured on TensorFlow.
        tol = 1e-4 * e[0]
        assert np.linalg.eigvalsh(A - T).min() >= -tol, t
        if tail == "next":
            assert r <= e[k] + tol, t
        else:
            assert np.linalg.eigvalsh(T + r * np.eye(s) - A).min() >= -tol
        if t >= 50:
            cos = np.linalg.svd(Un.T @ E[:, :k], compute_uv=False)
            angles.append(np.sqrt(max(1 - cos.min() ** 2, 0.0)))
            sigma_err.append(np.abs(sn - e[:k]).max() / e[k - 1])
    # Measured worst angles: 0.14 (unshrunk rules), 0.30 ("fd").
    assert max(angles) <= (0.35 if tail == "fd" else 0.2)
    assert np.median(angles) <= 0.05
    if tail != "fd":
        assert np.median(sigma_err) <= 0.01


def test_direction_matches_dense_matrix_powers():
    """`kronecker_direction` (one low-rank side, one full) against the dense
    L̃^{-p} M R̃^{-p} of its formula."""
    rng = np.random.default_rng(2)
    m, n, k, p, gamma = 30, 7, 4, 0.25, 1e-2
    UL = np.linalg.qr(rng.standard_normal((m, k)))[0]
    sL = np.sort(rng.uniform(0.1, 3.0, k))[::-1]
    rhoL = 0.05
    UR = np.linalg.qr(rng.standard_normal((n, n)))[0]
    sR = np.sort(rng.uniform(0.0, 2.0, n))[::-1]
    sR[-1] = 0.0  # an eigenvalue below the floor
    M = rng.standard_normal((m, n))
    t = lambda x: ops.convert_to_tensor(f32(x))  # noqa: E731
    got = kronecker.kronecker_direction(
        t(M), (t(UL), t(sL), t(rhoL), False), (t(UR), t(sR), None, True),
        gamma, p)
    levelL = max(rhoL, gamma * sL[0])
    PL = ((UL * np.maximum(sL, levelL) ** -p) @ UL.T
          + levelL ** -p * (np.eye(m) - UL @ UL.T))
    PR = (UR * np.maximum(sR, gamma * sR[0]) ** -p) @ UR.T
    assert rel_err(np64(got), PL @ M @ PR) <= 2e-6


def _pair(rng, shape, steps):
    ds = correlated(rng, shape, steps)
    gs = [d + 0.3 * rng.standard_normal(shape) for d in ds]
    return [f32(g) for g in gs], [f32(d) for d in ds]


@pytest.mark.parametrize("metric", [None, "adam"])
@pytest.mark.parametrize("graft", ["adam", None])
def test_full_factors_match_dense_reference(metric, graft):
    """Both sides full (the exact factors): Ginger's Kronecker step against
    `DenseKronecker` for 40 steps, grafted or not, in either metric."""
    rng = np.random.default_rng(3)
    shape = (12, 9)
    gs, ds = _pair(rng, shape, 40)
    kw = dict(kronecker_damping=1e-3, kronecker_exponent=0.25)
    ref = DenseKronecker(shape, damping=1e-3, exponent=0.25, graft=graft,
                         metric=metric)
    var = keras.Variable(np.zeros(shape, np.float32))
    opt = keras_ginger.Ginger(curvature="auto", learning_rate=1.0,
                              graft=graft, metric=metric, **kw)
    worst = 0.0
    for got, g, d in zip(drive(opt, var, gs, ds), gs, ds):
        worst = max(worst, rel_err(got, ref.step(g, d)))
    # Each full factor is rebuilt from its float32 eigendecomposition and
    # decomposed again at every step (a few ε·σ₁ per step; eigenvalues
    # floored at γσ₁ = 1e-3σ₁ magnify that by up to 1e3^p): measured
    # ≤ 3.2e-5 for the step, 1.5e-5 for the factors, over three backends.
    assert worst <= 1e-4, worst
    assert opt.block_kind(var) == "kronecker"
    for (label, U, s), side in zip(opt.curvature_factors(var), ref.sides):
        U, s = np64(U), np64(s)
        assert rel_err((U * s) @ U.T, side["F"]) <= 1e-4, label


def test_lowrank_side_matches_dense_reference():
    """A left side longer than `kronecker_full_size` (low rank, tail level
    by frequent directions) and a full right side: against
    `DenseKronecker`'s dense recurrence for 60 steps, exponent 1/2."""
    rng = np.random.default_rng(4)
    shape = (40, 6)
    gs, ds = _pair(rng, shape, 60)
    ref = DenseKronecker(shape, rank=5, full_size=16, damping=1e-4,
                         exponent=0.5, metric="adam")
    var = keras.Variable(np.zeros(shape, np.float32))
    opt = keras_ginger.Ginger(curvature="auto", learning_rate=1.0,
                              kronecker_rank=5,
                              kronecker_full_size=16, kronecker_damping=1e-4,
                              kronecker_exponent=0.5)
    worst = 0.0
    for got, g, d in zip(drive(opt, var, gs, ds), gs, ds):
        worst = max(worst, rel_err(got, ref.step(g, d)))
    assert worst <= 1e-4, worst
    (U, s) = (np64(x) for x in opt.get_curvature(var, side="left"))
    assert U.shape == (40, 5)
    assert rel_err((U * s) @ U.T, ref.sides[0]["F"]) <= 1e-4


@pytest.mark.parametrize("curvature_interval", [1, 2])
def test_kronecker_interval_matches_dense_reference(curvature_interval):
    """`kronecker_interval=3`: a full side's factor takes every refresh's d
    but is decomposed every third refresh (its step uses the last
    eigendecomposition in between); the low-rank side updates at every
    refresh. Against `DenseKronecker(interval=3)` for 41 steps, also with
    refreshes every second step; the kept factor F against the dense EMA."""
    rng = np.random.default_rng(9)
    shape, steps = (40, 6), 41
    gs, ds = _pair(rng, shape, steps)
    ref = DenseKronecker(shape, rank=5, full_size=16, damping=1e-3,
                         exponent=0.5, metric="adam", interval=3)
    var = keras.Variable(np.zeros(shape, np.float32))
    opt = keras_ginger.Ginger(curvature="auto", learning_rate=1.0,
                              kronecker_rank=5, kronecker_full_size=16,
                              curvature_interval=curvature_interval,
                              kronecker_interval=3)
    worst = 0.0
    for t, (got, g, d) in enumerate(zip(drive(opt, var, gs, ds), gs, ds)):
        expect = ref.step(g, d,
                          update_curvature=t % curvature_interval == 0)
        worst = max(worst, rel_err(got, expect))
    assert worst <= 1e-4, worst
    block = opt._blocks[_keras_compat.variable_index(opt, var)]
    factor = next(v for v in block.slots if v.name.endswith("right_factor"))
    assert rel_err(np64(factor), ref.sides[1]["F"]) <= 1e-5
    # The right side's (U, σ) is the eigendecomposition of the factor as it
    # was at the last decomposing refresh, not of F now.
    (U, s) = (np64(x) for x in opt.get_curvature(var, side="right"))
    refreshes = -(-steps // curvature_interval)
    assert (refreshes - 1) % 3 != 0  # the last refresh did not decompose
    assert rel_err((U * s) @ U.T, ref.sides[1]["F"]) > 1e-3
    # Without an interval no factor is kept: the state is as before.
    plain = keras_ginger.Ginger(curvature="auto", kronecker_full_size=16)
    plain.build([keras.Variable(np.zeros(shape, np.float32))])
    assert not any("factor" in v.name for v in plain.variables)


def _assert_steps_as_matrix(shape, matrix, seed):
    """A variable of ``shape`` steps as the dense (m, n) = ``matrix`` step
    on its reshaped values, with factors m×m and n×n (the Kronecker
    defaults: exponent 1/2, damping 1e-3)."""
    rng = np.random.default_rng(seed)
    gs, ds = _pair(rng, matrix, 5)
    ref = DenseKronecker(matrix, metric="adam", exponent=0.5, damping=1e-3)
    var = keras.Variable(np.zeros(shape, np.float32))
    opt = keras_ginger.Ginger(curvature="auto", learning_rate=1.0)
    assert opt.kronecker_exponent == 0.5
    for got, g, d in zip(drive(opt, var, gs, ds), gs, ds):
        assert rel_err(got, ref.step(g, d)) <= 2e-5
    assert ([U.shape[0] for _, U, _ in opt.curvature_factors(var)]
            == list(matrix))


def test_conv_kernel_reads_as_a_matrix():
    """A (kh, kw, c_in, c_out) kernel: factors of (kh·kw·c_in, c_out)."""
    _assert_steps_as_matrix((3, 3, 2, 10), (18, 10), seed=5)


def test_attention_kernel_splits_heads_from_the_model_axis():
    """(d_model, heads, head_dim) reads as (d_model, heads·head_dim), its
    output kernel (heads, head_dim, d_model) as (heads·head_dim, d_model);
    the step is the dense (m, n) step on the reshaped variable."""
    assert kronecker.as_matrix_shape((64, 4, 16)) == (64, 64)
    assert kronecker.as_matrix_shape((4, 16, 64)) == (64, 64)
    assert kronecker.as_matrix_shape((3, 3, 16, 32)) == (144, 32)
    assert kronecker.as_matrix_shape((3, 16, 32)) == (48, 32)
    assert kronecker.as_matrix_shape((7,)) == (1, 7)
    _assert_steps_as_matrix((12, 3, 4), (12, 12), seed=15)


@pytest.mark.parametrize("exponent", [0.5, 0.25])
def test_loss_scale_invariance(exponent):
    """The step (default exponent 1/2, and Shampoo's 1/4): a loss
    multiplied by c (g and d by c) gives the same updates (Adam's ε set
    to 1e-30, below the last bit of every √v here, even at c = 2⁻¹⁰).

    c = 2¹⁰ and 2⁻¹⁰, powers of two, so that scaling the inputs rounds
    nothing and any difference is the algorithm's: measured 0 at p = 1/2
    and ≤ 2e-7 at p = 1/4 (the metric's D^{-1/2} of a scaled v) on three
    backends. With c = 1e3 the scaled inputs themselves round, and the
    eigenvalue floor γσ₁ magnifies that rounding by up to γ^{-p} (32x at
    p = 1/2): measured 3e-6 to 1.2e-5 there, depending on the backend's
    summation order, which is why this test does not use such a c."""
    rng = np.random.default_rng(6)
    gs, ds = _pair(rng, (10, 8), 15)
    steps = []
    for c in (1.0, 2.0 ** 10, 2.0 ** -10):
        var = keras.Variable(np.zeros((10, 8), np.float32))
        opt = keras_ginger.Ginger(curvature="auto", learning_rate=1.0,
                                  graft_epsilon=1e-30,
                                  kronecker_exponent=exponent)
        steps.append(drive(opt, var, [g * c for g in gs],
                           [d * c for d in ds]))
    for plain, *scaled in zip(*steps):
        for other in scaled:
            assert rel_err(other, plain) <= 1e-6


def test_nonfinite_d_leaves_factors_unchanged():
    rng = np.random.default_rng(7)
    gs, ds = _pair(rng, (8, 6), 4)
    ds[2] = ds[2].copy()
    ds[2][0, 0] = np.nan
    var = keras.Variable(np.zeros((8, 6), np.float32))
    opt = keras_ginger.Ginger(curvature="auto", learning_rate=1.0)
    drive(opt, var, gs[:2], ds[:2])
    before = [np64(x) for _, U, s in opt.curvature_factors(var)
              for x in (U, s)]
    steps = drive(opt, var, gs[2:3], ds[2:3])
    after = [np64(x) for _, U, s in opt.curvature_factors(var)
             for x in (U, s)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert np.all(np.isfinite(steps[0]))
    assert "step 3" in opt.nonfinite_report()


def test_block_kinds_and_errors():
    opt = keras_ginger.Ginger(curvature="auto",
                              exclude_from_curvature=["skip"])
    k = keras.Variable(np.zeros((4, 3), np.float32), name="kernel")
    b = keras.Variable(np.zeros((3,), np.float32), name="bias")
    s = keras.Variable(np.zeros((4, 3), np.float32), name="skip")
    opt.build([k, b, s])
    assert [opt.block_kind(v) for v in (k, b, s)] == [
        "kronecker", "vector", "identity"]
    with pytest.raises(ValueError, match="side"):
        opt.get_curvature(k)
    with pytest.raises(ValueError, match="side"):
        opt.get_curvature(b, side="left")
    assert opt.get_curvature(k, side="right")[0].shape == (3, 3)
    vec = keras_ginger.Ginger(curvature="vector")
    assert vec.block_kind(k) == "vector"
    for kwargs, name in ((dict(curvature="kfac"), "curvature"),
                         (dict(kronecker_rank=0), "kronecker_rank"),
                         (dict(kronecker_full_size=1.5),
                          "kronecker_full_size"),
                         (dict(kronecker_exponent=0.0),
                          "kronecker_exponent"),
                         (dict(kronecker_damping=-1.0),
                          "kronecker_damping"),
                         (dict(kronecker_interval=0), "kronecker_interval")):
        with pytest.raises(ValueError, match=f"`{name}`"):
            keras_ginger.Ginger(**kwargs)


def test_config_round_trip_and_old_configs_load_as_vector():
    opt = keras_ginger.Ginger(curvature="auto", kronecker_rank=7,
                              kronecker_exponent=0.5, kronecker_interval=4)
    again = keras_ginger.Ginger.from_config(opt.get_config())
    assert again.kronecker_rank == 7 and again.kronecker_exponent == 0.5
    assert again.kronecker_interval == 4
    assert again.curvature == "auto"
    old = opt.get_config()
    del old["curvature"]
    assert keras_ginger.Ginger.from_config(old).curvature == "vector"
