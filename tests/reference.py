"""Float64 NumPy reference of Ginger's Algorithm 1 with dense matrices.

Independent of keras_ginger: M is kept as a dense n×n matrix, truncated to
its best rank-k approximation after every update by a full eigh, and the step
is a dense solve (γI + M)⁻¹ m̂.
"""

import numpy as np

# Ginger's paper algorithm (Algorithm 1), bit for bit: no grafting, absolute
# damping. The tests that compare against the paper's formula pass it.
# (The vector block on every variable, as the paper has it.)
PAPER = dict(graft=None, relative_damping=False, metric=None,
             curvature="vector")


class DenseGinger:
    """``graft="adam"``: the step is the direction (γI + M)⁻¹m̂ scaled to
    the norm of Keras Adam's step m̂·√(1-β₂ᵗ)/(√v + ε) (v with
    ``graft_beta_2``). ``relative_damping``: γ is damping·λ_max(M) (damping
    itself while M = 0). ``metric="adam"``: M is the EMA of d̃d̃ᵀ with
    d̃ = D^{-1/2}d, D Adam's denominator, and the step is
    γ·D^{-1/2}(γI + M)⁻¹D^{-1/2}m̂ (with ``graft="adam"`` too: that
    direction, with the norm of Adam's step measured in the metric,
    ‖D^{1/2}x‖)."""

    def __init__(self, n, tau, beta_1, beta_2, damping, graft=None,
                 relative_damping=False, graft_beta_2=0.999,
                 graft_epsilon=1e-7, metric=None, curvature="vector"):
        # The paper's block of the flattened variable (PAPER passes it).
        assert curvature == "vector", curvature
        self.k = min(tau, n)
        self.beta_1, self.beta_2, self.damping = beta_1, beta_2, damping
        self.graft, self.relative = graft, relative_damping
        self.graft_beta_2, self.graft_epsilon = graft_beta_2, graft_epsilon
        self.metric = metric
        self.M = np.zeros((n, n))
        self.m = np.zeros(n)
        self.v = np.zeros(n)
        self.t = 0

    def step(self, g, d, update_curvature=True):
        """Returns the step (γI + M_t)⁻¹ m̂_t (θ moves by -lr times it).

        ``update_curvature=False``: M stays as it is (d unused)."""
        g = np.asarray(g, np.float64).ravel()
        d = np.asarray(d, np.float64).ravel()
        self.t += 1
        self.m = self.beta_1 * self.m + (1 - self.beta_1) * g
        m_hat = self.m / (1 - self.beta_1**self.t)
        b2 = self.graft_beta_2
        if self.graft is not None or self.metric is not None:
            self.v = b2 * self.v + (1 - b2) * g * g
        D = (np.sqrt(self.v) + self.graft_epsilon) / np.sqrt(1 - b2**self.t)
        self.D = D  # Adam's denominator at this step (norms in the metric)
        s = D ** -0.5 if self.metric == "adam" else np.ones_like(g)
        M = self.M
        if update_curvature:
            dt = s * d  # Adam's metric: the curvature of D^{-1/2} d
            M = self.beta_2 * self.M + (1 - self.beta_2) * np.outer(dt, dt)
            if self.t > self.k:  # rank(M) ≤ t: truncation is the identity before
                w, V = np.linalg.eigh(M)
                w, V = w[::-1][: self.k], V[:, ::-1][:, : self.k]
                M = (V * w) @ V.T
        self.M = M
        n = len(g)
        damping = self.damping
        top = np.linalg.eigvalsh(M)[-1]
        if self.relative and top > 0:
            damping = self.damping * top
        direction = np.linalg.solve(damping * np.eye(n) + self.M, s * m_hat)
        if self.metric == "adam":
            direction = damping * s * direction
        if self.graft is None:
            return direction
        adam = m_hat / D
        # Norms in the metric: ‖x‖ = ‖D^{1/2}x‖ in Adam's, Euclidean else.
        w = np.sqrt(D) if self.metric == "adam" else 1.0
        return direction * (np.linalg.norm(w * adam)
                            / np.linalg.norm(w * direction))


