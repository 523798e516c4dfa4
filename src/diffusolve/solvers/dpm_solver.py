"""DPM-Solver (Lu et al., NeurIPS 2022) in noise prediction, singlestep and multistep.

Also holds the exponential-integrator helpers shared with DPM-Solver++ (:mod:`.dpmpp`).

For ``x = alpha x0 + sigma eps`` and ``lambda = log(alpha / sigma)`` the probability-flow
ODE has the exact variation-of-constants solution over a step ``s -> t``
(``h = lambda_t - lambda_s``):

    noise prediction:  x_t = (alpha_t / alpha_s) x_s
                             - alpha_t int_{lambda_s}^{lambda_t} e^{-lambda} eps(lambda) dlambda
    data prediction:   x_t = (sigma_t / sigma_s) x_s
                             + sigma_t int_{lambda_s}^{lambda_t} e^{lambda} x0(lambda) dlambda

Expanding the model output ``m`` (``eps`` or ``x0``) in a Taylor series in ``lambda``
gives every DPM-Solver update as

    x_t = ratio x_s + c * sum_k  h phi_k(z) D_{k-1}

with ``phi_1(z) = expm1(z) / z``, ``phi_{k+1}(z) = (phi_k(z) - 1/k!) / z`` and ``D_j``
finite differences that approximate ``h^j d^j m / dlambda^j`` (``D_0 = m``), where

* noise prediction: ``ratio = alpha_t / alpha_s``, ``c = -sigma_t``, ``z = h``;
* data prediction:  ``ratio = sigma_t / sigma_s``, ``c = alpha_t``, ``z = -h``.

So ``c h phi_1(z)`` is ``-sigma_t expm1(h)`` (noise) or ``-alpha_t expm1(-h)`` (data), the
first-order (DDIM) coefficient; ``c h phi_2(z)`` is the official code's
``-sigma_t (expm1(h)/h - 1)`` / ``alpha_t (expm1(-h)/h + 1)``; ``c h phi_3(z)`` is
``-sigma_t ((e^h - 1 - h)/h^2 - 1/2)`` / ``-alpha_t ((e^-h - 1 + h)/h^2 - 1/2)``. All
coefficients are computed in float64 (with a power series for small ``|z|``) and cast to the
dtype of ``x``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..process import Process
from .base import BoundModel, Solver, check_lower_order_final, coef, final_order_cap, register

__all__ = ["phi", "ExpFrame", "DPMSolver", "DPMSolverMultistep"]

LU_2022 = (
    "Lu, Zhou, Bao, Chen, Li & Zhu, DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic "
    "Model Sampling in Around 10 Steps, NeurIPS 2022"
)
LU_2022_PP = (
    "Lu, Zhou, Bao, Chen, Li & Zhu, DPM-Solver++: Fast Solver for Guided Sampling of "
    "Diffusion Probabilistic Models, arXiv:2211.01095, 2022"
)
PREDICTIONS = ("data", "noise")
THIRD_ORDER_VARIANTS = ("standard", "taylor")
_SERIES_BELOW = 0.05  # |z| below which phi_k uses its power series (no cancellation)


def phi(k: int, z: Tensor | float) -> Tensor:
    """``phi_k(z) = sum_{j>=0} z^j / (j + k)!`` in float64 (``phi_1(z) = expm1(z) / z``).

    Example:
        >>> import math
        >>> abs(float(phi(1, 1.0)) - (math.e - 1)) < 1e-15
        True
    """
    if k < 1:
        raise ValueError(f"phi_k is defined for k >= 1, got k={k}")
    if not isinstance(z, Tensor) or z.ndim == 0:  # solver steps: plain float arithmetic
        return torch.tensor(_phi_float(k, float(z)), dtype=torch.float64)
    z = torch.as_tensor(z, dtype=torch.float64)
    if float(z.abs().max()) < _SERIES_BELOW:
        out = torch.zeros_like(z)
        for j in reversed(range(14)):  # Horner; the next term is below 0.05^14 / 14!
            out = out * z + 1.0 / math.factorial(j + k)
        return out
    out = torch.expm1(z) / z
    for j in range(1, k):
        out = (out - 1.0 / math.factorial(j)) / z
    return out


_INV_FACTORIAL = [1.0 / math.factorial(j) for j in range(20)]


def _phi_float(k: int, z: float) -> float:
    """:func:`phi` on a Python float."""
    if abs(z) < _SERIES_BELOW:
        out = 0.0
        for j in reversed(range(14)):
            out = out * z + _INV_FACTORIAL[j + k]
        return out
    out = math.expm1(z) / z
    for j in range(1, k):
        out = (out - _INV_FACTORIAL[j]) / z
    return out


class ExpFrame:
    """The exponential-integrator quantities of one step ``s -> t`` (float64 scalars).

    ``x_t = ratio * x_s + sum_k weight(k) * D_{k-1}`` with ``weight(k) = c h phi_k(z)``
    (see the module docstring); ``h = lambda_t - lambda_s``.
    """

    def __init__(self, process: Process, s: Tensor, t: Tensor, prediction: str) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        f64 = torch.float64
        self.lam_s = process.lam(s).to(f64)
        self.lam_t = process.lam(t).to(f64)
        self.h = self.lam_t - self.lam_s
        self.alpha_t = process.alpha(t).to(f64)
        self.sigma_t = process.sigma(t).to(f64)
        if prediction == "data":
            self.ratio = self.sigma_t / process.sigma(s).to(f64)
            self.c, self.z = self.alpha_t, -self.h
        else:
            self.ratio = self.alpha_t / process.alpha(s).to(f64)
            self.c, self.z = -self.sigma_t, self.h

    def weight(self, k: int) -> Tensor:
        """``c h phi_k(z)``: the coefficient of the k-th Taylor term (float64)."""
        return self.c * self.h * phi(k, self.z)


class _ExpSolver(Solver):
    """Shared parts: the model output in the solver's prediction, and the frame."""

    prediction = "noise"
    natural_grid = "logsnr"

    def _correct(self, x0: Tensor) -> Tensor:
        """Hook applied to every x0 estimate (thresholding in DPM-Solver++)."""
        return x0

    def _out(self, model: BoundModel, x: Tensor, t: Tensor) -> Tensor:
        x0 = self._correct(model(x, t))
        if self.prediction == "data":
            return x0
        return model.eps(x, t, x0)

    def _frame(self, model: BoundModel, s: Tensor, t: Tensor) -> ExpFrame:
        return ExpFrame(model.process, s, t, self.prediction)


