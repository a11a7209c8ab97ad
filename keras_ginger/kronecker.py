"""Pure math of Ginger's Kronecker block: no Keras state, only `keras.ops`.

A variable reshaped to a matrix Θ (m, n) (`as_matrix_shape`: a Dense
kernel (in, out), a conv kernel (kh·kw·c_in, c_out), an attention kernel
(d_model, heads·head_dim), an embedding table (vocabulary, width)) gets,
instead of one curvature of its m·n entries, two Kronecker factors of the
Fisher / GGN (K-FAC; Shampoo's two factors), each an exponential moving
average of the Fisher gradient D (d reshaped):

    L_t = α L_{t-1} + (1 - α) D Dᵀ      (m, m)      α = ``beta_2``
    R_t = α R_{t-1} + (1 - α) Dᵀ D      (n, n)

Each side is kept as Ginger keeps its curvature, a damped eigendecomposition
of rank k (the side's own rank; k = side length for a *full* side):

    L ≈ U diag(σ) Uᵀ,   U (m, k) orthonormal, σ descending ≥ 0,
    ρ: the level of L's spectrum outside span(U) (0 for a full side),

and the step for the momentum M̂ is the matrix powers

    L̃^{-p} M̂ R̃^{-p},   L̃ = U diag(max(σ, γ_L)) Uᵀ + γ_L (I - U Uᵀ)
                         γ_L = max(ρ, γ·σ₁)     (γ = ``kronecker_damping``)

each side in O(m·n·k) through  L̃^{-p}X = γ_L^{-p}X + U diag(λ̃^{-p} - γ_L^{-p}) UᵀX,
never forming an m×m matrix unless the side is full. γ_L is the tail level
(Sketchy's residual, Feinberg et al. 2023) floored relative to σ₁, so that a
loss multiplied by c multiplies L̃ by c² and the grafted step is unchanged.

The factor update in small space (`lowrank_small`, then `lowrank_finish`
around the eigensolve), for a side of length s
with w new columns Y (Y = D for L, Dᵀ for R: exact; or a sketch D Ω):

    Z = [U diag(√(α σ)), √(1-α) Y]              (s, k + w)
    Z = Q R (thin QR);   R Rᵀ = V diag(λ) Vᵀ     ((k+w)×(k+w))
    U' = Q V[:, :k],  σ' = λ[:k]

so that U' diag(σ') U'ᵀ is the best rank-k approximation of
α U diag(σ) Uᵀ + (1-α) Y Yᵀ, computed without any s×s matrix.

The tail level (``tail``). Truncation only removes positive semidefinite
mass, at most δ = λ[k] (the first dropped eigenvalue) per update, so the
kept part T = U diag(σ) Uᵀ satisfies T ≼ A (A the EMA itself) and

    A ≼ T + ρ I,   ρ_t = α ρ_{t-1} + δ_t                 ("accumulate")

as in frequent directions with decay (Ghashami et al. 2016; Sketchy,
Feinberg et al. 2023), which also subtracts δ from the kept eigenvalues
("fd": the same bound, with σ biased low). "next": ρ = δ, the next
eigenvalue of the tracked matrix, a lower estimate of A's. Measured
against the exact EMA (tests/test_kronecker.py,
benchmarks/kronecker_tracking.py): "accumulate" keeps σ within 0.3 % of
A's top-k and ρ at ~1.3x its (k+1)-th eigenvalue; "fd" has σ_k 50 % low;
"next" has ρ 20x low. The block uses "accumulate". A full side (k = s)
recomputes the whole factor, U diag(ασ) Uᵀ + (1-α)YYᵀ, and takes its
exact eigh: ρ = 0.
"""

import numpy as np
from keras import ops

TAILS = ("fd", "next", "accumulate")


