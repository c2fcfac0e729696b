"""The fused Gram/projection kernel agrees with float64 linear algebra, with torch's autograd and
with its BLAS fallback; it builds where a C compiler exists and falls back cleanly where not."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import loralens as ll
from loralens import fused
from loralens.features import svals
from loralens.lora import factor_zeros

needs_cc = pytest.mark.skipif(
    not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")),
    reason="no C compiler on this machine",
)


def _factor(B: int, K: int, r: int, seed: int, rank_major: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K, r, generator=g)
    if not rank_major:
        return x
    f = factor_zeros(B, K, r)
    f.copy_(x)
    return f


@needs_cc
def test_kernel_builds_here():
    assert fused.available()


def _reference(factors, mats):
    R = max(f.shape[2] for f in factors)
    gram = torch.zeros(factors[0].shape[0], len(factors), R, R, dtype=torch.float64)
    for i, f in enumerate(factors):
        f64 = f.double()
        gram[:, i, : f.shape[2], : f.shape[2]] = f64.mT @ f64
    return gram, [p.double() @ f.double() for p, f in zip(mats, factors)]


@needs_cc
@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(0, 3),
    layers=st.lists(
        st.tuples(st.sampled_from([1, 7, 8, 9, 63, 2048, 2049, 4100]), st.integers(1, 9)),
        min_size=1,
        max_size=3,
    ),
    h=st.integers(1, 11),
    seed=st.integers(0, 2**16),
)
def test_grams_and_projections_match_float64(B, layers, h, seed):
    factors = [_factor(B, K, r, seed + i) for i, (K, r) in enumerate(layers)]
    g = torch.Generator().manual_seed(seed)
    mats = [torch.randn(h, K, generator=g) for K, _ in layers]
    assert all(fused._fits(f, p) for f, p in zip(factors, mats))
    want, want_p = _reference(factors, mats)
    scale = max([1.0] + [f.abs().max().item() ** 2 * f.shape[1] for f in factors if B])
    gram = fused.grams(factors)
    assert gram.dtype == torch.float64 and gram.shape == want.shape
    torch.testing.assert_close(gram, want, rtol=0, atol=1e-6 * scale)
    gram2, projs = fused.grams_and_projections(factors, mats)
    torch.testing.assert_close(gram2, gram, rtol=1e-6, atol=1e-6 * scale)
    for q, w in zip(projs, want_p):
        assert q.dtype == torch.float32 and q.shape == w.shape
        torch.testing.assert_close(q.double(), w, rtol=1e-5, atol=1e-5 * scale**0.5)


@needs_cc
def test_projection_gradient_matches_matmul():
    factors = [_factor(3, 300, 4, 0), _factor(3, 77, 2, 1)]
    mats = [torch.randn(8, 300, requires_grad=True), torch.randn(5, 77, requires_grad=True)]
    ws = [torch.randn(3, 8, 4), torch.randn(3, 5, 2)]
    _, projs = fused.grams_and_projections(factors, mats)
    sum((q * w).sum() for q, w in zip(projs, ws)).backward()
    got = [m.grad.clone() for m in mats]
    for m in mats:
        m.grad = None
    sum((torch.matmul(m, f) * w).sum() for m, f, w in zip(mats, factors, ws)).backward()
    for a, m in zip(got, mats):
        torch.testing.assert_close(a, m.grad, rtol=1e-5, atol=1e-5)


def test_a_factor_that_needs_a_gradient_gets_one():
    f = _factor(2, 30, 3, 4).requires_grad_()
    m = torch.randn(4, 30)
    _, (q,) = fused.grams_and_projections([f], [m])
    q.sum().backward()
    torch.testing.assert_close(f.grad, (m.sum(0)[:, None]).expand(30, 3).expand(2, 30, 3))


@needs_cc
def test_threads_split_the_work_without_changing_a_bit():
    factors = [_factor(8, 40000, 4, 1), _factor(8, 3000, 3, 2)]
    mats = [torch.randn(8, 40000), torch.randn(8, 3000)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused.grams_and_projections(factors, mats)
        torch.set_num_threads(2)
        two = fused.grams_and_projections(factors, mats)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0])
    assert all(torch.equal(a, b) for a, b in zip(one[1], two[1]))


def test_layers_the_kernel_cannot_take_go_through_blas():
    row_major = _factor(2, 50, 3, 2, rank_major=False)  # columns strided: not for the kernel
    half = _factor(2, 40, 2, 3).to(torch.bfloat16)
    ok = _factor(2, 60, 4, 4)
    assert not fused._fits(row_major, None) and not fused._fits(half, None)
    factors = [row_major, half, ok]
    gram = fused.grams(factors)
    want, _ = _reference([row_major, half.float(), ok], [])
    torch.testing.assert_close(gram, want, rtol=1e-5, atol=1e-4)


@needs_cc
def test_models_and_features_agree_with_and_without_the_kernel(monkeypatch):
    g = torch.Generator().manual_seed(3)
    names = ["a.q", "a.v", "b.q"]
    loras = [
        ll.LoRA(
            [
                ll.LoRALayer(n, torch.randn(24, 4, generator=g), torch.randn(40, 4, generator=g))
                for n in names
            ]
        )
        for _ in range(5)
    ]
    batch = ll.collate(loras)
    torch.manual_seed(0)
    model = ll.build_model("glnet", batch.spec, 1)
    model.eval()
    with torch.no_grad():
        fast = model(batch), svals(batch)
    monkeypatch.setattr(fused, "available", lambda: False)
    with torch.no_grad():
        slow = model(batch), svals(batch)
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast[1], slow[1], rtol=1e-5, atol=1e-5)


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "default", "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


def test_without_a_compiler_it_warns_once_and_still_computes(tmp_path):
    code = (
        "import torch; from loralens import fused; from loralens.lora import factor_zeros\n"
        "f = factor_zeros(2, 64, 4); f.copy_(torch.randn(2, 64, 4))\n"
        "g = fused.grams([f])[:, 0]; fused.grams([f])\n"
        "assert not fused.available()\n"
        "assert torch.allclose(g, f.double().mT @ f.double(), rtol=1e-5, atol=1e-4)\n"
    )
    done = _python(code, CC=str(tmp_path / "no-such-cc"), LORALENS_CACHE=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("fused C kernel is unavailable") == 1, done.stderr
    assert "no-such-cc" in done.stderr
    quiet = _python(code, LORALENS_NATIVE="0", LORALENS_CACHE=str(tmp_path))
    assert quiet.returncode == 0 and "unavailable" not in quiet.stderr, quiet.stderr


def test_a_planted_kernel_in_the_cache_is_never_loaded(tmp_path):
    """A shared library found in the cache runs code when loaded: one not recorded by our own
    compile (here: a file that would crash CDLL, with no or a wrong hash) is compiled afresh."""
    locate = (
        "from importlib import resources; from loralens import fused\n"
        "with resources.as_file(resources.files('loralens') / 'fused.c') as p:\n"
        "    print(fused.kernel_path(p))\n"
    )
    so = Path(_python(locate, LORALENS_CACHE=str(tmp_path)).stdout.strip())
    so.parent.mkdir(parents=True)
    check = "from loralens import fused; assert fused.available()"
    for record in (None, "0" * 64):
        so.write_bytes(b"planted: not a kernel")
        if record:
            so.with_suffix(".sha256").write_text(record)
        done = _python(check, LORALENS_CACHE=str(tmp_path))
        assert done.returncode == 0 and "unavailable" not in done.stderr, done.stderr
        assert so.read_bytes()[:4] == b"\x7fELF"