class DenseKronecker:
    """Float64 reference of the Kronecker block with dense factors.

    Θ (m, n); each side's factor is a dense s×s matrix: the exact EMA
    α F + (1-α) D Dᵀ (left) / Dᵀ D (right) for a full side (s ≤
    ``full_size``); for a low-rank side the frequent-directions recurrence
    of rank k = min(rank, s) (the tail rule "accumulate"), also dense: F ← α B + (1-α) D Dᵀ, its full
    eigh, δ = λ_{k+1}, B = V_k diag(λ_k) V_kᵀ, ρ ← α ρ + δ. The step is
    P_L M̂ P_R with P = V diag(max(λ, γ_s)^{-p}) Vᵀ + γ_s^{-p}(I - V Vᵀ)
    over the kept pairs, γ_s = max(ρ, γ λ₁) (full: γ λ₁), P = I while the
    side has no curvature; grafted to Adam's norm (``graft="adam"``) in
    the metric, as `DenseGinger`. ``metric="adam"``: the factors of
    D^{-1/2}∘d and the step D^{-1/2}∘P_L(D^{-1/2}∘M̂)P_R.
    """

    def __init__(self, shape, rank=32, full_size=256, beta_1=0.9,
                 beta_2=0.99, damping=1e-3, exponent=0.25, graft="adam",
                 metric=None, graft_beta_2=0.999, graft_epsilon=1e-7,
                 interval=1):
        self.shape = shape
        # A full side's P from its factor every `interval` refreshes
        # (`kronecker_interval`), the last one in between.
        self.interval, self.refreshes = interval, 0
        self.beta_1, self.beta_2, self.damping = beta_1, beta_2, damping
        self.p, self.graft, self.metric = exponent, graft, metric
        self.graft_beta_2, self.graft_epsilon = graft_beta_2, graft_epsilon
        self.sides = []
        for s in shape:
            full = s <= full_size
            self.sides.append(dict(F=np.zeros((s, s)), rho=0.0, full=full,
                                   k=s if full else min(rank, s),
                                   P=np.eye(s)))
        self.m = np.zeros(shape)
        self.v = np.zeros(shape)
        self.t = 0

    def _update(self, side, Y):
        a = self.beta_2
        F = a * side["F"] + (1 - a) * Y @ Y.T
        if side["full"]:
            side["F"] = F
            return
        lam, V = np.linalg.eigh(F)
        lam, V = lam[::-1], V[:, ::-1]
        k = side["k"]
        delta = max(lam[k], 0.0) if len(lam) > k else 0.0
        side["F"] = (V[:, :k] * lam[:k]) @ V[:, :k].T
        side["rho"] = a * side["rho"] + delta

    def _preconditioner(self, side):
        F = side["F"]
        lam, V = np.linalg.eigh(F)
        lam, V = np.maximum(lam[::-1], 0.0), V[:, ::-1]
        s = F.shape[0]
        if lam[0] <= 0:
            return np.eye(s)
        k = side["k"]
        level = self.damping * lam[0]
        if not side["full"]:
            level = max(side["rho"], level)
        lam, V = lam[:k], V[:, :k]
        P = (V * np.maximum(lam, level) ** -self.p) @ V.T
        return P + level ** -self.p * (np.eye(s) - V @ V.T)

    def step(self, g, d, update_curvature=True):
        g = np.asarray(g, np.float64).reshape(self.shape)
        d = np.asarray(d, np.float64).reshape(self.shape)
        self.t += 1
        self.m = self.beta_1 * self.m + (1 - self.beta_1) * g
        m_hat = self.m / (1 - self.beta_1**self.t)
        b2 = self.graft_beta_2
        self.v = b2 * self.v + (1 - b2) * g * g
        D = (np.sqrt(self.v) + self.graft_epsilon) / np.sqrt(1 - b2**self.t)
        s = D ** -0.5 if self.metric == "adam" else np.ones(self.shape)
        if update_curvature:
            dt = s * d
            self._update(self.sides[0], dt)
            self._update(self.sides[1], dt.T)
            decompose = self.refreshes % self.interval == 0
            self.refreshes += 1
            for side in self.sides:
                if decompose or not side["full"]:
                    side["P"] = self._preconditioner(side)
        PL, PR = (side["P"] for side in self.sides)
        direction = PL @ (s * m_hat) @ PR
        if self.graft is None:
            return (s * direction).ravel()
        adam = m_hat / D
        w = np.sqrt(D) if self.metric == "adam" else 1.0
        step = s * direction
        return (step * (np.linalg.norm(w * adam)
                        / np.linalg.norm(w * step))).ravel()


def separated_stream(rng, n, k, steps, tail=1e-2):
    """Gradients whose top-k covariance spectrum is well separated.

    d = Q diag(s) ξ with s linearly from 1 to 0.3 on k directions and `tail`
    on the rest, so that truncation to rank k is unambiguous.
    """
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = np.concatenate([np.linspace(1.0, 0.3, k), np.full(n - k, tail)])
    return [(Q * s) @ rng.standard_normal(n) for _ in range(steps)]


def rel_err(a, b):
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return np.linalg.norm(a - b) / np.linalg.norm(b)
