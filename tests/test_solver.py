"""DASH-Q solver and baselines against float64 references on random data."""

import itertools

import numpy as np
import pytest
import torch

from dashq_vllm.quantize import solver
from dashq_vllm.quantize.gptq import gptq


def _data(rows, groups, gs, seed, heavy_tail=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups, gs, generator=g)
    if heavy_tail:
        w = w * torch.rand(rows, groups, 1, generator=g) * 2 + 0.3 * torch.randn(rows, groups, gs, generator=g) ** 3
    h = torch.rand(1, groups, gs, generator=g) ** 4 * 10  # very uneven channel importance
    return w, h


def test_weighted_fit_equals_least_squares_solve():
    w, h = _data(6, 4, 16, 0)
    q = solver.rtn(w, 2).codes.float()  # codes that grow with w: the fit has a positive slope
    s, z, ok = solver.weighted_fit(w.double(), q.double(), h.double())
    assert ok.all()
    for r, gi in itertools.product(range(6), range(4)):
        sq = np.sqrt(h[0, gi].double().numpy())
        A = np.stack([q[r, gi].double().numpy(), np.ones(16)], 1) * sq[:, None]
        (a, c), *_ = np.linalg.lstsq(A, w[r, gi].double().numpy() * sq, rcond=None)
        assert s[r, gi].item() == pytest.approx(a, rel=1e-9)
        assert (-z[r, gi] * s[r, gi]).item() == pytest.approx(c, rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("nbits", [2, 3, 4, 8])
def test_dashq_never_worse_than_rtn_and_init(nbits):
    w, h = _data(32, 8, 32, nbits)
    hd = solver.damp_hessian_diag(h, 0.01)
    res = solver.dashq(w, hd, nbits, iters=10, storage_dtype=None)
    err = solver.weighted_error(w, res.dequantize(), hd)
    s0, z0 = solver.minmax_params(w, nbits)
    init = solver.weighted_error(w, (solver.round_codes(w, s0, z0, nbits) - z0[..., None]) * s0[..., None], hd)
    rtn = solver.weighted_error(w, solver.rtn(w, nbits).dequantize(), hd)
    assert (err <= init * (1 + 1e-6)).all()
    assert (err <= rtn * (1 + 1e-6)).all()
    if nbits <= 3:  # at low bits the weighting must buy a clear improvement overall
        assert err.sum() < 0.8 * rtn.sum()
    assert res.codes.dtype == torch.uint8 and int(res.codes.max()) <= (1 << nbits) - 1


def test_dashq_converges_to_a_coordinate_descent_fixed_point():
    """At the returned (s, z, q): q is the rounding for (s, z), and (s, z) is (or is no worse
    than) the exact weighted least-squares fit for q — checked per group in float64."""
    w, h = _data(8, 4, 16, 7)
    res = solver.dashq(w.double(), h.double() + 0.01, 2, iters=50, tol=0.0, storage_dtype=None)
    q = res.codes.double()
    assert torch.equal(solver.round_codes(w.double(), res.scale.double(), res.zero.double(), 2), q)
    err = solver.weighted_error(w.double(), res.dequantize().double(), h.double() + 0.01)
    s, z, ok = solver.weighted_fit(w.double(), q, h.double() + 0.01)
    best = solver.weighted_error(w.double(), (q - z[..., None]) * s[..., None], h.double() + 0.01)
    assert (err[ok] <= best[ok] * (1 + 1e-6) + 1e-12).all()


def test_dashq_against_brute_force_on_tiny_groups():
    """Exhaustive search over every code assignment of a 6-element 2-bit group (4^6) with the
    exact weighted LS (s, z) for each: DASH-Q lands near the global optimum on average."""
    w, h = _data(6, 1, 6, 11)
    h = h + 0.05
    res = solver.dashq(w.double(), h.double(), 2, iters=20, storage_dtype=None)
    ours = solver.weighted_error(w.double(), res.dequantize().double(), h.double())
    codes = torch.tensor(list(itertools.product(range(4), repeat=6)), dtype=torch.float64)  # (4096, 6)
    for r in range(6):
        ww = w[r, 0].double().expand_as(codes)
        hh = h[0, 0].double().expand_as(codes)
        s, z, ok = solver.weighted_fit(ww, codes, hh)
        e = solver.weighted_error(ww, (codes - z[:, None]) * s[:, None], hh)
        best = e[ok].min()
        assert ours[r, 0] >= best * (1 - 1e-9)  # brute force is the true optimum
        assert ours[r, 0] <= 3 * best + 1e-9
    rtn = solver.weighted_error(w.double(), solver.rtn(w.double(), 2).dequantize().double(), h.double())
    assert ours.sum() <= rtn.sum()


def test_dead_channels_and_constant_groups():
    w = torch.randn(4, 2, 32)
    w[0, 0] = 0.5  # constant group is reproduced exactly
    h = torch.zeros(1, 2, 32)
    hd = solver.damp_hessian_diag(h, 0.01)
    assert torch.equal(hd, torch.ones_like(h))  # all-zero h falls back to unweighted
    res = solver.dashq(w, hd, 2)
    assert torch.isfinite(res.scale).all() and torch.isfinite(res.zero).all()
    torch.testing.assert_close(res.dequantize()[0, 0], w[0, 0], rtol=0, atol=1e-3)


def test_padding_channels_carry_no_weight():
    h = solver.hessian_group_view(torch.ones(100), 32)
    assert h.shape == (1, 4, 32) and h[0, 3, 4:].abs().sum() == 0
    assert solver.group_view(torch.ones(3, 100), 32).shape == (3, 4, 32)


def test_gptq_reduces_output_error_vs_rtn():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    w = torch.randn(16, 64, generator=g)
    H = x.T @ x
    res = gptq(w, H, 3, 32)
    wq = res.dequantize().reshape(16, 64)
    wr = solver.rtn(w.reshape(16, 2, 32), 3).dequantize().reshape(16, 64)
    err_gptq = ((x @ (w - wq).T) ** 2).sum()
    err_rtn = ((x @ (w - wr).T) ** 2).sum()
    assert err_gptq < err_rtn
    assert int(res.codes.max()) <= 7


def test_collect_stats_shares_identical_inputs_and_matches_direct_sums():
    from torch import nn

    from dashq_vllm.quantize.calibration import BlockInputs, collect_stats

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.o = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 8)

        def forward(self, x):
            return self.o(self.q(x) + self.k(x).repeat(1, 1, 2))

    blk = Block()
    xs = [torch.randn(1, 5, 8) for _ in range(3)]
    st = collect_stats(blk, BlockInputs(xs), full_gram=True)
    assert st["q"] is st["k"] and st["o"] is not st["q"]
    x = torch.cat(xs).reshape(-1, 8)
    torch.testing.assert_close(st["q"].diag, (x * x).sum(0))
    torch.testing.assert_close(st["q"].gram, x.T @ x)
    with torch.no_grad():
        y = torch.cat([blk.q(xx) + blk.k(xx).repeat(1, 1, 2) for xx in xs]).reshape(-1, 8)
    torch.testing.assert_close(st["o"].diag, (y * y).sum(0))