class _Singlestep(_ExpSolver):
    """Singlestep DPM-Solver-k (``solver_type="dpmsolver"`` of the official code).

    Intermediate times ``s_i = t(lambda_s + r_i h)``; ``m`` is the model output in the
    solver's prediction and ``F_{a->b}`` the frame of a sub-step:

    * order 1: ``x_t = ratio x + w1 m(x, s)`` (DDIM);
    * order 2: ``u = F_{s->s1}`` order-1 step, ``x_t = ratio x + w1 m_s + w1 / (2 r1) (m_s1 - m_s)``;
    * order 3: ``u1`` as above; ``u2 = ratio_2 x + w1_2 m_s + (r2 / r1) w2_2 (m_s1 - m_s)``;
      ``x_t = ratio x + w1 m_s + (1 / r2) w2 (m_s2 - m_s)``.
    """

    def __init__(self, order: int = 2, r1: float | None = None, r2: float | None = None) -> None:
        if order not in (1, 2, 3):
            raise ValueError(f"singlestep DPM-Solver has order 1, 2 or 3; got order={order}")
        r1 = {1: 0.5, 2: 0.5, 3: 1.0 / 3.0}[order] if r1 is None else float(r1)
        r2 = 2.0 / 3.0 if r2 is None else float(r2)
        if not 0.0 < r1 <= 1.0:
            raise ValueError(f"r1 must lie in (0, 1], got {r1}")
        if order == 3 and not r1 < r2 < 1.0:
            raise ValueError(f"order 3 needs r1 < r2 < 1, got r1={r1}, r2={r2}")
        self.order = order  # type: ignore[misc]
        self.evals_per_step = order  # type: ignore[misc]
        self.r1 = r1 if order >= 2 else None
        self.r2 = r2 if order == 3 else None

    def _sub_time(self, model: BoundModel, frame: ExpFrame, r: float) -> Tensor:
        return model.process.t_of_lambda(frame.lam_s + r * frame.h)

    def step(
        self, model: BoundModel, x: Tensor, t: Tensor, t_next: Tensor, state: dict[str, Any]
    ) -> tuple[Tensor, dict[str, Any]]:
        m0 = self._out(model, x, t)
        f = self._frame(model, t, t_next)
        base = coef(f.ratio, x) * x + coef(f.weight(1), x) * m0
        if self.order == 1:
            return base, state
        r1 = self.r1
        s1 = self._sub_time(model, f, r1)
        f1 = self._frame(model, t, s1)
        u1 = coef(f1.ratio, x) * x + coef(f1.weight(1), x) * m0
        m1 = self._out(model, u1, s1)
        if self.order == 2:
            return base + coef(f.weight(1) / (2 * r1), x) * (m1 - m0), state
        r2 = self.r2
        s2 = self._sub_time(model, f, r2)
        f2 = self._frame(model, t, s2)
        u2 = (
            coef(f2.ratio, x) * x
            + coef(f2.weight(1), x) * m0
            + coef(f2.weight(2) * (r2 / r1), x) * (m1 - m0)
        )
        m2 = self._out(model, u2, s2)
        return base + coef(f.weight(2) / r2, x) * (m2 - m0), state