def as_matrix_shape(shape):
    """(m, n) of a variable's shape: its leading axes by its trailing ones,
    split where the longer side is shortest (ties: the later split).

    A Dense kernel stays (d_in, d_out); a conv kernel (kh, kw, c_in, c_out)
    reads as (kh·kw·c_in, c_out) whenever c_out ≥ kh·kw (a 3×3 conv with
    9 or more filters); an attention kernel (d_model, heads, head_dim)
    reads as (d_model, heads·head_dim) and its output kernel (heads,
    head_dim, d_model) as (heads·head_dim, d_model) — rather than
    (d_model·heads, head_dim).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        return 1, (shape[0] if shape else 1)
    best = None
    for p in range(1, len(shape)):
        m, n = int(np.prod(shape[:p])), int(np.prod(shape[p:]))
        if best is None or max(m, n) <= max(best):
            best = (m, n)
    return best


def eigh_desc(C):
    """Eigenpairs of symmetric C (..., s, s), λ descending, negatives
    (rounding) as 0. Works on a stack (one batched eigensolve)."""
    lam, V = ops.eigh(C)
    lam = ops.flip(lam, axis=-1)
    V = ops.flip(V, axis=-1)
    return ops.maximum(lam, 0.0), V


def full_factor(U, sigma, Y, beta_2, F=None):
    """A full side (U (s, s)): the exact factor F' = α F + (1-α) YYᵀ,
    ``Y`` (s, w), with F = UΣUᵀ unless the factor itself is given (kept
    between eigendecompositions). Its eigendecomposition (`eigh_desc`) is
    the new (U, σ)."""
    old = (ops.matmul(U * (beta_2 * sigma), ops.transpose(U)) if F is None
           else beta_2 * F)
    F = old + (1.0 - beta_2) * ops.matmul(Y, ops.transpose(Y))
    return 0.5 * (F + ops.transpose(F))


def lowrank_small(U, sigma, Y, beta_2):
    """A low-rank side (U (s, k), k < s), first half of its update: the QR
    of Z = [U diag(√(ασ)), √(1-α) Y] and the small matrix RRᵀ whose
    eigendecomposition (`eigh_desc`) `lowrank_finish` takes. Returns
    (Q (s, k+w), RRᵀ)."""
    Z = ops.concatenate(
        [U * ops.sqrt(beta_2 * sigma), ops.sqrt(1.0 - beta_2) * Y], axis=1)
    Q, Rz = ops.qr(Z, mode="reduced")
    C = ops.matmul(Rz, ops.transpose(Rz))
    return Q, 0.5 * (C + ops.transpose(C))


def lowrank_finish(Q, lam, V, rho, k, beta_2, tail="accumulate",
                   unsketched=None):
    """Second half: U' = Q V[:, :k], the kept eigenvalues and the tail
    level (module doc; ``tail`` one of `TAILS`).

    ``unsketched``: optional scalar, the Fisher energy of this side that Y
    does not carry (‖D‖²_F - ‖Y‖²_F for a sketch Y = DΩ); it is spread over
    the s - k directions outside span(U') and added to the tail level.
    Returns (U', σ', ρ').
    """
    s = Q.shape[0]
    U_new = ops.matmul(Q, V[:, :k])
    delta = lam[k] if lam.shape[0] > k else ops.zeros((), lam.dtype)
    if tail == "fd":
        sigma_new = ops.maximum(lam[:k] - delta, 0.0)
        rho_new = beta_2 * rho + delta
    elif tail == "next":
        sigma_new, rho_new = lam[:k], delta
    elif tail == "accumulate":
        sigma_new, rho_new = lam[:k], beta_2 * rho + delta
    else:
        raise ValueError(f"tail must be one of {TAILS}. Received: {tail!r}")
    if unsketched is not None:
        rho_new = rho_new + (1.0 - beta_2) * ops.maximum(
            unsketched, 0.0) / float(s - k)
    return U_new, sigma_new, rho_new


def side_levels(sigma, rho, damping, complete):
    """(λ̃, γ_side): the damped eigenvalues max(σ, γ_side) and the level
    outside span(U), γ_side = max(ρ, γ·σ₁) (full side: γ·σ₁). Where the
    side has no curvature yet (σ₁ = 0) both are 1: the identity."""
    top = sigma[0]
    level = damping * top if complete else ops.maximum(rho, damping * top)
    level = ops.where(top > 0.0, level, 1.0)
    return ops.maximum(sigma, level), level


def apply_side(U, lam, level, X, exponent, complete, left):
    """L̃^{-p} X (``left``) or X R̃^{-p}: U diag(λ̃^{-p}) UᵀX for a full
    side, γ^{-p}X + U diag(λ̃^{-p} - γ^{-p}) UᵀX for a low-rank one."""
    inv = ops.power(lam, -exponent)
    if complete:
        if left:
            return ops.matmul(U * inv, ops.matmul(ops.transpose(U), X))
        return ops.matmul(ops.matmul(X, U) * inv, ops.transpose(U))
    base = ops.power(level, -exponent)
    coef = inv - base
    if left:
        return base * X + ops.matmul(U * coef, ops.matmul(ops.transpose(U), X))
    return base * X + ops.matmul(ops.matmul(X, U) * coef, ops.transpose(U))


def kronecker_direction(M, left, right, damping, exponent):
    """L̃^{-p} M R̃^{-p} for M (m, n); ``left``/``right`` are (U, σ, ρ,
    complete) per side."""
    X = M
    for (U, sigma, rho, complete), is_left in ((left, True), (right, False)):
        lam, level = side_levels(sigma, rho, damping, complete)
        X = apply_side(U, lam, level, X, exponent, complete, is_left)
    return X
