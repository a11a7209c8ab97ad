"""The blocked, in-place walk over U (`block_rows`) against whole arrays.

The optimizer walks U in blocks of rows only on JAX/CPU (see
`blocks.VectorBlock.block_rows`); these tests force small blocks, with a tail, on every
backend and hold the walk to the same references as the whole-array form.
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_ginger
from keras_ginger import curvature
from keras_ginger.blocks import VectorBlock
from keras_ginger.optimizer import Ginger
from tests import test_optimizer as whole
from tests.reference import PAPER, DenseGinger, rel_err, separated_stream

BLOCK = 16  # n = 120 -> 7 full blocks and a tail of 8 rows; n = 1000 -> 62 + 8


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(VectorBlock, "block_rows",
                        staticmethod(lambda U: BLOCK))
    monkeypatch.setattr(whole, "COMPILE_DRIVE", True)


def _update(U, sigma, d, m, block_rows, valid=None, theta=None, eta=None):
    k = U.shape[1]
    U, sigma, d, m = (ops.convert_to_tensor(x) for x in (U, sigma, d, m))
    if theta is not None:
        theta = ops.convert_to_tensor(theta)
    proj = curvature.project(U, d, m, block_rows=block_rows, valid=valid)
    C, scale = curvature.small_matrix(sigma, proj, 0.99)
    lam, V = curvature.top_eigh(C, k)
    out = curvature.finish(U, proj, lam * scale, V, m, 1e-3,
                           block_rows=block_rows, theta=theta, eta=eta)
    return [np.asarray(ops.convert_to_numpy(x), np.float64) for x in out]


def _state(rng, n, k):
    U = np.linalg.qr(rng.standard_normal((n, k)))[0].astype(np.float32)
    sigma = np.sort(rng.uniform(0.1, 2.0, k))[::-1].astype(np.float32)
    return U, sigma


def _dense_update(U, sigma, d, m, k, beta_2=0.99, damping=1e-3):
    """The same update in float64: top-k of α UΣUᵀ + (1-α) ddᵀ, then solve."""
    U, sigma, d, m = (np.asarray(x, np.float64) for x in (U, sigma, d, m))
    M = beta_2 * (U * sigma) @ U.T + (1 - beta_2) * np.outer(d, d)
    lam, V = np.linalg.eigh(M)
    lam, V = lam[::-1][:k], V[:, ::-1][:, :k]
    Mk = (V * lam) @ V.T
    return Mk, np.linalg.solve(damping * np.eye(len(d)) + Mk, m)


@pytest.mark.parametrize("near", [0.0, 1e-2, 1e-4])
@pytest.mark.parametrize("n", [BLOCK * 7 + 8, BLOCK * 8])
def test_blocked_walk_matches_float64(n, near):
    """d far from span(U) and near it (r/‖d‖ ~ 1e-2, 1e-4), where the second
    Gram–Schmidt pass matters: as accurate as whole arrays."""
    rng = np.random.default_rng(0)
    k = 6
    U, sigma = _state(rng, n, k)
    d, m, theta = (rng.standard_normal(n).astype(np.float32) for _ in "dmt")
    if near:
        d = (U @ rng.standard_normal(k) + near * d / np.linalg.norm(d)
             ).astype(np.float32)
    M_want, step_want = _dense_update(U, sigma, d, m, k)
    for block_rows in (None, BLOCK):
        U1, s1, step1 = _update(U, sigma, d, m, block_rows)
        assert rel_err((U1 * s1) @ U1.T, M_want) <= 1e-5
        assert rel_err(step1, step_want) <= 1e-5
        assert np.linalg.norm(U1.T @ U1 - np.eye(k)) <= 1e-5
        # θ - η·step, fused into the same pass, is the same update.
        *_, theta1 = _update(U, sigma, d, m, block_rows, theta=theta,
                             eta=np.float32(0.5))
        assert rel_err(theta1, theta - 0.5 * step_want) <= 1e-5


@pytest.mark.parametrize("block_rows", [None, BLOCK])
def test_invalid_d_is_taken_as_zero(block_rows):
    rng = np.random.default_rng(1)
    n = 120
    U, sigma = _state(rng, n, 6)
    m = rng.standard_normal(n).astype(np.float32)
    bad = rng.standard_normal(n).astype(np.float32)
    bad[[3, 50, 119]] = [np.nan, np.inf, -np.inf]
    got = _update(U, sigma, bad, m, block_rows, valid=False)
    want = _update(U, sigma, np.zeros(n, np.float32), m, block_rows)
    for x, y in zip(got, want):
        assert np.all(np.isfinite(x))
        assert rel_err(x, y) <= 1e-6


def test_orthonormality_blocked_2000_steps():
    """As the whole-array test, with the walk (both residual paths; blocks
    of 192 rows: two full blocks and a tail of 116)."""
    rng = np.random.default_rng(7)
    n, k = 500, 8
    mix = rng.standard_normal((n, n)) / np.sqrt(n)
    update = whole.compiled(lambda U, s, d: curvature.ginger_update(
        U, s, d, d, 0.99, 1e-3, block_rows=192), xla=True)
    U = ops.convert_to_tensor(curvature.initial_basis(n, k))
    s = ops.zeros((k,))
    for t in range(2000):
        x = rng.standard_normal(n)
        d = ops.convert_to_tensor(whole.f32(mix @ x if t % 3 else x))
        U, s, _ = update(U, s, d)
    U = np.asarray(ops.convert_to_numpy(U), np.float64)
    assert np.linalg.norm(U.T @ U - np.eye(k)) <= 1e-4


# The optimizer with the walk forced on: the core accuracy tests again.
@pytest.mark.parametrize("damping", [1e-1, 1e-8])
def test_exact_state_blocked(small_blocks, damping):
    whole.test_exact_state_matches_dense_solve(damping)


@pytest.mark.parametrize("setting", ["paper", "default"])
@pytest.mark.parametrize("damping", [1e-1, 1e-4, 1e-8])
def test_truncated_blocked(small_blocks, damping, setting):
    """As the whole-array test: 200 truncated steps against float64, for
    the paper's step and for the default (Adam's metric, grafted, relative
    damping)."""
    kwargs = PAPER if setting == "paper" else dict(graft="adam",
                                                    relative_damping=True,
                                                    metric="adam")
    rng = np.random.default_rng(1)
    n, tau, steps = 120, 6, 200
    ds = [whole.f32(d) for d in separated_stream(rng, n, tau, steps)]
    gs = [whole.f32(rng.standard_normal(n)) for _ in range(steps)]
    ref = DenseGinger(n, tau, 0.9, 0.99, damping, **kwargs)
    var = keras.Variable(np.zeros((12, 10), np.float32))
    opt = Ginger(learning_rate=1.0, tau=tau, damping=damping, **kwargs)
    got_steps = whole.drive(opt, var, gs, ds, compile=True)
    worst = 0.0
    for got, g, d in zip(got_steps, gs, ds):
        worst = max(worst, rel_err(got, ref.step(g, d)))
    assert worst <= 1e-4
    M, U, s = whole.dense_curvature(opt, var)
    assert rel_err(M, ref.M) <= 1e-4
    assert np.linalg.norm(U.T @ U - np.eye(tau)) <= 1e-4


def test_in_span_blocked(small_blocks):
    whole.test_fisher_gradient_in_span_adds_no_column()


def test_non_finite_blocked(small_blocks):
    whole.test_non_finite_fisher_gradient_leaves_curvature_unchanged()
    whole.test_non_finite_gradient_skips_that_variable()


def test_low_precision_blocked(small_blocks):
    whole.test_low_precision_variables_keep_float32_state("bfloat16")


def test_optimizer_walks_only_large_traced_jax():
    """The optimizer's own choice: blocks for a U of ≥ 24 MiB under jit on
    JAX/CPU; whole arrays otherwise (eager, small U, other backends)."""
    big = (keras_ginger.blocks.BLOCK_MIN_BYTES // 32, 8)
    assert VectorBlock.block_rows(ops.zeros((100, 8))) is None
    if keras.backend.backend() == "jax":
        import jax

        seen = []
        probe = lambda U: seen.append(VectorBlock.block_rows(U)) or U  # noqa
        for shape in (big, (big[0] - 1, 8)):
            jax.eval_shape(probe, jax.ShapeDtypeStruct(shape, "float32"))
        assert seen == [keras_ginger.blocks.BLOCK_ROWS, None]


def test_walk_is_used(small_blocks, monkeypatch):
    """The fixture really routes the optimizer through the blocked walk."""
    calls = []
    real = curvature._rotate_blocked

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(curvature, "_rotate_blocked", spy)
    var = keras.Variable(np.zeros(100, np.float32))
    opt = Ginger(tau=4)
    opt.apply([np.ones(100, np.float32)], [var])
    assert calls