@register("dpm_solver_1", order=1)
@register("dpm_solver_2s", order=2, r1=0.5)
@register("dpm_solver_3s", order=3, r1=1.0 / 3.0, r2=2.0 / 3.0)
class DPMSolver(_Singlestep):
    """Singlestep DPM-Solver-1/2/3 in noise prediction (Lu et al., NeurIPS 2022, Alg. 1-2).

    With ``h = lambda_t - lambda_s``, ``eps_s = eps(x_s, s)`` and ``s_i = t(lambda_s + r_i h)``:

    * DPM-Solver-1 (= DDIM): ``x_t = (alpha_t/alpha_s) x_s - sigma_t expm1(h) eps_s``.
    * DPM-Solver-2 (``r1 = 1/2``): ``u = (alpha_s1/alpha_s) x_s - sigma_s1 expm1(r1 h) eps_s``;
      ``x_t = (alpha_t/alpha_s) x_s - sigma_t expm1(h) eps_s
      - sigma_t / (2 r1) expm1(h) (eps(u, s1) - eps_s)``.
    * DPM-Solver-3 (``r1 = 1/3, r2 = 2/3``): ``u1`` as above, ``D1 = eps(u1, s1) - eps_s``;
      ``u2 = (alpha_s2/alpha_s) x_s - sigma_s2 expm1(r2 h) eps_s
      - (r2/r1) sigma_s2 (expm1(r2 h)/(r2 h) - 1) D1``;
      ``x_t = (alpha_t/alpha_s) x_s - sigma_t expm1(h) eps_s
      - (1/r2) sigma_t (expm1(h)/h - 1) (eps(u2, s2) - eps_s)``.

    Orders 1/2/3 with 1/2/3 model evaluations per step. The model gives x0; the noise
    prediction is ``eps = (x - alpha x0) / sigma``.

    Paper defaults: DPM-Solver-3 (singlestep, order 3) for unconditional sampling, uniform
    logSNR steps for low-resolution images and time-uniform (or time-quadratic) steps for
    high resolution; for guided sampling the DPM-Solver++ paper recommends the multistep
    second-order data-prediction solver (``dpmpp_2m``).

    Example:
        >>> from diffusolve.solvers import get_solver
        >>> get_solver("dpm_solver_3s").evals_per_step
        3
    """

    citation = LU_2022
    prediction = "noise"


