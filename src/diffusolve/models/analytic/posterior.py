"""Exact posteriors of the analytic priors under a linear Gaussian measurement.

For ``y = A x0 + sigma_y eps`` (``eps ~ N(0, I_m)``) and a Gaussian component
``N(mu, C)``, the posterior is Gaussian (Bayes' rule for linear Gaussian models, e.g.
Bishop, *Pattern Recognition and Machine Learning*, 2006, eqs. 2.113-2.117; here in the
gain form of Kalman, 1960):

* ``S = A C A^T + sigma_y^2 I`` (the covariance of ``y``), ``K = C A^T S^-1``;
* ``mean = mu + K (y - A mu)``, ``cov = C - K S K^T = C - W^T W`` with ``W = L^-1 A C``
  and ``S = L L^T`` (Cholesky; ``m x m`` solves only, symmetric by construction);
* the evidence of the component is ``p(y) = N(y; A mu, S)``.

So a Gaussian prior gives a :class:`~.gaussian.Gaussian`; a mixture ``sum_k w_k N(mu_k,
C_k)`` gives the mixture of the component posteriors with weights proportional to
``w_k N(y; A mu_k, S_k)`` (a :class:`~.gmm.GaussianMixture`); the uniform distribution on
points ``x_i`` gives the same points with weights proportional to ``N(y; A x_i, sigma_y^2
I)`` (a :class:`WeightedEmpirical`, an :class:`~.empirical.Empirical`). Each result keeps the
prior's process and sample shape, so its exact denoiser, score, density and sampling are
those of an ordinary prior.

**The operator** is duck-typed (models never import :mod:`diffusolve.inverse`): a dense
``[m, d]`` tensor, or an object with ``matrix()`` (the dense matrix over real output
coordinates), or one with ``A(x)`` (applied to the basis of the prior's sample shape). An
object with ``linear = False`` is refused. Complex measurements are used through their real
and imaginary parts (``torch.view_as_real``, C order), the convention of
``Operator.flatten_y``; the noise is then ``sigma_y`` on each part. Everything is float64
and dense: for the small dimensions of analytic priors (``d`` up to about a thousand).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .empirical import Empirical
from .gaussian import Gaussian
from .gmm import GaussianMixture

__all__ = [
    "WeightedEmpirical",
    "measurement_matrix",
    "condition_gaussian",
    "condition_isotropic",
    "gaussian_posterior",
    "mixture_posterior",
    "empirical_posterior",
    "log_evidence",
]

F64 = torch.float64


# ---------------------------------------------------------------- the measurement
def measurement_matrix(operator: Any, shape: tuple[int, ...]) -> Tensor:
    """Dense float64 ``[m, d]`` matrix of a linear ``operator`` on samples of ``shape``.

    Example:
        >>> import torch
        >>> measurement_matrix(torch.tensor([[1.0, 2.0]]), (2,))
        tensor([[1., 2.]], dtype=torch.float64)
    """
    d = math.prod(shape)
    if isinstance(operator, Tensor):
        m = operator.to(F64)
        if m.ndim != 2 or m.shape[1] != d:
            raise ValueError(f"a matrix operator must be [m, {d}]; got {tuple(m.shape)}")
        return m
    if getattr(operator, "linear", True) is False:
        raise ValueError(
            f"the exact posterior needs a linear operator; {operator!r} is nonlinear "
            "(use a posterior sampler that needs gradients only)"
        )
    in_shape = getattr(operator, "in_shape", None)
    if in_shape is not None and math.prod(in_shape) != d:
        raise ValueError(
            f"the operator takes inputs of shape {tuple(in_shape)}; the prior's samples have "
            f"shape {shape} ({d} elements)"
        )
    if callable(getattr(operator, "matrix", None)):
        m = operator.matrix().to(F64)
    else:
        apply = operator.A if callable(getattr(operator, "A", None)) else operator
        basis = torch.eye(d, dtype=F64).reshape(d, *(in_shape or shape))
        out = apply(basis)
        m = _real_rows(out).T
    if m.ndim != 2 or m.shape[1] != d:
        raise ValueError(f"the operator's matrix must be [m, {d}]; got {tuple(m.shape)}")
    return m.contiguous()


def _real_rows(t: Tensor) -> Tensor:
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.reshape(t.shape[0], -1).to(F64)


def _measurement(y: Tensor, m: int) -> Tensor:
    """One measurement as a real ``[m]`` vector (``[1, ...]`` or unbatched, real or complex)."""
    y = torch.as_tensor(y)
    flat = (torch.view_as_real(y) if y.is_complex() else y).reshape(-1).to(F64)
    if flat.numel() != m:
        batch = f" (a batch of {y.shape[0]}? give one measurement)" if y.ndim > 1 else ""
        raise ValueError(f"y has {flat.numel()} real entries, the operator gives {m}{batch}")
    return flat


def _sigma(sigma_y: float | Tensor) -> float:
    s = float(sigma_y)
    if not s > 0:
        raise ValueError(
            f"sigma_y must be positive (got {sigma_y}); the noiseless posterior is degenerate"
        )
    return s


# ---------------------------------------------------------------- Gaussian conditioning
def condition_gaussian(
    means: Tensor, covs: Tensor, a: Tensor, y: Tensor, sigma_y: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Condition ``K`` Gaussians ``N(means[k], covs[k])`` on ``y = A x + sigma_y eps``.

    Args:
        means: ``[K, d]``; covs: ``[K, d, d]``; a: ``[m, d]``; y: ``[m]``.

    Returns:
        ``(post_means [K, d], post_covs [K, d, d], log_evidence [K])`` with
        ``log_evidence[k] = log N(y; A mu_k, A C_k A^T + sigma_y^2 I)``.

    Example:
        >>> import torch
        >>> mu, c = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, 1, dtype=torch.float64)
        >>> m, v, _ = condition_gaussian(mu, c, torch.ones(1, 1, dtype=torch.float64),
        ...                              torch.tensor([2.0], dtype=torch.float64), 1.0)
        >>> round(m.item(), 12), round(v.item(), 12)  # N(0, 1), y = x + N(0, 1): half way
        (1.0, 0.5)
    """
    k, d = means.shape
    n = a.shape[0]
    ca = covs @ a.T  # [K, d, m]
    s = a @ ca + (sigma_y**2) * torch.eye(n, dtype=F64)  # [K, m, m]
    chol = torch.linalg.cholesky(0.5 * (s + s.transpose(1, 2)))
    w = torch.linalg.solve_triangular(chol, ca.transpose(1, 2), upper=False)  # [K, m, d]
    r = torch.linalg.solve_triangular(chol, (y - means @ a.T)[..., None], upper=False)
    post_means = means + (w.transpose(1, 2) @ r)[..., 0]
    post_covs = covs - w.transpose(1, 2) @ w
    post_covs = 0.5 * (post_covs + post_covs.transpose(1, 2))
    logdet = 2 * torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)
    log_ev = -0.5 * ((r[..., 0] ** 2).sum(1) + logdet + n * math.log(2 * math.pi))
    return post_means, post_covs, log_ev


