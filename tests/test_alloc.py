"""The command line's allocator setting and the chunked analytic denoisers' gradients."""

import os
import subprocess
import sys

import pytest
import torch

from diffusolve.models import GaussianMixture
from diffusolve.models.analytic import gmm as gmm_module
from diffusolve.process import ddpm

_PROBE = "from diffusolve._alloc import keep_freed_memory as k; print(k(), k())"


def _probe(env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env={**os.environ, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_takes_effect_once_and_can_be_turned_off():
    assert _probe({"DIFFUSOLVE_MALLOC": ""}) == "True True"
    assert _probe({"DIFFUSOLVE_MALLOC": "system"}) == "False False"


def test_cli_applies_the_setting(monkeypatch):
    from diffusolve import _alloc, cli

    calls = []
    monkeypatch.setattr(_alloc, "keep_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["solvers"]) == 0
    assert calls == [1]


def test_chunked_mixture_gradient_equals_the_unchunked_one(monkeypatch):
    """Rows split into chunks (the backward of a split, not of slices) give the same
    vector-Jacobian product as one chunk, isotropic and full covariances alike."""
    g = torch.Generator().manual_seed(0)
    d, k, n = 6, 4, 37
    means = 3 * torch.randn(k, d, generator=g, dtype=torch.float64)
    weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.1
    a = torch.randn(k, d, d, generator=g, dtype=torch.float64)
    priors = [
        GaussianMixture(weights, means, torch.ones(k, dtype=torch.float64), process=ddpm()),
        GaussianMixture(weights, means, a @ a.mT / d + 0.1 * torch.eye(d), process=ddpm()),
    ]
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    v = torch.randn(n, d, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.8 + 0.1
    for prior in priors:
        grads = []
        for chunk in (1 << 22, 5 * k * d):  # one chunk; chunks of 5 rows (8 chunks)
            monkeypatch.setattr(gmm_module, "_CHUNK_ELEMENTS", chunk)
            xg = x.clone().requires_grad_(True)
            with torch.enable_grad():
                out = prior.denoise(xg, t)
                (gr,) = torch.autograd.grad(out, xg, v)
            grads.append((out.detach(), gr))
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-12, atol=1e-12)
