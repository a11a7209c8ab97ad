"""Pure curvature math for Ginger: no Keras state, only `keras.ops`.

Ginger (Hao, Cao, Mou, arXiv 2402.03295) keeps, per variable flattened to
``n`` entries, an exponential moving average of the Fisher / GGN

    M_t = α M_{t-1} + (1 - α) d_t d_tᵀ,        α = ``beta_2``   (paper Eq. 9)

as its best rank-k approximation ``U diag(σ) Uᵀ`` (k = min(τ, n), ``U`` with
orthonormal columns, σ ≥ 0 descending), and steps with

    (γ I + U diag(σ) Uᵀ)⁻¹ m̂                        γ = ``damping``

through the Woodbury identity (paper Eq. 12-18).

The paper derives the update on the inverse (Sherman–Morrison). In exact
arithmetic that is the same map as a rank-one eigen-update of ``M`` itself
(Brand 2006), which is what this module computes, because it is the form that
stays accurate in float32 at any damping:

    c = Uᵀd,  p = d - Uc (two Gram–Schmidt passes),  r = ‖p‖
    C = diag(α σ, 0) + (1 - α) z zᵀ,  z = (c, r)          ((k+1)×(k+1))
    C = V diag(λ) Vᵀ;  U' = [U, p/r] V[:, :k],  σ' = λ[:k]

The functions are split so that an optimizer can gather the small matrices
of many variables and decompose them in one place (`blocks.eigh_each`:
one unbatched ``eigh`` each; ``top_eigh`` also accepts a stack):

    proj = project(U, d, m)                  # reads U 4 times (2 blocked)
    C, scale = small_matrix(sigma, proj, beta_2)
    lam, V = top_eigh(C, k)                  # or a stack (leading axes)
    U', sigma', step = finish(U, proj, lam * scale, V, m, damping)
                                 # writes U', reads it twice (blocked: once)

`ginger_update` composes them for one variable. All inputs are float32 (the
caller casts); shapes: U (n, k), sigma (k,), d and m (n,).

``block_rows``: `project` and `finish` can walk U in blocks of rows inside
one loop (``ops.fori_loop`` + ``ops.slice_update``) instead of whole-array
products. Same arithmetic, but the loop fuses passes (the residual pass reads
U once for U c and Uᵀp; the rotation pass recomputes p = d - U c₁ from each
block instead of reading a stored p, writes U' and forms the step, or θ', from
each new block while it is in cache) and, under XLA with U and θ donated,
updates both in place: no (n, k) temporary. The whole-array form is best where the
runtime caches large buffers (TensorFlow, torch, GPUs); the optimizer picks.
"""

import collections
import math

import numpy as np
from keras import ops

EPS32 = float(np.finfo(np.float32).eps)

# Eigenvalues below NOISE_FACTOR·(k+1)·eps·λ_max are float32 noise of the
# small eigensolve (measured on all three backends: |error| ≤
# 1.25·(k+1)·eps·λ_max). They are set to exactly 0: at small damping a noise
# σ of 1e-7·σ_max changes that direction's step by tens of percent.
NOISE_FACTOR = 2.0

# The new direction p is dropped when ‖p‖ ≤ SPAN_FACTOR·sqrt(k+1)·eps·‖d‖,
# i.e. when d lies in span(U) to working precision.
SPAN_FACTOR = 16.0

Projection = collections.namedtuple(
    "Projection", ["c", "um", "p", "c2", "r", "pm", "keep"]
)
Projection.__doc__ = """What `project` learns about d and m̂ in the basis U.

c: (k,) coefficients of d in span(U) (both Gram–Schmidt passes).
um: (k,) Uᵀm̂.
p: (n,) d - U c1 after the first pass (the second pass, -U c2, is folded
   into `finish`); None for a complete basis. When U is walked in blocks,
   a `Residual` instead: the pass that writes U' recomputes p block by
   block (the same arithmetic), so p is never stored.
c2: (k,) second-pass coefficients.
r: scalar ‖d - U c‖, zeroed when the new direction is dropped.
pm: scalar pᵀm̂ after both passes.
keep: scalar bool, whether the new direction p/r enters the basis.
"""


