"""The forward-operator contract of inverse problems ``y = A(x) + noise``.

An :class:`Operator` maps a batch ``x`` of shape ``[B, *in_shape]`` to ``[B, *out_shape]``
(batch first; dtype and device follow the input; its own buffers are float64 on the CPU and
are cast on use). What it can give is declared, so a posterior sampler can ask before it
runs (:meth:`Operator.require`):

* ``linear``: ``At`` (the adjoint), ``prox`` (closed form with an SVD, else conjugate
  gradients), ``lstsq`` (minimum-norm least squares by conjugate gradients), ``matrix``.
* ``svd``: a matrix-free singular value decomposition (:class:`SVD`).
* ``pinv``: a cheap Moore-Penrose pseudo-inverse (every operator with an SVD has one).
* ``grad``: gradients through ``A`` by autograd (every operator here).

**Inner products and complex measurements.** Everything is real: ``x`` is real and a
complex measurement ``y`` (single-coil MRI) is an element of ``R^(2m)`` through its real and
imaginary parts, with ``<u, v> = Re sum conj(u) v``. So ``At`` is the adjoint for that inner
product, ``||y||^2 = sum |y|^2``, and :meth:`Operator.flatten_y` (``torch.view_as_real``,
C order) gives the coordinates that :meth:`Operator.matrix` uses for its rows.

**Prox convention.** ``prox(z, y, gamma) = argmin_x ||A x - y||^2 / 2 + ||x - z||^2 / (2 gamma)
= (I + gamma A^T A)^(-1) (z + gamma A^T y)``, with ``gamma > 0`` a float or one value per
sample (``[B]``). For the data term ``||A x - y||^2 / (2 sigma_y^2)`` with step ``g`` pass
``gamma = g / sigma_y^2``; DiffPIR's ``argmin ||y - A x||^2 + rho ||x - z||^2`` is
``gamma = 1 / rho``.

**SVD convention** (:class:`SVD`). ``A = U diag(s) V_r^T`` with ``s`` the ``r`` nonzero
singular values (in no particular order), ``V`` a full orthogonal basis of the input space
whose first ``r`` columns ``V_r`` are the right singular vectors (the other ``n - r`` span
the null space), and ``U`` the ``m x r`` matrix of left singular vectors (orthonormal
columns; it is a full basis of the output space only when ``r = m``). All four maps are
matrix free.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .linalg import batched_cg, per_sample

__all__ = [
    "CAPABILITIES",
    "OPERATORS",
    "SVD",
    "Operator",
    "Composed",
    "compose",
    "declare_needs",
    "make",
    "register",
]

#: what an operator can give; a posterior sampler declares the ones it needs
CAPABILITIES = ("linear", "svd", "pinv", "prox", "grad")

_WHAT = {
    "linear": "a linear operator (with an adjoint At)",
    "svd": "an SVD",
    "pinv": "a cheap pseudo-inverse",
    "prox": "a prox of the Gaussian data term",
    "grad": "gradients through A",
}
_NEEDED_BY: dict[str, set[str]] = {c: set() for c in CAPABILITIES}

#: registered operator classes, by name
OPERATORS: dict[str, type[Operator]] = {}


def declare_needs(method: str, needs: Iterable[str]) -> tuple[str, ...]:
    """Record that ``method`` (a posterior sampler) needs ``needs`` from its operator.

    The record makes the errors of operators that lack a capability name the methods that
    need it. Returns the needs as a tuple (for a class variable).

    Example:
        >>> from diffusolve.inverse import declare_needs
        >>> declare_needs("my-method", ["linear", "svd"])
        ('linear', 'svd')
    """
    needs = tuple(needs)
    unknown = [n for n in needs if n not in _NEEDED_BY]
    if unknown:
        raise ValueError(f"unknown capability {unknown[0]!r}; choose from {CAPABILITIES}")
    for n in needs:
        _NEEDED_BY[n].add(method)
    return needs


def _missing(op: Operator, what: str, method: str | None = None) -> NotImplementedError:
    """The error for an operator that cannot give ``what`` (a capability name)."""
    users = sorted(_NEEDED_BY.get(what, ()))
    who = f"{method} needs {_WHAT[what]}, and " if method else ""
    name = "adjoint" if what == "linear" else what
    if op.linear:
        msg = f"{who}{op.describe()} has no {name}"
    else:
        msg = f"{who}{op.describe()} is nonlinear, so it has no {name} (A only, with autograd)"
    have = sorted(op.capabilities)
    msg += f" (it has: {', '.join(have) if have else 'nothing'})"
    if users:
        msg += f"; methods that need {_WHAT[what]}: {', '.join(users)}"
    if what == "pinv" and op.linear:
        msg += "; op.lstsq(y) computes it by conjugate gradients"
    others = sorted(n for n, c in OPERATORS.items() if c.declares(what))
    if others:
        msg += f"; registered operators with it: {', '.join(others)}"
    return NotImplementedError(msg)


@dataclass(frozen=True)
class SVD:
    """Matrix-free SVD ``A = U diag(s) V_r^T`` (see the module docstring).

    Attributes:
        s: ``[r]`` positive singular values (float64, CPU; :meth:`s_like` casts them).
        V: spectral ``[B, n]`` -> image ``[B, *in_shape]`` (orthogonal, ``n = dim_in``).
        Vt: image -> spectral ``[B, n]``; its first ``r`` entries are the ones ``A`` sees.
        U: ``[B, r]`` -> measurement ``[B, *out_shape]`` (orthonormal columns).
        Ut: measurement -> ``[B, r]``.
    """

    s: Tensor
    V: Callable[[Tensor], Tensor]
    Vt: Callable[[Tensor], Tensor]
    U: Callable[[Tensor], Tensor]
    Ut: Callable[[Tensor], Tensor]
    dim_in: int
    dim_out: int

    @property
    def rank(self) -> int:
        return int(self.s.numel())

    def s_like(self, x: Tensor) -> Tensor:
        """The singular values in the real dtype and on the device of ``x``."""
        return self.s.to(device=x.device, dtype=_real_dtype(x.dtype))


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.empty((), dtype=dtype).real.dtype if dtype.is_complex else dtype


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if _real_dtype(dtype) == torch.float64 else torch.complex64


class Operator:
    """Base class of forward operators (see the module docstring for the conventions).

    Subclasses set ``in_shape``/``out_shape`` (per sample, no batch dimension), implement
    ``_A`` (and ``_At`` when linear), and, when they have an SVD, ``_spectrum``. Class
    attributes declare capabilities; an instance may override them (a composition is linear
    only when both parts are).

    Example:
        >>> import torch
        >>> from diffusolve.inverse import Inpainting, Blur, gaussian_kernel
        >>> blur = Blur(gaussian_kernel(1.0, size=5), (1, 8, 8))
        >>> mask = torch.zeros(8, 8); mask[:, :4] = 1
        >>> op = Inpainting(mask, (1, 8, 8)) @ blur  # blur, then keep the left half
        >>> op.linear, op.has_svd, blur.has_svd
        (True, False, True)
        >>> x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
        >>> z = torch.zeros_like(x)
        >>> p = op.prox(z, op(x), 0.5)  # (I + 0.5 A^T A) p = 0.5 A^T y
        >>> torch.allclose(p + 0.5 * op.normal(p), 0.5 * op.At(op(x)), atol=1e-9)
        True
    """

    name: str = "operator"
    linear: bool = True
    has_svd: bool = False
    has_pinv: bool = False
    complex_output: bool = False
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    # ------------------------------------------------------------ to implement
    def _A(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _At(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise _missing(self, "linear")

    def _spectrum(self) -> tuple[Tensor, Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
        """``(s_nat, to_coef, from_coef)``: an orthogonal basis ``W`` of the input space in
        which ``A^T A = W diag(s_nat^2) W^T``; ``to_coef(x) = W^T x`` (``[B, n]``) and
        ``from_coef(c) = W c``. The base class builds the :class:`SVD` from it."""
        raise _missing(self, "svd")

    @classmethod
    def example(cls) -> Operator:  # pragma: no cover - abstract
        """A small float64 instance for the registry-wide tests."""
        raise NotImplementedError(f"{cls.__name__} has no example instance")

    @classmethod
    def examples(cls) -> list[Operator]:
        """Small float64 instances covering the variants of the class (default: one)."""
        return [cls.example()]

    # ------------------------------------------------------------ capabilities
    @classmethod
    def declares(cls, what: str) -> bool:
        """Whether instances of the class declare capability ``what`` by default."""
        if what == "grad":
            return True
        if what == "prox":
            return bool(cls.linear)
        return bool(getattr(cls, {"linear": "linear", "svd": "has_svd", "pinv": "has_pinv"}[what]))

    @property
    def capabilities(self) -> frozenset[str]:
        """What this operator can give (a subset of :data:`CAPABILITIES`)."""
        caps = {"grad"}
        if self.linear:
            caps |= {"linear", "prox"}
        if self.has_svd:
            caps.add("svd")
        if self.has_pinv:
            caps.add("pinv")
        return frozenset(caps)

    def require(self, *needs: str, method: str | None = None) -> None:
        """Raise ``NotImplementedError`` naming what is missing if ``needs`` are not met.

        Example:
            >>> from diffusolve.inverse import PhaseRetrieval
            >>> PhaseRetrieval((1, 4, 4)).require("linear", method="DDRM")
            Traceback (most recent call last):
            ...
            NotImplementedError: DDRM needs a linear operator (with an adjoint At), and ...
        """
        for n in needs:
            if n not in CAPABILITIES:
                raise ValueError(f"unknown capability {n!r}; choose from {CAPABILITIES}")
            if n not in self.capabilities:
                raise _missing(self, n, method)

    # ------------------------------------------------------------ shapes
    @property
    def dim_in(self) -> int:
        """``prod(in_shape)``."""
        return math.prod(self.in_shape)

    @property
    def dim_out(self) -> int:
        """Real dimension of a measurement (twice ``prod(out_shape)`` for complex ones)."""
        return math.prod(self.out_shape) * (2 if self.complex_output else 1)

    def _check(self, t: Tensor, shape: tuple[int, ...], what: str) -> None:
        if not isinstance(t, Tensor):
            raise TypeError(f"{self.describe()}: {what} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape[1:]) != tuple(shape) or t.ndim != len(shape) + 1:
            want = ", ".join(map(str, shape))
            raise ValueError(
                f"{self.describe()} expects {what} of shape [B, {want}] (batch first); "
                f"got {tuple(t.shape)}"
            )

    def flatten_y(self, y: Tensor) -> Tensor:
        """Real coordinates ``[B, dim_out]`` of a measurement (``view_as_real`` if complex)."""
        self._check(y, self.out_shape, "y")
        if y.is_complex():
            y = torch.view_as_real(y)
        return y.reshape(y.shape[0], -1)

    def unflatten_y(self, v: Tensor) -> Tensor:
        """Inverse of :meth:`flatten_y`."""
        if self.complex_output:
            return torch.view_as_complex(v.reshape(v.shape[0], *self.out_shape, 2).contiguous())
        return v.reshape(v.shape[0], *self.out_shape)

    # ------------------------------------------------------------ buffers
    def _buf(self, t: Tensor, like: Tensor, complex: bool = False) -> Tensor:
        """``t`` cast to the (real, or complex) dtype and the device of ``like`` (cached)."""
        dtype = _complex_dtype(like.dtype) if complex else _real_dtype(like.dtype)
        if t.dtype == dtype and t.device == like.device:
            return t
        cache = self.__dict__.setdefault("_cast_cache", {})
        key = (id(t), dtype, like.device)
        hit = cache.get(key)
        if hit is None or hit[0] is not t:
            hit = (t, t.to(device=like.device, dtype=dtype))
            cache[key] = hit
        return hit[1]

    def _dev(self, t: Tensor, like: Tensor) -> Tensor:
        """An index tensor ``t`` on the device of ``like`` (cached)."""
        if t.device == like.device:
            return t
        cache = self.__dict__.setdefault("_cast_cache", {})
        key = (id(t), t.dtype, like.device)
        hit = cache.get(key)
        if hit is None or hit[0] is not t:
            hit = (t, t.to(device=like.device))
            cache[key] = hit
        return hit[1]

    # ------------------------------------------------------------ the maps
    def A(self, x: Tensor) -> Tensor:
        """The forward map ``[B, *in_shape] -> [B, *out_shape]``."""
        self._check(x, self.in_shape, "x")
        return self._A(x)

    def __call__(self, x: Tensor) -> Tensor:
        return self.A(x)

    def At(self, y: Tensor) -> Tensor:
        """The adjoint ``[B, *out_shape] -> [B, *in_shape]`` (real inner products)."""
        if not self.linear:
            raise _missing(self, "linear")
        self._check(y, self.out_shape, "y")
        return self._At(y)

    def normal(self, x: Tensor) -> Tensor:
        """``A^T A x``."""
        return self.At(self.A(x))

    def vjp(self, x: Tensor, v: Tensor) -> Tensor:
        """``J_A(x)^T v``: ``At(v)`` when linear, else by autograd (no graph kept)."""
        if self.linear:
            return self.At(v)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.A(xg), xg, v)
        return g

    # ------------------------------------------------------------ linear algebra
    def svd(self) -> SVD:
        """The matrix-free :class:`SVD` (computed once)."""
        if not self.has_svd:
            raise _missing(self, "svd")
        cached = self.__dict__.get("_svd")
        if cached is None:
            cached = _svd_from_spectrum(self, *self._spectrum())
            self.__dict__["_svd"] = cached
        return cached

    def pinv(self, y: Tensor) -> Tensor:
        """Moore-Penrose pseudo-inverse ``A^+ y`` (from the SVD unless overridden)."""
        if not self.has_pinv:
            raise _missing(self, "pinv")
        self._check(y, self.out_shape, "y")
        svd = self.svd()
        c = svd.Ut(y) / svd.s_like(y)
        return svd.V(_pad(c, svd.dim_in))

    def prox(
        self,
        z: Tensor,
        y: Tensor,
        gamma: float | Tensor,
        *,
        tol: float | None = None,
        max_iter: int = 500,
    ) -> Tensor:
        """``argmin_x ||A x - y||^2 / 2 + ||x - z||^2 / (2 gamma)`` (per sample ``gamma``).

        Closed form in the SVD basis when there is one, else conjugate gradients on
        ``(I + gamma A^T A) x = z + gamma A^T y`` started at ``z`` (``tol`` relative to the
        right-hand side, default ``1e-10`` in float64 and ``1e-5`` in float32; each sample
        stops on its own residual, so a batch never changes a sample's result).
        """
        if not self.linear:
            raise _missing(self, "prox")
        self._check(z, self.in_shape, "z")
        self._check(y, self.out_shape, "y")
        g = per_sample(gamma, z)
        if torch.any(g <= 0):
            raise ValueError("prox: gamma must be positive")
        if self.has_svd:
            svd = self.svd()
            s = svd.s_like(z)
            c = svd.Vt(z)
            gr = g.reshape(-1, 1)
            head = (c[:, : svd.rank] + gr * s * svd.Ut(y)) / (1 + gr * s * s)
            return svd.V(torch.cat([head, c[:, svd.rank :]], 1))
        b = z + g * self.At(y)
        return batched_cg(lambda v: v + g * self.normal(v), b, z, tol=tol, max_iter=max_iter)

    def lstsq(self, y: Tensor, *, tol: float | None = None, max_iter: int = 500) -> Tensor:
        """Minimum-norm least-squares solution of ``A x = y`` by conjugate gradients on the
        normal equations from ``x = 0`` (equals :meth:`pinv` when it converges; use it for
        operators with no cheap pseudo-inverse)."""
        if not self.linear:
            raise _missing(self, "linear")
        b = self.At(y)
        return batched_cg(self.normal, b, torch.zeros_like(b), tol=tol, max_iter=max_iter)

    def matrix(self, *, max_dim: int = 1 << 14) -> Tensor:
        """Dense float64 matrix ``[dim_out, dim_in]`` of a linear operator (small inputs only).

        Column ``j`` is ``flatten_y(A(e_j))`` with ``e_j`` the ``j``-th C-order basis image.
        """
        if not self.linear:
            raise _missing(self, "linear")
        if self.dim_in > max_dim:
            raise ValueError(
                f"{self.describe()}: refusing to build a dense matrix with {self.dim_in} "
                f"columns (max_dim={max_dim}); use A/At matrix-free"
            )
        eye = torch.eye(self.dim_in, dtype=torch.float64).reshape(self.dim_in, *self.in_shape)
        return self.flatten_y(self.A(eye)).T.contiguous()

    def norm(self, *, iters: int = 100, seed: int = 0) -> float:
        """Spectral norm ``||A||_2`` (largest singular value; power iteration without SVD)."""
        if self.has_svd:
            return float(self.svd().s.max())
        if not self.linear:
            raise _missing(self, "linear")
        g = torch.Generator().manual_seed(seed)
        v = torch.randn((1, *self.in_shape), generator=g, dtype=torch.float64)
        lam = 0.0
        for _ in range(iters):
            v = v / v.norm()
            w = self.normal(v)
            lam = float((v * w).sum())
            v = w
        return math.sqrt(max(lam, 0.0))

    # ------------------------------------------------------------ composition
    def __matmul__(self, other: Any) -> Operator:
        if isinstance(other, Operator):
            return Composed(self, other)
        if isinstance(other, Tensor):
            raise TypeError("apply an operator with op(x) or op.A(x); `@` composes operators")
        return NotImplemented

    def describe(self) -> str:
        """Short description for error messages."""
        return f"{type(self).__name__}({', '.join(map(str, self.in_shape))} -> {', '.join(map(str, self.out_shape))})"

    def __repr__(self) -> str:
        return self.describe()


def _pad(c: Tensor, n: int) -> Tensor:
    """Zero-pad spectral coefficients ``[B, r]`` to ``[B, n]``."""
    if c.shape[1] == n:
        return c
    return torch.cat([c, c.new_zeros(c.shape[0], n - c.shape[1])], 1)


def _svd_from_spectrum(
    op: Operator,
    s_nat: Tensor,
    to_coef: Callable[[Tensor], Tensor],
    from_coef: Callable[[Tensor], Tensor],
) -> SVD:
    """Build the :class:`SVD` from an orthogonal basis ``W`` diagonalising ``A^T A``.

    The nonzero entries of ``s_nat`` (above ``max(s) * max(m, n) * eps``, the usual numerical
    rank threshold) come first in ``V``; ``U = A V_r diag(1/s)`` and
    ``U^T = diag(1/s) V_r^T A^T`` are applied through ``A`` and ``At``.
    """
    s_nat = s_nat.to(torch.float64).flatten()
    n = op.dim_in
    if s_nat.numel() != n:
        raise ValueError(f"{op.describe()}: spectrum has {s_nat.numel()} values, expected {n}")
    smax = float(s_nat.max()) if n else 0.0
    keep = s_nat > smax * max(n, op.dim_out) * torch.finfo(torch.float64).eps
    order = torch.argsort((~keep).to(torch.int8), stable=True)
    inv = torch.argsort(order)
    r = int(keep.sum())
    s = s_nat[order[:r]].clone()
    in_order = bool(torch.equal(order, torch.arange(n)))  # no gather needed

    def Vt(x: Tensor) -> Tensor:
        op._check(x, op.in_shape, "x")
        c = to_coef(x)
        return c if in_order else c[:, op._dev(order, x)]

    def V(c: Tensor) -> Tensor:
        if c.ndim != 2 or c.shape[1] != n:
            raise ValueError(f"V expects coefficients of shape [B, {n}]; got {tuple(c.shape)}")
        return from_coef(c if in_order else c[:, op._dev(inv, c)])

    def U(c: Tensor) -> Tensor:
        if c.ndim != 2 or c.shape[1] != r:
            raise ValueError(f"U expects coefficients of shape [B, {r}]; got {tuple(c.shape)}")
        return op.A(V(_pad(c / op._buf(s, c), n)))

    def Ut(y: Tensor) -> Tensor:
        x = op.At(y)
        return Vt(x)[:, :r] / op._buf(s, x)

    return SVD(s=s, V=V, Vt=Vt, U=U, Ut=Ut, dim_in=n, dim_out=op.dim_out)


class Composed(Operator):
    """``outer @ inner``: ``x -> outer(inner(x))``; linear when both parts are.

    Its adjoint is ``inner.At(outer.At(y))``; its prox uses conjugate gradients (a
    composition has no SVD in general).

    Example:
        >>> from diffusolve.inverse import Identity, SuperResolution
        >>> op = SuperResolution((1, 8, 8), 2) @ Identity((1, 8, 8))
        >>> op.out_shape, op.linear
        ((1, 4, 4), True)
    """

    def __init__(self, outer: Operator, inner: Operator) -> None:
        if tuple(outer.in_shape) != tuple(inner.out_shape) or inner.complex_output:
            raise ValueError(
                f"cannot compose {outer.describe()} after {inner.describe()}: the inner output "
                "must be real and of the outer operator's input shape"
            )
        self.outer, self.inner = outer, inner
        self.in_shape, self.out_shape = tuple(inner.in_shape), tuple(outer.out_shape)
        self.linear = bool(outer.linear and inner.linear)
        self.complex_output = outer.complex_output
        self.name = f"{outer.name}@{inner.name}"

    def _A(self, x: Tensor) -> Tensor:
        return self.outer.A(self.inner.A(x))

    def _At(self, y: Tensor) -> Tensor:
        return self.inner.At(self.outer.At(y))

    def describe(self) -> str:
        return f"({self.outer.describe()} @ {self.inner.describe()})"


def compose(*ops: Operator) -> Operator:
    """``compose(A, B, C) = A @ B @ C`` (``C`` is applied first).

    Example:
        >>> from diffusolve.inverse import Identity, compose
        >>> compose(Identity((2,)), Identity((2,))).in_shape
        (2,)
    """
    if not ops:
        raise ValueError("compose needs at least one operator")
    out = ops[-1]
    for op in reversed(ops[:-1]):
        out = Composed(op, out)
    return out


def register(name: str) -> Callable[[type[Operator]], type[Operator]]:
    """Class decorator: put an operator class in :data:`OPERATORS` under ``name``."""

    def deco(cls: type[Operator]) -> type[Operator]:
        if name in OPERATORS:
            raise ValueError(f"operator name {name!r} is already registered")
        cls.name = name
        OPERATORS[name] = cls
        return cls

    return deco


def make(name: str, *args: Any, **kwargs: Any) -> Operator:
    """Build the registered operator ``name``.

    Example:
        >>> from diffusolve.inverse import make
        >>> make("denoising", (1, 4, 4)).out_shape
        (1, 4, 4)
    """
    if name not in OPERATORS:
        raise KeyError(f"unknown operator {name!r}; registered: {', '.join(sorted(OPERATORS))}")
    return OPERATORS[name](*args, **kwargs)