class _Multistep(_ExpSolver):
    """Multistep DPM-Solver(++): one model evaluation per step, history in ``state["hist"]``.

    The option ``order`` (stored as ``steps``) is the official code's order: how many past
    outputs the update combines. ``state["hist"]`` holds ``(lambda_i, m_i)`` of the last
    ``steps`` grid points (newest last). The update at step ``i`` combines
    ``min(steps, i + 1)`` of them (warm-up); with ``lower_order_final`` the order is
    capped near the end by diffusers' rule (:func:`~diffusolve.solvers.base.final_order_cap`; ``"grid"`` counts grid steps only). The class variable ``order`` is the global convergence order: 3 for the
    3-step update with the Taylor weight (default), 2 with ``third_order="standard"``
    (see :meth:`_update`).
    """

    multistep = True

    def __init__(
        self, order: int = 2, lower_order_final: bool | str = False, third_order: str = "taylor"
    ) -> None:
        if order not in (1, 2, 3):
            raise ValueError(f"multistep DPM-Solver has order 1, 2 or 3; got order={order}")
        if third_order not in THIRD_ORDER_VARIANTS:
            raise ValueError(
                f"third_order must be one of {THIRD_ORDER_VARIANTS}, got {third_order!r}"
            )
        #: the paper's/official code's "order": how many stored outputs the update combines
        self.steps = order
        # the global convergence order; the standard 3-step update is only second order
        # (see _update), so it is declared as such
        self.order = 2 if (order == 3 and third_order == "standard") else order  # type: ignore[misc]
        self.lower_order_final = check_lower_order_final(lower_order_final)
        self.third_order = third_order

    def init(self, model: BoundModel, x: Tensor, grid: Tensor) -> dict[str, Any]:
        state = super().init(model, x, grid)
        state["hist"] = []
        return state

    def options(self) -> dict[str, Any]:
        """Constructor options (``order`` is the number of combined outputs, ``steps``)."""
        opts = super().options()
        opts["order"] = opts.pop("steps")
        return opts

    def order_at(self, state: dict[str, Any], n_hist: int) -> int:
        """The order of the current step with ``n_hist`` stored outputs (incl. current)."""
        k = min(self.steps, n_hist)
        if self.lower_order_final:
            k = min(k, final_order_cap(state, self.lower_order_final))
        return k

    def step(
        self, model: BoundModel, x: Tensor, t: Tensor, t_next: Tensor, state: dict[str, Any]
    ) -> tuple[Tensor, dict[str, Any]]:
        m0 = self._out(model, x, t)
        lam = model.process.lam(t).to(torch.float64)
        hist = (list(state.get("hist", [])) + [(lam, m0)])[-self.steps :]
        k = self.order_at(state, len(hist))
        x_next = self._update(model, x, t, t_next, hist, k, state)
        return x_next, {**state, "hist": hist}

    def _update(
        self,
        model: BoundModel,
        x: Tensor,
        t: Tensor,
        t_next: Tensor,
        hist: list[tuple[Tensor, Tensor]],
        k: int,
        state: dict[str, Any],
    ) -> Tensor:
        """Order-``k`` multistep update from the newest ``k`` outputs in ``hist``.

        With ``h = lambda_t - lambda_s0``, ``h_0 = lambda_s0 - lambda_s1``,
        ``h_1 = lambda_s1 - lambda_s2``, ``r0 = h_0 / h``, ``r1 = h_1 / h``:

        * k = 1: ``x_t = ratio x + w1 m0``;
        * k = 2 (midpoint form): ``D1 = (m0 - m1) / r0``; ``x_t = ratio x + w1 (m0 + D1 / 2)``;
        * k = 3: ``D1_0 = (m0 - m1) / r0``, ``D1_1 = (m1 - m2) / r1``,
          ``D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1)``, ``D2 = (D1_0 - D1_1) / (r0 + r1)``;
          ``x_t = ratio x + w1 m0 + w2 D1 + w3 D2`` with ``w3 = c h phi_3(z)`` (``"standard"``,
          the official code and diffusers) or ``w3 = 2 c h phi_3(z)`` (``"taylor"``).

        ``D2`` estimates ``h^2 m'' / 2`` while the exact Taylor term is ``c h^3 phi_3(z) m''``,
        so only the ``"taylor"`` weight makes the local error O(h^4); the ``"standard"``
        update has local error O(h^3), i.e. global order 2 (measured in the tests).
        """
        f = self._frame(model, t, t_next)
        lam0, m0 = hist[-1]
        out = coef(f.ratio, x) * x + coef(f.weight(1), x) * m0
        if k == 1:
            return out
        lam1, m1 = hist[-2]
        r0 = (lam0 - lam1) / f.h
        d1_0 = coef(1.0 / r0, x) * (m0 - m1)
        if k == 2:
            return out + coef(0.5 * f.weight(1), x) * d1_0
        lam2, m2 = hist[-3]
        r1 = (lam1 - lam2) / f.h
        d1_1 = coef(1.0 / r1, x) * (m1 - m2)
        d1 = d1_0 + coef(r0 / (r0 + r1), x) * (d1_0 - d1_1)
        d2 = coef(1.0 / (r0 + r1), x) * (d1_0 - d1_1)
        w3 = f.weight(3) if self.third_order == "standard" else 2.0 * f.weight(3)
        return out + coef(f.weight(2), x) * d1 + coef(w3, x) * d2