Residual = collections.namedtuple("Residual", ["d", "c1", "valid"])
Residual.__doc__ = """p = d - U c1 (0 where not `valid`), to be formed block by block by
the pass over U that needs it, instead of stored."""


def initial_basis(n, k):
    """U₀: the first k columns of the identity (M₀ = 0, so any basis will do)."""
    return np.eye(n, k, dtype=np.float32)


def _row_blocks(n, block_rows):
    """(full blocks, rows in the tail), or None when U is one block."""
    if block_rows is None or n <= block_rows:
        return None
    full = n // block_rows
    return full, n - full * block_rows


def _rows(x, start, rows):
    """x[start:start + rows] along the first axis, with a traced start."""
    return ops.slice(x, (start,) + (0,) * (len(x.shape) - 1),
                     (rows,) + tuple(x.shape[1:]))


def _scaled(x, scale):
    return x if scale is None else x * scale


def _residual_rows(U, d, c1, valid):
    """p = d - U c1 (0 where not ``valid``) for rows of U."""
    p = d - ops.matmul(U, c1)
    return p if valid is None else ops.where(valid, p, 0.0)


def _residual(U, d, m, c1, valid, scale=None, with_um=False):
    """p = d - U c1 and its statistics (Uᵀp, ‖p‖², pᵀm̃) for rows of U,
    m̃ = scale·m; with ``with_um``, Uᵀm̃ too (the walk in blocks forms m̃
    and Uᵀm̃ here, block by block, instead of in a pass of their own)."""
    p = _residual_rows(U, d, c1, valid)
    mt = _scaled(m, scale)
    stats = (p, ops.matmul(p, U), ops.sum(p * p), ops.sum(p * mt))
    return stats + (ops.matmul(mt, U),) if with_um else stats


def _residual_blocked(U, d, m, c1, valid, block_rows, scale):
    """`_residual`'s statistics and Uᵀm̃ in one pass over U, block by
    block (m̃ = scale·m, scale None for 1); p itself is not stored (see
    `Residual`)."""
    full, tail = _row_blocks(U.shape[0], block_rows)

    def stats(start, rows):
        s = None if scale is None else _rows(scale, start, rows)
        return _residual(*(_rows(x, start, rows) for x in (U, d, m)), c1,
                         valid, s, with_um=True)[1:]

    def body(i, carry):
        return tuple(a + b for a, b in zip(carry, stats(i * block_rows,
                                                        block_rows)))

    zero = ops.zeros((), dtype=d.dtype)
    carry = ops.fori_loop(0, full, body, (ops.zeros_like(c1), zero, zero,
                                          ops.zeros_like(c1)))
    if tail:
        start = full * block_rows
        carry = tuple(a + b for a, b in zip(
            carry, stats(start, U.shape[0] - start)))
    return (Residual(d, c1, valid),) + tuple(carry)


def project(U, d, m, complete=False, block_rows=None, valid=None,
            scale=None):
    """Coefficients of d and m̂ in span(U), and the residual of d.

    Reads U four times (Uᵀd, Uᵀm̂, U c1, Uᵀp): the second Gram–Schmidt
    pass is what keeps p orthogonal to U when d is nearly in span(U). With
    ``block_rows``, twice: Uᵀd, then one walk in blocks for U c1, Uᵀp and
    Uᵀm̂, and p is not stored but recomputed by `rotate`.
    With ``complete=True`` (k = n) U spans everything: no residual exists.
    ``valid`` (scalar bool, optional): when False, d is taken as 0, so a
    non-finite d needs no sanitised copy.
    ``scale`` (n,), optional: project scale·d and scale·m̂ instead (a
    diagonal metric, D^{-1/2} for ``metric="adam"``); the Projection is
    then that of the scaled vectors.
    """
    k = U.shape[-1]
    blocked = (not complete
               and _row_blocks(U.shape[0], block_rows) is not None)
    # Whole-array vector-matrix products run near memory speed under XLA
    # on CPU (a skinny (n, k)ᵀ(n, 2) product, or a loop over blocks of U of
    # its own, is slower: measured), so d̃ is stored for Uᵀd̃; Uᵀm̃ is a
    # product of its own only without the walk in blocks.
    d = _scaled(d, scale)
    c1 = ops.matmul(d, U)
    dd = ops.sum(d * d)
    if valid is not None:
        c1 = ops.where(valid, c1, 0.0)
    zero = ops.zeros((), dtype=d.dtype)
    if blocked:
        p, c2, pp, pm, um = _residual_blocked(U, d, m, c1, valid,
                                              block_rows, scale)
    else:
        m = _scaled(m, scale)
        um = ops.matmul(m, U)
        if complete:
            return Projection(c1, um, None, ops.zeros_like(c1), zero, zero,
                              ops.zeros((), dtype="bool"))
        p, c2, pp, pm = _residual(U, d, m, c1, valid)
    # ‖p - U c2‖² = ‖p‖² - ‖c2‖² for orthonormal U.
    r2 = pp - ops.sum(c2 * c2)
    r = ops.sqrt(ops.maximum(r2, 0.0))
    d_norm = ops.sqrt(dd)
    if valid is not None:
        d_norm = ops.where(valid, d_norm, 0.0)
    keep = r > SPAN_FACTOR * math.sqrt(k + 1) * EPS32 * d_norm
    r = ops.where(keep, r, zero)
    pm = pm - ops.sum(c2 * um)
    return Projection(c1 + c2, um, p, c2, r, pm, keep)