def gaussian_posterior(
    prior: Gaussian, operator: Any, y: Tensor, sigma_y: float | Tensor
) -> Gaussian:
    """Exact posterior of a :class:`~.gaussian.Gaussian` prior (a Gaussian).

    Example:
        >>> import torch
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import edm
        >>> prior = Gaussian(torch.zeros(2), torch.ones(2), process=edm())
        >>> post = prior.posterior(torch.tensor([[1.0, 0.0]]), torch.tensor([2.0]), 1.0)
        >>> post.mean.round(decimals=12).tolist(), post.cov.diagonal().round(decimals=12).tolist()
        ([1.0, 0.0], [0.5, 1.0])
    """
    a = measurement_matrix(operator, tuple(prior.shape))
    mean, cov, _ = condition_gaussian(
        prior.mean[None], prior.cov[None], a, _measurement(y, a.shape[0]), _sigma(sigma_y)
    )
    return _build(Gaussian, mean[0], cov[0], process=prior.process, shape=prior.shape)


def condition_isotropic(
    means: Tensor, variances: Tensor, a: Tensor, y: Tensor, sigma_y: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`condition_gaussian` for isotropic components ``N(mu_k, l_k I)``, through the
    SVD ``A = U diag(s) V^T`` (full ``V``): every posterior covariance is diagonal in ``V``,
    ``C_k' = V diag(l_k sigma_y^2 / (l_k s_i^2 + sigma_y^2)) V^T`` (``s_i = 0`` past the rank),
    so no ``d x d`` eigendecomposition is needed (``O(d^2 m)`` for ``V``).

    Returns:
        ``(post_means [K, d], post_evals [K, d], evecs [d, d], log_evidence [K])``.

    Example:
        >>> import torch
        >>> m, v, q, _ = condition_isotropic(torch.zeros(1, 2, dtype=torch.float64),
        ...     torch.ones(1, dtype=torch.float64), torch.tensor([[2.0, 0.0]], dtype=torch.float64),
        ...     torch.tensor([2.0], dtype=torch.float64), 1.0)
        >>> m.tolist(), v.tolist()  # x_1 seen through 2 x_1 + N(0, 1); x_2 unseen
        ([[0.8, 0.0]], [[0.2, 1.0]])
    """
    k, d = means.shape
    n = a.shape[0]
    u, s, vh = torch.linalg.svd(a, full_matrices=True)
    r = s.numel()
    l = variances.reshape(k, 1)
    s_y = torch.zeros(n, dtype=F64)  # singular values on the measurement side (m of them)
    s_y[:r] = s
    var_y = l * s_y**2 + sigma_y**2  # [K, m]: S_k = U diag(var_y) U^T
    res = (y - means @ a.T) @ u  # [K, m]
    log_ev = -0.5 * ((res**2 / var_y).sum(1) + torch.log(var_y).sum(1) + n * math.log(2 * math.pi))
    coef = l * s * res[:, :r] / var_y[:, :r]  # [K, r]: V_r^T (l A^T S^-1 (y - A mu))
    post_means = means + coef @ vh[:r]
    s_x = torch.zeros(d, dtype=F64)
    s_x[:r] = s
    post_evals = l * sigma_y**2 / (l * s_x**2 + sigma_y**2)
    return post_means, post_evals, vh.T.contiguous(), log_ev


def _isotropic(prior: GaussianMixture) -> bool:
    return prior.evecs is None and bool(torch.all(prior.evals == prior.evals[:, :1]))


def mixture_posterior(
    prior: GaussianMixture, operator: Any, y: Tensor, sigma_y: float | Tensor
) -> GaussianMixture:
    """Exact posterior of a :class:`~.gmm.GaussianMixture` prior: the component posteriors
    with weights ``proportional to w_k N(y; A mu_k, A C_k A^T + sigma_y^2 I)``.

    Components whose posterior weight underflows to 0 in float64 are dropped. Isotropic
    components (``C_k = l_k I``, as in the MCGdiff benchmark) take the SVD route of
    :func:`condition_isotropic`: one shared eigenbasis, no ``d x d`` eigendecomposition.

    Example:
        >>> import torch
        >>> from diffusolve.models import GaussianMixture
        >>> from diffusolve.process import edm
        >>> prior = GaussianMixture(torch.tensor([0.5, 0.5]), torch.tensor([[-2.0], [2.0]]),
        ...                         torch.tensor([0.25, 0.25]), process=edm())
        >>> post = prior.posterior(torch.tensor([[1.0]]), torch.tensor([1.5]), 0.5)
        >>> post.weights.tolist()[1] > 0.999  # y = 1.5 points to the right component
        True
    """
    a = measurement_matrix(operator, tuple(prior.shape))
    yv, sig = _measurement(y, a.shape[0]), _sigma(sigma_y)
    if _isotropic(prior):
        means, evals, evecs, log_ev = condition_isotropic(
            prior.means, prior.evals[:, 0], a, yv, sig
        )
        log_w = torch.log_softmax(prior.log_weights + log_ev, 0)
        keep = torch.exp(log_w) > 0
        return _build(
            GaussianMixture.from_eigh,
            torch.exp(log_w[keep]),
            means[keep],
            evals[keep],
            evecs.expand(int(keep.sum()), *evecs.shape),
            process=prior.process,
            shape=prior.shape,
        )
    means, covs, log_ev = condition_gaussian(prior.means, prior.covs, a, yv, sig)
    log_w = torch.log_softmax(prior.log_weights + log_ev, 0)
    keep = torch.exp(log_w) > 0
    return _build(
        GaussianMixture,
        torch.exp(log_w[keep]),
        means[keep],
        covs[keep],
        process=prior.process,
        shape=prior.shape,
    )


def _build(make: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return make(*args, **kwargs)
    except ValueError as e:
        if "positive definite" not in str(e):
            raise
        raise ValueError(
            f"{e}: the posterior covariance lost definiteness in float64 (sigma_y is tiny "
            "relative to the prior scale along a measured direction); use a larger sigma_y"
        ) from e


# ---------------------------------------------------------------- empirical priors
class WeightedEmpirical(Empirical):
    """The distribution ``sum_i w_i delta(x - x_i)`` on points ``data`` (``[N, ...]``):
    an :class:`~.empirical.Empirical` prior with weights (its exact denoiser is the softmax
    over the points with ``log w_i`` added to the logits).

    Args:
        data: ``[N, ...]`` points.
        point_weights: ``[N]`` non-negative weights (normalised here), or
        log_point_weights: ``[N]`` unnormalised log-weights.
        process: the noise process.

    Example:
        >>> import torch
        >>> from diffusolve.process import edm
        >>> emp = WeightedEmpirical(torch.tensor([[0.0], [4.0]]), torch.tensor([1.0, 3.0]),
        ...                         process=edm())
        >>> emp(torch.tensor([[2.0]]), 1e4)  # huge noise: the weighted mean
        tensor([[3.]])
    """

    def __init__(
        self,
        data: Tensor,
        point_weights: Tensor | None = None,
        *,
        log_point_weights: Tensor | None = None,
        process: Any,
    ) -> None:
        super().__init__(data, process=process)
        if (point_weights is None) == (log_point_weights is None):
            raise ValueError("give exactly one of point_weights and log_point_weights")
        if point_weights is not None:
            w = torch.as_tensor(point_weights, dtype=F64).flatten()
            if torch.any(w < 0) or not torch.any(w > 0):
                raise ValueError("point weights must be non-negative with a positive sum")
            lw = torch.log(w)
        else:
            lw = torch.as_tensor(log_point_weights, dtype=F64).flatten()
        if lw.numel() != self.n_points:
            raise ValueError(f"{lw.numel()} weights for {self.n_points} points")
        self.log_point_weights = torch.log_softmax(lw, 0)
        self.point_weights = torch.exp(self.log_point_weights)
        self._log_nw = self.log_point_weights + math.log(self.n_points)

    def _logits(self, xt: Tensor, s2: Tensor) -> Tensor:
        # uniform weights give 0 here, so Empirical's log_prob (which subtracts log N) holds
        return super()._logits(xt, s2) + self._log_nw

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact samples: points drawn with replacement with their weights."""
        idx = torch.multinomial(self.point_weights, n, replacement=True, generator=generator)
        return self.data[idx].reshape((n,) + self.shape)

    def __repr__(self) -> str:
        return (
            f"WeightedEmpirical(N={self.n_points}, shape={self.shape}, "
            f"process={self.process.name!r})"
        )


def _point_log_likelihood(prior: Empirical, operator: Any, y: Tensor, sigma_y: Any) -> Tensor:
    a = measurement_matrix(operator, tuple(prior.shape))
    yv, sig = _measurement(y, a.shape[0]), _sigma(sigma_y)
    r = prior.data @ a.T - yv
    return -0.5 * (r * r).sum(1) / sig**2 - 0.5 * a.shape[0] * math.log(2 * math.pi * sig**2)


def _log_prior_weights(prior: Empirical) -> Tensor:
    lw = getattr(prior, "log_point_weights", None)
    if lw is not None:
        return lw
    return torch.full((prior.n_points,), -math.log(prior.n_points), dtype=F64)


def empirical_posterior(
    prior: Empirical, operator: Any, y: Tensor, sigma_y: float | Tensor
) -> WeightedEmpirical:
    """Exact posterior of an :class:`~.empirical.Empirical` prior: the same points with
    weights proportional to ``w_i N(y; A x_i, sigma_y^2 I)``.

    Example:
        >>> import torch
        >>> from diffusolve.models import Empirical
        >>> from diffusolve.process import edm
        >>> prior = Empirical(torch.tensor([[0.0], [1.0]]), process=edm())
        >>> post = prior.posterior(torch.tensor([[1.0]]), torch.tensor([1.0]), 1.0)
        >>> [round(v, 4) for v in post.point_weights.tolist()]  # 1 : e^(1/2)
        [0.3775, 0.6225]
    """
    log_w = _log_prior_weights(prior) + _point_log_likelihood(prior, operator, y, sigma_y)
    return WeightedEmpirical(
        prior.data.reshape((prior.n_points,) + prior.shape),
        log_point_weights=log_w,
        process=prior.process,
    )


def log_evidence(prior: Any, operator: Any, y: Tensor, sigma_y: float | Tensor) -> float:
    """``log p(y)`` under the prior (Gaussian, mixture or empirical) and the measurement.

    Example:
        >>> import torch
        >>> from diffusolve.models import Gaussian
        >>> from diffusolve.process import edm
        >>> prior = Gaussian(torch.zeros(1), torch.ones(1), process=edm())
        >>> round(log_evidence(prior, torch.ones(1, 1), torch.zeros(1), 1.0), 6)  # N(0; 0, 2)
        -1.265512
    """
    if isinstance(prior, Empirical):
        ll = _point_log_likelihood(prior, operator, y, sigma_y)
        return float(torch.logsumexp(_log_prior_weights(prior) + ll, 0))
    a = measurement_matrix(operator, tuple(prior.shape))
    yv, sig = _measurement(y, a.shape[0]), _sigma(sigma_y)
    if isinstance(prior, GaussianMixture):
        if _isotropic(prior):
            log_ev = condition_isotropic(prior.means, prior.evals[:, 0], a, yv, sig)[3]
        else:
            log_ev = condition_gaussian(prior.means, prior.covs, a, yv, sig)[2]
        return float(torch.logsumexp(prior.log_weights + log_ev, 0))
    if isinstance(prior, Gaussian):
        _, _, log_ev = condition_gaussian(prior.mean[None], prior.cov[None], a, yv, sig)
        return float(log_ev[0])
    raise TypeError(f"no exact evidence for {type(prior).__name__}")
