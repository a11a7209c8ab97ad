"""Float64 NumPy reference of Ginger's Algorithm 1 with dense matrices.

Independent of keras_ginger: M is kept as a dense n×n matrix, truncated to
its best rank-k approximation after every update by a full eigh, and the step
is a dense solve (γI + M)⁻¹ m̂.
"""

import numpy as np

# Ginger's paper algorithm (Algorithm 1), bit for bit: no grafting, absolute
# damping. The tests that compare against the paper's formula pass it.
PAPER = dict(graft=None, relative_damping=False, metric=None)


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
                 graft_epsilon=1e-7, metric=None):
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