def small_matrix(sigma, proj, beta_2):
    """C = diag(α σ, s) + (1 - α) z zᵀ, z = (c, r), normalised by its scale.

    Returns (C / scale, scale). The last diagonal entry s is 0, or -1 when
    the new direction is dropped: its eigenvector (e_{k+1}, decoupled since
    r = 0) then sorts last and is never kept, not even as a zero column.
    """
    z = ops.concatenate([proj.c, ops.expand_dims(proj.r, 0)], axis=0)
    a = ops.concatenate(
        [beta_2 * sigma, ops.zeros((1,), dtype=sigma.dtype)], axis=0
    )
    w = (1.0 - beta_2) * ops.sum(z * z)
    scale = ops.maximum(ops.maximum(ops.max(a), w), 1e-30)
    sentinel = ops.where(proj.keep, 0.0, -1.0)
    k1 = a.shape[0]
    last = ops.cast(ops.arange(k1) == k1 - 1, sigma.dtype)
    diag = a / scale + sentinel * last
    zs = z * ops.sqrt((1.0 - beta_2) / scale)
    C = ops.diag(diag) + ops.outer(zs, zs)
    return C, scale


def top_eigh(C, k):
    """Top-k eigenpairs of symmetric C (..., k+1, k+1), λ descending.

    Works on a stack of matrices (one batched eigensolve). Eigenvalues that
    are float32 noise (or negative) become exactly 0.
    """
    lam, V = ops.eigh(C)  # ascending
    lam = ops.flip(lam, axis=-1)[..., :k]
    V = ops.flip(V, axis=-1)[..., :k]
    # One Newton–Schulz step, V(3I - VᵀV)/2, squares the eigensolver's loss
    # of orthogonality (up to ~1e-6 in float32), which U' = [U, q]V would
    # otherwise accumulate step after step.
    VtV = ops.matmul(ops.swapaxes(V, -1, -2), V)
    V = 1.5 * V - 0.5 * ops.matmul(V, VtV)
    k1 = C.shape[-1]
    lam_max = ops.max(lam, axis=-1, keepdims=True)
    noise = NOISE_FACTOR * k1 * EPS32 * lam_max
    lam = ops.where(lam > noise, lam, 0.0)
    return lam, V


def _rotate(U, p, A, b, m, w, a1, damping, theta, eta, scale):
    """Rows of U' = U A + p bᵀ, and of the step (m̃ - U'w)/γ + U'a1 with
    m̃ = scale·m, multiplied by scale (or θ - η·that when θ is given).
    ``p`` may be a `Residual` restricted to these rows."""
    if isinstance(p, Residual):
        p = _residual_rows(U, p.d, p.c1, p.valid)
    U_new = ops.matmul(U, A) + ops.outer(p, b)
    step = ((_scaled(m, scale) - ops.matmul(U_new, w)) / damping
            + ops.matmul(U_new, a1))
    step = _scaled(step, scale)
    return U_new, (step if theta is None else theta - eta * step)


