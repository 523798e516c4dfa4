"""Forward operators: every registered operator against the mathematics of its contract.

Registry-wide (every example of every class in ``OPERATORS``, float64, small sizes):
adjointness ``<A x, y> = <x, At y>``, the dense matrix, the SVD (orthonormal factors that
rebuild ``A``), the pseudo-inverse against ``torch.linalg.pinv``, the prox against a dense
solve, least squares, dtype following the input, clear errors for what is missing, and
``gradcheck`` for every operator (nonlinear ones rely on it). Then each operator against an
independent computation of what it should be.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusolve.inverse import (
    CT,
    MRI,
    OPERATORS,
    Blur,
    ChannelMix,
    Colourisation,
    CompressedSensing,
    GaussianNoise,
    Identity,
    Inpainting,
    MatrixOperator,
    Operator,
    PhaseRetrieval,
    PoissonNoise,
    SuperResolution,
    ToneCurve,
    bicubic_matrix,
    box_mask,
    compose,
    declare_needs,
    gaussian_kernel,
    make,
    motion_kernel,
    mri_mask,
    random_pixel_mask,
)
from diffusolve.inverse import base as inverse_base

F64 = torch.float64


@pytest.fixture(autouse=True)
def _restore_declared_needs():
    """Tests declare made-up methods: leave the global record as it was."""
    saved = {k: set(v) for k, v in inverse_base._NEEDED_BY.items()}
    yield
    inverse_base._NEEDED_BY.clear()
    inverse_base._NEEDED_BY.update(saved)


def _examples() -> list[tuple[str, Operator]]:
    out = []
    for name, cls in sorted(OPERATORS.items()):
        for i, op in enumerate(cls.examples()):
            out.append((f"{name}[{i}]", op))
    blur = Blur(gaussian_kernel(0.7, size=3), (1, 4, 4))
    out += [
        ("inpaint@blur", Inpainting(box_mask((4, 4), (1, 1, 2, 2)), (1, 4, 4)) @ blur),
        ("sr@blur", compose(SuperResolution((1, 4, 4), 2), blur)),
        ("mri@blur", MRI(mri_mask((4, 4), 2, 0.25), (1, 4, 4)) @ blur),
        ("cs@colour", CompressedSensing((1, 2, 2), 3, seed=2) @ Colourisation((3, 2, 2))),
        ("tone@blur", ToneCurve((1, 4, 4), gain=1.2) @ blur),
        ("blur@phase", Blur(gaussian_kernel(0.7, size=3), (1, 6, 6)) @ PhaseRetrieval((1, 3, 3))),
    ]
    return out


EXAMPLES = _examples()
IDS = [n for n, _ in EXAMPLES]
LINEAR = [(n, op) for n, op in EXAMPLES if op.linear]
LIN_IDS = [n for n, _ in LINEAR]


def _x(op: Operator, b: int = 3, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((b, *op.in_shape), generator=g, dtype=F64).to(dtype)


def _y(op: Operator, b: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return op.unflatten_y(torch.randn(b, op.dim_out, generator=g, dtype=F64))


def _flat(t: torch.Tensor) -> torch.Tensor:
    return (torch.view_as_real(t) if t.is_complex() else t).reshape(t.shape[0], -1)


def test_every_operator_class_is_registered_with_examples() -> None:
    import diffusolve.inverse as inv

    classes = {
        obj
        for obj in vars(inv).values()
        if isinstance(obj, type)
        and issubclass(obj, Operator)
        and obj.__module__ != inv.base.__name__
    }
    abstract = {inv.FourierDiagonal}
    assert classes - abstract <= set(OPERATORS.values())
    expected = {
        "denoising", "inpainting", "super_resolution", "blur", "colourisation",
        "compressed_sensing", "mri", "ct", "phase_retrieval", "tone_curve",
    }  # fmt: skip
    assert expected <= set(OPERATORS)
    assert {n.split("[")[0] for n in IDS} >= set(OPERATORS)


@pytest.mark.parametrize(("name", "op"), LINEAR, ids=LIN_IDS)
def test_adjointness(name: str, op: Operator) -> None:
    x, y = _x(op), _y(op)
    ax, aty = op.A(x), op.At(y)
    assert ax.shape == (3, *op.out_shape) and aty.shape == x.shape
    assert ax.is_complex() == op.complex_output and not aty.is_complex()
    lhs = (_flat(ax) * _flat(y)).sum(1)
    rhs = (x.flatten(1) * aty.flatten(1)).sum(1)
    scale = _flat(ax).norm(dim=1) * _flat(y).norm(dim=1)
    assert torch.all((lhs - rhs).abs() <= 1e-12 * scale), (lhs - rhs).abs() / scale


@pytest.mark.parametrize(("name", "op"), LINEAR, ids=LIN_IDS)
def test_matrix_is_the_operator(name: str, op: Operator) -> None:
    m = op.matrix()
    assert m.shape == (op.dim_out, op.dim_in) and m.dtype == F64
    x = _x(op)
    torch.testing.assert_close(x.flatten(1) @ m.T, _flat(op(x)), rtol=1e-12, atol=1e-12)
    y = _y(op)
    torch.testing.assert_close(_flat(y) @ m, op.At(y).flatten(1), rtol=1e-12, atol=1e-12)


def _dense_factors(op: Operator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    svd = op.svd()
    n, r = op.dim_in, svd.rank
    v = svd.V(torch.eye(n, dtype=F64)).reshape(n, n).T  # columns are V e_i
    u = _flat(svd.U(torch.eye(r, dtype=F64))).T  # [m, r]
    return u, svd.s, v


SVD_OPS = [(n, op) for n, op in EXAMPLES if op.has_svd]


@pytest.mark.parametrize(("name", "op"), SVD_OPS, ids=[n for n, _ in SVD_OPS])
def test_svd_reconstructs_and_is_orthonormal(name: str, op: Operator) -> None:
    u, s, v = _dense_factors(op)
    n, r = op.dim_in, s.numel()
    assert torch.all(s > 0) and r <= min(n, op.dim_out)
    eye = torch.eye
    torch.testing.assert_close(v.T @ v, eye(n, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(u.T @ u, eye(r, dtype=F64), rtol=0, atol=1e-12)
    m = op.matrix()
    torch.testing.assert_close((u * s) @ v[:, :r].T, m, rtol=0, atol=1e-12 * float(s.max()))
    # the rank is the matrix rank, and the trailing columns of V span the null space
    assert r == int(torch.linalg.matrix_rank(m))
    if r < n:
        assert float((m @ v[:, r:]).abs().max()) <= 1e-12 * float(s.max())
    # matrix free: U diag(s) V^T x == A x, Vt and Ut are the transposes
    svd, x, y = op.svd(), _x(op), _y(op)
    torch.testing.assert_close(
        _flat(svd.U(svd.s * svd.Vt(x)[:, :r])), _flat(op(x)), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(svd.Vt(x), x.flatten(1) @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(svd.Ut(y), _flat(y) @ u, rtol=1e-12, atol=1e-12)


PINV_OPS = [(n, op) for n, op in EXAMPLES if op.has_pinv]


@pytest.mark.parametrize(("name", "op"), PINV_OPS, ids=[n for n, _ in PINV_OPS])
def test_pinv(name: str, op: Operator) -> None:
    x, y = _x(op), _y(op)
    ax = op(x)
    torch.testing.assert_close(_flat(op(op.pinv(ax))), _flat(ax), rtol=1e-10, atol=1e-10)
    # the Moore-Penrose pseudo-inverse, not just any right inverse
    expect = _flat(y) @ torch.linalg.pinv(op.matrix()).T
    torch.testing.assert_close(op.pinv(y).flatten(1), expect, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("name", "op"), LINEAR, ids=LIN_IDS)
def test_prox_solves_its_problem(name: str, op: Operator) -> None:
    z, y = _x(op, seed=3), _y(op, seed=4)
    gamma = torch.tensor([0.3, 1.0, 7.0], dtype=F64)  # one per sample
    p = op.prox(z, y, gamma)
    m = op.matrix()
    for i, g in enumerate(gamma.tolist()):
        lhs = torch.eye(op.dim_in, dtype=F64) + g * m.T @ m
        want = torch.linalg.solve(lhs, z[i].flatten() + g * m.T @ _flat(y)[i])
        torch.testing.assert_close(p[i].flatten(), want, rtol=1e-8, atol=1e-8)
    # the gradient of ||A p - y||^2 / 2 + ||p - z||^2 / (2 gamma) vanishes at p
    grad = op.At(op(p) - y) + (p - z) / gamma.reshape(-1, *[1] * len(op.in_shape))
    assert float(grad.abs().max()) < 1e-8
    # a float gamma is the same as the same value for every sample
    torch.testing.assert_close(op.prox(z, y, 1.0)[1], p[1], rtol=1e-9, atol=1e-9)
    # one sample's prox does not depend on its batch (per-sample conjugate gradients)
    torch.testing.assert_close(op.prox(z[2:], y[2:], gamma[2:])[0], p[2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("name", "op"), LINEAR, ids=LIN_IDS)
def test_lstsq_is_the_minimum_norm_solution(name: str, op: Operator) -> None:
    y = _y(op, seed=5)
    want = _flat(y) @ torch.linalg.pinv(op.matrix()).T
    torch.testing.assert_close(op.lstsq(y).flatten(1), want, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize(("name", "op"), EXAMPLES, ids=IDS)
def test_gradcheck(name: str, op: Operator) -> None:
    x = _x(op, b=1, seed=6).requires_grad_(True)
    assert torch.autograd.gradcheck(op.A, (x,), eps=1e-6, atol=1e-7)
    v = _y(op, b=1, seed=7)
    xa = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(op(xa), xa, v)
    torch.testing.assert_close(op.vjp(x.detach(), v), g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("name", "op"), EXAMPLES, ids=IDS)
def test_dtype_follows_the_input(name: str, op: Operator) -> None:
    x64 = _x(op)
    y32 = op(x64.float())
    want = torch.complex64 if op.complex_output else torch.float32
    assert y32.dtype == want and y32.shape == (3, *op.out_shape)
    torch.testing.assert_close(_flat(y32).double(), _flat(op(x64)), rtol=1e-4, atol=1e-4)
    if op.linear:
        assert op.At(y32).dtype == torch.float32
    if op.has_svd:
        svd = op.svd()
        assert svd.Vt(x64.float()).dtype == torch.float32
        assert op.pinv(y32).dtype == torch.float32


@pytest.mark.parametrize(("name", "op"), EXAMPLES, ids=IDS)
def test_missing_capabilities_raise_clear_errors(name: str, op: Operator) -> None:
    declare_needs("TestSVDMethod", ["linear", "svd"])
    if not op.has_svd:
        with pytest.raises(NotImplementedError, match=r"has no svd.*TestSVDMethod"):
            op.svd()
        need = "an SVD" if op.linear else "a linear operator"
        with pytest.raises(NotImplementedError, match=f"TestSVDMethod needs {need}"):
            op.require("linear", "svd", method="TestSVDMethod")
    else:
        op.require("svd", "pinv", method="TestSVDMethod")
    if not op.has_pinv:
        with pytest.raises(NotImplementedError, match="has no pinv"):
            op.pinv(_y(op))
    if not op.linear:
        for call in (lambda: op.At(_y(op)), lambda: op.prox(_x(op), _y(op), 1.0), op.matrix):
            with pytest.raises(NotImplementedError, match="nonlinear"):
                call()
        assert op.capabilities == {"grad"}
    with pytest.raises(ValueError, match=r"expects x of shape \[B, "):
        op(torch.zeros(2, *op.in_shape, 1, dtype=F64))
    with pytest.raises(ValueError, match="unknown capability"):
        op.require("fast")


def test_declared_needs_are_named_in_errors() -> None:
    inverse_base._NEEDED_BY["svd"].discard("TestSVDMethod")
    declare_needs("MyDDRM", ["linear", "svd"])
    try:
        with pytest.raises(NotImplementedError) as err:
            CT((1, 4, 4), 3).svd()
        msg = str(err.value)
        assert (
            "has no svd" in msg
            and "MyDDRM" in msg
            and "blur" in msg
            and "ct" not in msg.split("registered operators with it:")[1].split(", ")
        )
    finally:
        inverse_base._NEEDED_BY["svd"].discard("MyDDRM")
        inverse_base._NEEDED_BY["linear"].discard("MyDDRM")


def test_make_and_compose_errors() -> None:
    assert isinstance(make("blur", gaussian_kernel(1.0, 3), (1, 4, 4)), Blur)
    with pytest.raises(KeyError, match="registered"):
        make("deblur")
    with pytest.raises(ValueError, match="cannot compose"):
        Identity((1, 4, 4)) @ SuperResolution((1, 4, 4), 2)
    with pytest.raises(ValueError, match="cannot compose"):
        Identity((1, 4, 4)) @ MRI(mri_mask((4, 4), 2), (1, 4, 4))
    with pytest.raises(TypeError, match="op\\(x\\)"):
        Identity((2,)) @ torch.zeros(1, 2)  # noqa: B018
    blur = Blur(gaussian_kernel(1.0, 3), (1, 4, 4))
    with pytest.raises(ValueError, match="gamma must be positive"):
        blur.prox(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), -1.0)


def test_norm() -> None:
    for op in (Blur(motion_kernel(3, 10), (1, 6, 6)), CT((1, 5, 5), 4)):
        want = float(torch.linalg.matrix_norm(op.matrix(), 2))
        assert op.norm(iters=500) == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------- each operator


def test_blur_is_circular_convolution() -> None:
    k = motion_kernel(3.0, 30.0)
    op = Blur(k, (1, 7, 6))
    x = _x(op, b=1)[0, 0]
    c = k.shape[0] // 2
    want = torch.zeros_like(x)
    for i in range(7):
        for j in range(6):
            for a in range(k.shape[0]):
                for b in range(k.shape[1]):
                    want[i, j] += k[a, b] * x[(i - a + c) % 7, (j - b + c) % 6]
    torch.testing.assert_close(op(x[None, None])[0, 0], want, rtol=1e-12, atol=1e-12)
    # singular values: the moduli of the transfer function
    s = torch.sort(op.svd().s).values
    want_s = torch.sort(torch.fft.fft2(F.pad(k, (0, 1, 0, 2))).abs().flatten()).values
    torch.testing.assert_close(s, want_s[want_s > 1e-12], rtol=1e-10, atol=1e-12)


def test_gaussian_kernel_moments() -> None:
    k = gaussian_kernel(1.5, size=25)  # +-8 std: truncation below 1e-14
    r = torch.arange(25, dtype=F64) - 12
    assert float(k.sum()) == pytest.approx(1.0, abs=1e-14)
    # a sampled Gaussian's variance differs from std^2 by O(exp(-2 pi^2 std^2))
    assert float((k.sum(1) * r**2).sum()) == pytest.approx(1.5**2, rel=1e-12)
    assert torch.equal(k, k.T)


def test_superresolution_avg_is_avg_pool_and_bicubic_matches_torch_inside() -> None:
    op = SuperResolution((2, 8, 12), 2)
    x = _x(op)
    torch.testing.assert_close(op(x), F.avg_pool2d(x, 2), rtol=1e-12, atol=1e-12)
    # bicubic: away from the borders, torch's anti-aliased bicubic (same Keys a = -0.5
    # kernel widened by the factor); at the borders we reflect, torch renormalises
    op = SuperResolution((1, 32, 32), 4, "bicubic")
    x = _x(op, b=2)
    ref = F.interpolate(x, scale_factor=0.25, mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(op(x)[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2], rtol=1e-6, atol=1e-6)
    d = bicubic_matrix(32, 4)
    assert torch.allclose(d.sum(1), torch.ones(8, dtype=F64))


def test_inpainting_masks() -> None:
    m = random_pixel_mask((6, 6), 0.5, seed=3)
    assert int(m.sum()) == 18 and set(m.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(m, random_pixel_mask((6, 6), 0.5, seed=3))
    op = Inpainting(m, (3, 6, 6))
    assert op.svd().rank == 3 * 18
    x = _x(op)
    torch.testing.assert_close(op.pinv(op(x)), x * m)
    with pytest.raises(ValueError, match="does not fit"):
        box_mask((4, 4), (2, 2, 3, 1))
    with pytest.raises(ValueError, match="broadcast"):
        Inpainting(torch.ones(3, 3), (1, 4, 4))


def test_colourisation_svd() -> None:
    op = Colourisation((3, 2, 2))
    w = torch.tensor([0.299, 0.587, 0.114], dtype=F64)
    torch.testing.assert_close(op.svd().s, torch.full((4,), float(w.norm()), dtype=F64))
    x = _x(op)
    torch.testing.assert_close(op(x)[:, 0], (x * w[:, None, None]).sum(1))


def test_compressed_sensing_scaling() -> None:
    op = CompressedSensing((1, 16, 16), ratio=0.5, seed=0)
    assert op.out_shape == (128,)
    # entries N(0, 1/m): E||M x||^2 = ||x||^2
    ratio = float((op.matrix() ** 2).sum()) / op.dim_in
    assert ratio == pytest.approx(1.0, abs=4 * math.sqrt(2 / (128 * 256)))
    assert torch.equal(op.weight, CompressedSensing((1, 16, 16), 128, seed=0).weight)


def test_mri_is_the_masked_orthonormal_fft() -> None:
    mask = mri_mask((8, 8), 4, 0.25, seed=1)
    op = MRI(mask, (1, 8, 8))
    x = _x(op, b=2)
    want = np.fft.fft2(x.numpy(), norm="ortho") * mask.numpy()
    np.testing.assert_allclose(op(x).numpy(), want, atol=1e-12)
    # at full sampling A is unitary onto the Hermitian-symmetric spectra: pinv = At = inverse
    full = MRI(torch.ones(8, 8), (1, 8, 8))
    torch.testing.assert_close(full.At(full(x)), x)
    torch.testing.assert_close(full.pinv(full(x)), x)
    # a frequency sampled without its mirror gives singular value 1/sqrt(2)
    half = torch.zeros(8, 8)
    half[0, 1] = 1.0
    s = MRI(half, (1, 8, 8)).svd().s
    torch.testing.assert_close(s, torch.full((2,), 2**-0.5, dtype=F64))


def test_ct_projections() -> None:
    n = 6
    x = _x(CT((1, n, n), 1), b=2)
    # angle 0 projects onto the columns, angle pi/2 onto the rows (bottom to top)
    op = CT((1, n, n), angles=torch.tensor([0.0, math.pi / 2], dtype=F64), n_det=n)
    y = op(x)
    torch.testing.assert_close(y[:, 0, 0], x[:, 0].sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y[:, 0, 1], x[:, 0].sum(2).flip(-1), rtol=1e-12, atol=1e-12)
    # every projection carries the total mass (no pixel falls off the default detector)
    op = CT((1, n, n), 7)
    torch.testing.assert_close(op(x).sum(-1), x.sum((-1, -2)).expand(2, 7)[:, None])


def test_phase_retrieval_magnitudes() -> None:
    op = PhaseRetrieval((1, 3, 3), oversample=2)
    x = _x(op, b=1)
    pad = np.zeros((6, 6))
    pad[:3, :3] = x[0, 0].numpy()
    np.testing.assert_allclose(op(x)[0, 0].numpy(), np.abs(np.fft.fft2(pad, norm="ortho")))
    # the trivial ambiguities: global sign and a flip with conjugation
    torch.testing.assert_close(op(-x), op(x))
    with pytest.raises(NotImplementedError, match="nonlinear"):
        op.At(op(x))


def test_tone_curve() -> None:
    op = ToneCurve((1, 1, 4), gain=0.5, gamma=2.0, data_range=(0.0, 1.0))
    x = torch.tensor([[[[-0.2, 0.0, 0.5, 1.0]]]], dtype=F64)
    torch.testing.assert_close(op(x), torch.tensor([[[[0.0, 0.0, 0.125, 0.5]]]], dtype=F64))
    hdr = ToneCurve((1, 1, 2), gain=4.0, gamma=1.0)  # [-1, 1] data: clips at 1
    torch.testing.assert_close(hdr(torch.tensor([[[[-0.5, 0.9]]]], dtype=F64)).squeeze(),
                               torch.tensor([1.0, 1.0], dtype=F64))  # fmt: skip
    # zero gradient (not nan) where the curve is flat
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(op(xg).sum(), xg)
    assert torch.isfinite(g).all() and float(g[0, 0, 0, 0]) == 0.0


def test_channel_mix_validates() -> None:
    with pytest.raises(ValueError, match="C_in"):
        ChannelMix(torch.ones(1, 2), (3, 2, 2))
    with pytest.raises(ValueError, match="elements"):
        MatrixOperator(torch.ones(2, 5), (2, 2))


# ---------------------------------------------------------------- noise models


def test_gaussian_noise() -> None:
    noise = GaussianNoise(0.3)
    y0 = torch.zeros(4, 2000, dtype=F64)
    y = noise.sample(y0, generator=10)
    # per-sample seeds: a sample's noise does not depend on its batch
    torch.testing.assert_close(y[2:3], noise.sample(y0[:1], generator=[12]))
    # std within 6 standard errors (n = 8000, se of the sd estimate ~ sigma / sqrt(2 n))
    assert float(y.std()) == pytest.approx(0.3, abs=6 * 0.3 / math.sqrt(2 * 8000))
    yc = noise.sample(
        torch.zeros(2, 3000, dtype=torch.complex128), torch.Generator().manual_seed(0)
    )
    assert yc.dtype == torch.complex128
    for part in (yc.real, yc.imag):
        assert float(part.std()) == pytest.approx(0.3, abs=6 * 0.3 / math.sqrt(2 * 6000))
    clean = torch.randn(3, 5, dtype=F64)
    obs = noise.sample(clean, generator=0)
    want = torch.distributions.Normal(clean, 0.3).log_prob(obs).sum(1)
    torch.testing.assert_close(noise.log_likelihood(obs, clean), want)
    cclean = torch.randn(2, 4, dtype=torch.complex128)
    cobs = noise.sample(cclean, generator=1)
    want = torch.distributions.Normal(
        torch.view_as_real(cclean), 0.3
    ).log_prob(torch.view_as_real(cobs)).sum((1, 2))  # fmt: skip
    torch.testing.assert_close(noise.log_likelihood(cobs, cclean), want)


def test_poisson_noise() -> None:
    noise = PoissonNoise(rate=20.0)
    clean = torch.full((2, 20000), 0.7, dtype=F64)
    y = noise.sample(clean, generator=3)
    n = y.numel()
    assert float(y.mean()) == pytest.approx(0.7, abs=6 * math.sqrt(0.7 / 20 / n))
    assert float(y.var()) == pytest.approx(0.7 / 20, rel=6 * math.sqrt(2 / n))
    torch.testing.assert_close(y[1:], noise.sample(clean[:1], generator=[4]))
    want = torch.distributions.Poisson(20.0 * clean[:, :50]).log_prob(20.0 * y[:, :50]).sum(1)
    torch.testing.assert_close(noise.log_likelihood(y[:, :50], clean[:, :50]), want)
    with pytest.raises(ValueError, match="non-negative"):
        noise.sample(-clean)


def test_matrix_svd_implicit_basis_equals_the_dense_one_where_it_matters() -> None:
    """A wide matrix on a large input completes its right singular vectors with Householder
    reflections (O(n k) per sample): the first coefficients, the row-space and null-space
    projectors and the round trip equal the dense full SVD's."""
    g = torch.Generator().manual_seed(0)
    n = 600
    for k in (1, 4, 150):
        m = torch.randn(k, n, generator=g, dtype=F64)
        op = MatrixOperator(m, (n,))
        assert 4 * k <= n <= op.dim_in and n >= op.implicit_basis_min_dim  # implicit path
        dense = MatrixOperator(m, (n,))
        dense.implicit_basis_min_dim = n + 1
        svd, ref = op.svd(), dense.svd()
        torch.testing.assert_close(svd.s, ref.s, rtol=1e-13, atol=0)
        x = torch.randn(5, n, generator=g, dtype=F64)
        c, cr = svd.Vt(x), ref.Vt(x)
        torch.testing.assert_close(c[:, :k], cr[:, :k], rtol=0, atol=1e-12)
        torch.testing.assert_close(c.norm(dim=1), x.norm(dim=1), rtol=1e-13, atol=0)
        torch.testing.assert_close(svd.V(c), x, rtol=0, atol=1e-12)
        null, null_ref = c.clone(), cr.clone()
        null[:, :k], null_ref[:, :k] = 0.0, 0.0
        torch.testing.assert_close(svd.V(null), ref.V(null_ref), rtol=0, atol=1e-12)
        torch.testing.assert_close(
            svd.U(svd.s * c[:, :k]), op(x), rtol=0, atol=1e-11 * float(svd.s.max())
        )
        if k == 1:  # V is orthogonal as a dense matrix too
            v = svd.V(torch.eye(n, dtype=F64))
            torch.testing.assert_close(v @ v.T, torch.eye(n, dtype=F64), rtol=0, atol=1e-12)