@register("dpm_solver_2m", order=2)
@register("dpm_solver_3m", order=3)
class DPMSolverMultistep(_Multistep):
    """Multistep DPM-Solver-2/3 in noise prediction (Lu et al. 2022, DPM-Solver++ paper,
    Appendix; the official code's ``algorithm_type="dpmsolver"``, ``method="multistep"``).

    With ``h = lambda_t - lambda_s0``, ``r0 = h_0 / h``, ``r1 = h_1 / h`` (actual step ratios,
    so non-uniform grids are handled) and ``eps_i`` the stored noise predictions:

    * 2M (midpoint): ``x_t = (alpha_t/alpha_s0) x - sigma_t expm1(h) (eps_0 + D1 / 2)``,
      ``D1 = (eps_0 - eps_1) / r0``;
    * 3M: ``x_t = (alpha_t/alpha_s0) x - sigma_t expm1(h) eps_0 - sigma_t (expm1(h)/h - 1) D1
      - sigma_t ((e^h - 1 - h)/h^2 - 1/2) D2`` with ``D1, D2`` as in the official code
      (see :meth:`_update`).

    The first steps warm up with lower orders from the available history. Options:
    ``lower_order_final`` (default False; diffusers' rule, see
    :func:`~diffusolve.solvers.base.final_order_cap`); ``third_order``
    (``"taylor"``, default: the exact Taylor weight of ``D2``, third order,
    ``order == 3``; ``"standard"``: the official/diffusers 3M, which is globally only
    second order because its ``D2`` weight is half the Taylor one, so it declares
    ``order == 2``).

    Paper defaults: the DPM-Solver++ paper recommends multistep order 2 (in data prediction,
    ``dpmpp_2m``) for guided sampling and order 3 for unconditional sampling; uniform logSNR
    steps for low resolution, time-uniform for high resolution.

    Example:
        >>> from diffusolve.solvers import get_solver
        >>> s = get_solver("dpm_solver_3m")
        >>> (s.steps, s.order, get_solver("dpm_solver_3m", third_order="standard").order)
        (3, 3, 2)
    """

    citation = LU_2022 + "; " + LU_2022_PP
    prediction = "noise"