def _rotate_blocked(U, p, A, b, m, w, a1, damping, theta, eta, scale,
                    block_rows):
    """`_rotate` block by block, writing U' over U (in place under XLA).

    Given θ, θ' = θ - η·step is written over θ, else the step into a new
    array.
    """
    full, tail = _row_blocks(U.shape[0], block_rows)

    def rows(x, start, n):
        if x is None:
            return None
        if isinstance(x, Residual):
            return Residual(_rows(x.d, start, n), x.c1, x.valid)
        return _rows(x, start, n)

    def block(U, out, start, n):
        theta_b = None if theta is None else rows(out, start, n)
        Ub, ob = _rotate(rows(U, start, n), rows(p, start, n), A, b,
                         rows(m, start, n), w, a1, damping, theta_b, eta,
                         rows(scale, start, n))
        return (ops.slice_update(U, (start, 0), Ub),
                ops.slice_update(out, (start,), ob))

    def body(i, carry):
        return block(*carry, i * block_rows, block_rows)

    # U' overwrites U and θ' overwrites θ block by block (each block is read
    # from the carried array and written back, so XLA works in place); the
    # other inputs are read from captured arrays.
    out = ops.zeros_like(m) if theta is None else theta
    U, out = ops.fori_loop(0, full, body, (U, out))
    if tail:
        start = full * block_rows
        U, out = block(U, out, start, U.shape[0] - start)
    return U, out


def rotation(proj, sigma, V, damping, complete=False):
    """The small-space part of `finish`: (A, b, w, a1), all O(k²).

    U' = U A + p bᵀ (b is None for a complete basis), w = U'ᵀm̂ and
    a1 = w/(γ+σ'), from the projection, the new eigenpairs (σ', V) and the
    damping γ (a scalar, possibly a tensor: see the damping rule in
    `keras_ginger.optimizer`).
    """
    k = V.shape[-1]
    Vu, vq = V[:k], V[k]  # (k, k), (k,)
    r = proj.r
    inv_r = ops.where(proj.keep, 1.0 / ops.where(proj.keep, r, 1.0), 0.0)
    # w = U'ᵀ m̂ = Vᵀ [Uᵀm̂; qᵀm̂],   qᵀm̂ = pm / r.
    w = ops.matmul(ops.transpose(Vu), proj.um) + vq * (proj.pm * inv_r)
    a1 = w / (damping + sigma)
    if complete:
        return Vu, None, w, a1
    # q = (p - U c2)/r: fold the second Gram–Schmidt pass into Vu.
    return Vu - ops.outer(proj.c2 * inv_r, vq), vq * inv_r, w, a1


def rotate(U, p, A, b, m, w, a1, damping, complete=False, block_rows=None,
           theta=None, eta=None, scale=None):
    """The pass over U: U' = U A + p bᵀ and the Woodbury step from U'.

    Returns (U', step), or (U', θ - η·step) given ``theta`` and ``eta``.
    ``scale`` (n,), optional: the Woodbury step of scale·m, multiplied by
    scale on the way out (a diagonal metric: D^{-1/2}(γI + M̃)⁻¹D^{-1/2}m).
    """
    if complete:
        U_new = ops.matmul(U, A)
        step = _scaled(ops.matmul(U_new, a1), scale)
        return U_new, step if theta is None else theta - eta * step
    if _row_blocks(U.shape[0], block_rows) is None:
        return _rotate(U, p, A, b, m, w, a1, damping, theta, eta, scale)
    return _rotate_blocked(U, p, A, b, m, w, a1, damping, theta, eta, scale,
                           block_rows)


def step_norm(m_sq, w, sigma, damping, complete=False):
    """‖(γI + U diag(σ) Uᵀ)⁻¹ m‖ from small-space quantities, no pass over U.

    With w = Uᵀm (U orthonormal), m's part outside span(U) has squared norm
    ‖m‖² - ‖w‖² and is divided by γ; the part inside by γ + σ:

        ‖step‖² = (‖m‖² - ‖w‖²)/γ² + ‖w/(γ+σ)‖²        (complete: 2nd term)

    ``m_sq`` is ‖m‖². Used by the grafting scale rule, which only needs the
    norm, so the fused pass that writes θ' can stay one pass. The outside
    term is a difference: see `step_norm_is_accurate` for when to trust it.
    """
    inside = ops.sum(ops.square(w / (damping + sigma)))
    if complete:
        return ops.sqrt(inside)
    outside = ops.maximum(m_sq - ops.sum(w * w), 0.0) / ops.square(damping)
    return ops.sqrt(outside + inside)


