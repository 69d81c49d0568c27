import numpy as np
import pytest

from qwt_onnx.numerics import rank, solver


def _statistics(x, r, heldout):
    shift = x[:64].mean(axis=0).astype(np.float32)
    train, held = (solver.NormalEquations(x.shape[1], r.shape[1], shift) for _ in range(2))
    train.update(x[~heldout], r[~heldout])
    held.update(x[heldout], r[heldout])
    return train, held


def _residuals(rng, true_rank, n=6000, d=96, m=96, noise=0.3):
    """Rows ``x`` with correlated features and targets ``r``: a map of ``true_rank`` plus noise."""
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 3.0
    mapping = rng.standard_normal((d, true_rank)) @ rng.standard_normal((true_rank, m)) / d
    r = (x - 3.0) @ mapping + 0.5
    r += noise * r.std() * rng.standard_normal(r.shape)
    return x.astype(np.float32), r.astype(np.float32), rng.random(n) < 0.2


def test_projected_statistics_are_those_of_the_projected_rows():
    rng = np.random.default_rng(0)
    x, r, _ = _residuals(rng, 3, n=500)
    down = rng.standard_normal((x.shape[1], 5))
    shift = x[:10].mean(axis=0).astype(np.float32)
    eq = solver.NormalEquations(x.shape[1], r.shape[1], shift)
    eq.update(x, r)
    projected = eq.projected(down)
    direct = solver.NormalEquations(5, r.shape[1], shift @ down)
    direct.update(x @ down, r)
    for name in ("count", "sum_x", "sum_r", "sum_r2", "xtx", "xtr"):
        np.testing.assert_allclose(getattr(projected, name), getattr(direct, name), rtol=1e-4, atol=1e-3 * np.abs(getattr(direct, name)).max())
    for alpha in (1e-6, 1e-2):  # and so are the fits on them, bias included
        a, b = solver.fit_ridge(projected, alpha), solver.fit_ridge(direct, alpha)
        np.testing.assert_allclose(a(x[:5] @ down), b(x[:5] @ down), rtol=1e-4, atol=1e-4)


def test_the_directions_are_the_fitted_outputs_principal_ones_found_without_an_m_by_m_decomposition():
    rng = np.random.default_rng(4)
    x, r, _ = _residuals(rng, 3, n=800, d=24, m=40)
    eq = solver.NormalEquations(24, 40)
    eq.update(x, r)
    mapping = solver.LinearMap(rng.standard_normal((24, 40)), np.zeros(40))
    mean = eq.sum_x / eq.count
    covariance = eq.xtx - eq.count * np.outer(mean, mean)
    _, vectors = np.linalg.eigh(mapping.weight.T @ covariance @ mapping.weight)
    expected = vectors[:, ::-1][:, :5]
    found = rank.principal_directions(eq, mapping, 5)
    np.testing.assert_allclose(found @ found.T, expected @ expected.T, atol=1e-8)  # the same subspace


def test_the_directions_of_a_map_to_fewer_channels_than_it_reads_decompose_only_the_output_covariance(monkeypatch):
    rng = np.random.default_rng(5)
    x, r, _ = _residuals(rng, 3, n=800, d=40, m=24)
    eq = solver.NormalEquations(40, 24)
    eq.update(x, r)
    mapping = solver.LinearMap(rng.standard_normal((40, 24)), np.zeros(24))
    b = np.linalg.cholesky(eq.covariance()).T @ mapping.weight  # Bᵀ B = Wᵀ C W
    expected = np.linalg.svd(b, full_matrices=False)[2][:5].T
    sizes = []
    eigh = np.linalg.eigh
    monkeypatch.setattr(np.linalg, "eigh", lambda a: sizes.append(a.shape[0]) or eigh(a))
    found = rank.principal_directions(eq, mapping, 5)
    np.testing.assert_allclose(found @ found.T, expected @ expected.T, atol=1e-8)  # the same subspace
    assert sizes == [24]


def test_a_low_rank_residual_gets_the_lowest_rank_that_holds_nearly_all_of_the_full_fits_gain():
    rng = np.random.default_rng(1)
    x, r, heldout = _residuals(rng, true_rank=3)
    train, held = _statistics(x, r, heldout)
    full = solver.fit_compensation(train, held)
    low = rank.lowest_sufficient_rank(train, held, full)
    assert low is not None and low.rank == 4
    assert 1 - low.fit.error_ratio_heldout >= (1 - rank.TOLERANCE) * (1 - full.error_ratio_heldout)
    # the map it stands for is its two factors' product, and it is what is scored
    np.testing.assert_allclose(low.fit.fit.weight, low.down @ low.up)
    assert solver.error_ratio(held, low.fit.validated) == pytest.approx(low.fit.error_ratio_heldout)


def test_a_full_rank_residual_keeps_the_full_branch():
    rng = np.random.default_rng(2)
    x, r, heldout = _residuals(rng, true_rank=96, noise=0.05)
    train, held = _statistics(x, r, heldout)
    assert rank.lowest_sufficient_rank(train, held, solver.fit_compensation(train, held)) is None


def test_the_down_projection_is_scored_as_stored():
    rng = np.random.default_rng(3)
    x, r, heldout = _residuals(rng, true_rank=3)
    train, held = _statistics(x, r, heldout)
    full = solver.fit_compensation(train, held)

    def coarse(down):  # a deliberately coarse grid: 3 levels per column
        scale = np.abs(down).max(axis=0) / 1.0
        return np.round(down / scale) * scale, scale

    low = rank.fit_low_rank(train, held, full.validated, 4, coarse)
    levels = low.down / low.down_scale
    np.testing.assert_array_equal(levels, np.round(levels))
    # the up projection was refitted for the coarse down projection: better than the exact one's up
    exact = rank.fit_low_rank(train, held, full.validated, 4)
    naive = solver.LinearMap(low.down @ exact.up, exact.fit.fit.bias)
    assert solver.sum_squared_error(held, low.fit.fit).sum() < solver.sum_squared_error(held, naive).sum()


@pytest.mark.parametrize("d, m, expected", [(384, 384, [4, 8, 16, 32, 64]), (384, 1536, [4, 8, 16, 32, 64, 128]), (16, 16, [4]), (12, 12, [])])
def test_ranks_tried_cost_at_most_half_the_full_branch(d, m, expected):
    assert rank.cheaper_ranks(d, m) == expected