# `step_norm`'s outside term subtracts two sums of size ‖m‖² (each with a
# float32 error of a few ε‖m‖²) and divides by γ². Trusted when that error,
# taken as 8ε‖m‖²/γ², is at most 2e-7 of ‖step‖² (1e-7 of ‖step‖, float32's
# own precision: where the choice of path flips between two runs, their
# steps still agree to rounding).
STEP_NORM_SLACK = 2e-7 / (8.0 * EPS32)


def step_norm_is_accurate(m_sq, norm, damping):
    """Whether `step_norm`'s value ``norm`` is accurate to ~1e-7 relative:
    ‖m‖² ≤ STEP_NORM_SLACK·γ²‖step‖² (about 0.21·γ²‖step‖²). It fails where
    most of m lies in span(U) with σ ≫ γ (small damping): there the caller
    forms the step again from U' and takes its norm (the optimizer's
    rare branch)."""
    return m_sq <= STEP_NORM_SLACK * ops.square(damping * norm)


def finish(U, proj, sigma, V, m, damping, complete=False, block_rows=None,
           theta=None, eta=None):
    """New basis U' = [U, q] V and the Woodbury step (γI + U'ΣU'ᵀ)⁻¹ m̂.

    ``sigma`` are the new (unnormalised) eigenvalues, V the (k+1)×k
    eigenvectors, q = (p - U c2)/r the new direction (both Gram–Schmidt
    passes folded into the small matrix). With w = U'ᵀm̂ computed in the
    small space, the step is written as

        (m̂ - U'w)/γ + U' (w/(γ+σ))          (incomplete basis)
        U' (w/(γ+σ))                         (complete basis, k = n)

    so that no difference of two large numbers is formed. Both products
    read U' rather than U: the old U is dead once U' is computed. With
    ``block_rows`` one pass over U writes U' and the step together.
    `rotation` (small space) then `rotate` (the pass), for callers that
    need w before the pass (a scale rule).

    Given ``theta`` (n,) and a scalar ``eta``, returns θ - η·step in place
    of the step, fused into the same pass: the step is never stored.
    """
    A, b, w, a1 = rotation(proj, sigma, V, damping, complete)
    U_new, out = rotate(U, proj.p, A, b, m, w, a1, damping, complete,
                        block_rows, theta, eta)
    return U_new, sigma, out


def ginger_update(U, sigma, d, m, beta_2, damping, complete=False,
                  block_rows=None):
    """One Ginger curvature update followed by the step, for one variable.

    Args:
        U: (n, k) orthonormal basis. sigma: (k,) eigenvalues, descending.
        d: (n,) Fisher gradient d_t. m: (n,) bias-corrected momentum m̂_t.
        beta_2: α, the curvature EMA factor. damping: γ > 0.
        complete: True when k = n (the basis spans the whole space).
        block_rows: walk U in blocks of this many rows (see module doc).

    Returns:
        (U', σ', step) with step = (γI + U'diag(σ')U'ᵀ)⁻¹ m̂.
    """
    k = U.shape[-1]
    proj = project(U, d, m, complete=complete, block_rows=block_rows)
    C, scale = small_matrix(sigma, proj, beta_2)
    lam, V = top_eigh(C, k)
    return finish(U, proj, lam * scale, V, m, damping, complete=complete,
                  block_rows=block_rows)


def woodbury_step(U, sigma, m, damping, complete=False, theta=None, eta=None,
                  w=None):
    """(γI + U diag(σ) Uᵀ)⁻¹ m without a curvature update (3 passes over U).

    Given ``theta`` and ``eta``, returns θ - η·step instead (as `finish`).
    ``w`` = Uᵀm when the caller has it already.
    """
    if w is None:
        w = ops.matmul(m, U)
    a1 = w / (damping + sigma)
    if complete:
        step = ops.matmul(U, a1)
    else:
        step = (m - ops.matmul(U, w)) / damping + ops.matmul(U, a1)
    return step if theta is None else theta - eta * step
