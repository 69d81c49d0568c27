import numpy as np
import pytest

from qwt_onnx.numerics import solver


def _noisy_linear(rng, n=4000, d=12, m=5, noise=0.05):
    w = rng.standard_normal((d, m))
    b = rng.standard_normal(m)
    x = rng.standard_normal((n, d)) * rng.uniform(0.1, 10, d)  # features on very different scales
    return x, x @ w + b + noise * rng.standard_normal((n, m)), w, b


def test_ridge_recovers_known_weight_and_bias():
    rng = np.random.default_rng(0)
    x, r, w, b = _noisy_linear(rng)
    eq = solver.NormalEquations(x.shape[1], r.shape[1])
    eq.update(x, r)
    fit = solver.fit_ridge(eq, alpha=1e-8)
    np.testing.assert_allclose(fit.weight, w, atol=5e-3)
    np.testing.assert_allclose(fit.bias, b, atol=5e-3)
    assert solver.r2_score(eq, fit) > 0.99


def test_streamed_accumulation_equals_one_shot():
    rng = np.random.default_rng(1)
    x, r, _, _ = _noisy_linear(rng, n=1000)
    x += 50.0  # a large common offset, as residual streams have
    shift = x[:37].mean(axis=0).astype(np.float32)
    one_shot = solver.NormalEquations(x.shape[1], r.shape[1], shift)
    one_shot.update(x, r)
    streamed = solver.NormalEquations(x.shape[1], r.shape[1], shift)
    for start in range(0, len(x), 37):
        streamed.update(x[start : start + 37], r[start : start + 37])
    assert streamed.count == one_shot.count == len(x)
    for alpha in (1e-6, 1e-2):
        a, b = solver.fit_ridge(one_shot, alpha), solver.fit_ridge(streamed, alpha)
        np.testing.assert_allclose(a.weight, b.weight, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a.bias, b.bias, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(a(x[:5]), b(x[:5]), rtol=1e-5, atol=1e-4)


def test_merging_needs_a_common_shift():
    a, b = solver.NormalEquations(2, 1), solver.NormalEquations(2, 1)
    a.update(np.ones((3, 2)), np.ones((3, 1)))
    b.update(np.zeros((3, 2)), np.ones((3, 1)))
    with pytest.raises(ValueError, match="different shifts"):
        a.merged(b)


def _same_statistics(a: solver.NormalEquations, b: solver.NormalEquations, rtol=1e-5) -> None:
    assert a.count == b.count
    for name in ("sum_x", "sum_r", "sum_r2", "xtx", "xtr"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=rtol, atol=rtol * np.abs(getattr(b, name)).max())


def test_features_first_items_give_the_statistics_of_their_rows():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 4, 30)).astype(np.float32) + 20.0  # [items, features, positions]
    r = rng.standard_normal((6, 3, 30)).astype(np.float32)
    shift = np.full(4, 20.0, np.float32)
    rows, columns = solver.NormalEquations(4, 3, shift), solver.NormalEquations(4, 3, shift)
    rows.update(x.transpose(0, 2, 1).reshape(-1, 4), r.transpose(0, 2, 1).reshape(-1, 3))
    columns.update_columns(x, r)
    _same_statistics(columns, rows)


def test_the_training_rows_are_all_rows_without_the_held_out_ones():
    rng = np.random.default_rng(6)
    x, r, _, _ = _noisy_linear(rng, n=300)
    held = np.arange(len(x)) % 5 == 4
    shift = x[:1].mean(axis=0).astype(np.float32)
    every, heldout, train = (solver.NormalEquations(x.shape[1], r.shape[1], shift) for _ in range(3))
    every.update(x, r)
    heldout.update(x[held], r[held])
    train.update(x[~held], r[~held])
    _same_statistics(every.without(heldout), train)
    _same_statistics(every.without(heldout).merged(heldout), every)


def test_statistics_give_the_same_error_as_the_rows():
    rng = np.random.default_rng(2)
    x, r, _, _ = _noisy_linear(rng, n=500, noise=1.0)
    eq = solver.NormalEquations(x.shape[1], r.shape[1])
    eq.update(x, r)
    fit = solver.fit_ridge(eq, alpha=1e-3)
    direct = ((r - fit(x)) ** 2).sum(axis=0)
    # float32 products: the expanded sum loses a few digits to cancellation, no more
    np.testing.assert_allclose(solver.sum_squared_error(eq, fit), direct, rtol=1e-3)
    assert solver.error_ratio(eq, fit) == pytest.approx(direct.sum() / (r**2).sum(), rel=1e-3)


def test_compensation_is_dropped_when_it_does_not_help_on_heldout_rows():
    rng = np.random.default_rng(3)
    d, m = 40, 6
    train, held = solver.NormalEquations(d, m), solver.NormalEquations(d, m)
    train.update(rng.standard_normal((60, d)), rng.standard_normal((60, m)))  # pure noise: no signal to fit
    held.update(rng.standard_normal((60, d)), rng.standard_normal((60, m)))
    result = solver.fit_compensation(train, held)
    assert not result.kept
    assert not result.fit.weight.any() and not result.fit.bias.any()


def test_compensation_is_kept_and_refit_on_all_rows_when_it_helps():
    rng = np.random.default_rng(4)
    x, r, w, b = _noisy_linear(rng, n=2000, noise=0.5)
    shift = x.mean(axis=0).astype(np.float32)
    train, held = (solver.NormalEquations(x.shape[1], r.shape[1], shift) for _ in range(2))
    train.update(x[:1600], r[:1600])
    held.update(x[1600:], r[1600:])
    result = solver.fit_compensation(train, held)
    assert result.kept_targets == r.shape[1] and result.error_ratio_heldout < 0.1 and result.r2_heldout > 0.9
    clean = x @ w + b
    assert np.sqrt(np.mean((result.fit(x) - clean) ** 2)) < 0.05  # well below the noise of 0.5


def test_the_training_error_ratio_is_below_the_held_out_one_by_the_fits_optimism():
    # 40 features on 100 training rows: the fit follows the training rows' noise, about
    # 2 p / n of the noise energy below what it leaves on new rows
    rng = np.random.default_rng(8)
    x = rng.standard_normal((1100, 40))
    r = x @ rng.standard_normal((40, 3)) / np.sqrt(40) + rng.standard_normal((1100, 3))  # as much noise as signal
    train, held = (solver.NormalEquations(x.shape[1], r.shape[1], np.zeros(40, np.float32)) for _ in range(2))
    train.update(x[:100], r[:100])
    held.update(x[100:], r[100:])
    result = solver.fit_compensation(train, held, alphas=(1e-9,))
    validated = result.validated
    assert result.error_ratio_train == pytest.approx(solver.error_ratio(train, validated))
    assert result.error_ratio_heldout == pytest.approx(solver.error_ratio(held, validated))
    assert result.error_ratio_train < result.error_ratio_heldout - 0.1


def test_each_output_channel_is_kept_only_where_it_helps():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3000, 10))
    r = np.stack([x @ rng.standard_normal(10), rng.standard_normal(3000)], axis=1)  # signal, pure noise
    train, held = solver.NormalEquations(10, 2, np.zeros(10, np.float32)), solver.NormalEquations(10, 2, np.zeros(10, np.float32))
    train.update(x[:2400], r[:2400])
    held.update(x[2400:], r[2400:])
    result = solver.fit_compensation(train, held)
    assert result.kept_targets == 1
    assert result.fit.weight[:, 0].any() and not result.fit.weight[:, 1].any() and result.fit.bias[1] == 0


def test_rank_deficient_inputs_give_a_finite_solution():
    rng = np.random.default_rng(5)
    x = np.zeros((10, 8))
    x[:, 0] = rng.standard_normal(10)  # seven constant columns and fewer rows than features
    r = np.outer(x[:, 0], np.ones(3)) + 2.0
    eq = solver.NormalEquations(8, 3)
    eq.update(x, r)
    fit = solver.fit_ridge(eq, alpha=1e-6)
    assert fit.is_finite()
    np.testing.assert_allclose(fit(x), r, atol=1e-3)
    constant = solver.NormalEquations(8, 3)
    constant.update(np.ones((10, 8)), r)
    assert solver.fit_ridge(constant, alpha=1e-6).is_finite()


def test_grouped_fit_recovers_a_block_diagonal_map_and_pools_its_scores():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3000, 8))
    w = np.zeros((8, 6))
    w[:4, :3], w[4:, 3:] = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    r = x @ w + 0.5 + 0.01 * rng.standard_normal((3000, 6))
    slices = [(slice(0, 4), slice(0, 3)), (slice(4, 8), slice(3, 6))]
    groups = []
    for features, targets in slices:
        shift = np.zeros(4, np.float32)
        train, held = solver.NormalEquations(4, 3, shift), solver.NormalEquations(4, 3, shift)
        train.update(x[:2000, features], r[:2000, targets])
        held.update(x[2000:, features], r[2000:, targets])
        groups.append((train, held))
    result = solver.fit_grouped_compensation(groups, slices)
    np.testing.assert_allclose(result.fit.weight, w, atol=2e-3)  # zero off the diagonal blocks
    np.testing.assert_allclose(result.fit.bias, 0.5, atol=2e-3)
    assert result.kept_targets == 6 and result.alphas.shape == (6,)
    assert result.r2_heldout > 0.99 and result.error_ratio_heldout < 1e-3


def test_stored_weights_are_judged_as_stored_with_their_bias_refit():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3000, 6)) + 2.0  # an offset, so that rounding shifts the best bias
    x[:, 1] = x[:, 0] + 0.01 * rng.standard_normal(3000)  # two features nearly collinear
    w = rng.standard_normal((6, 4))
    w[:, 3] = [0.63, -0.62, 0, 0, 0, 0]  # a weak channel that coarse rounding makes worse than nothing
    r = x @ w + [0.3, 0.3, 0.3, 0.0] + 0.01 * rng.standard_normal((3000, 4))
    shift = np.full(6, 2.0, np.float32)
    train, held = solver.NormalEquations(6, 4, shift), solver.NormalEquations(6, 4, shift)
    train.update(x[:2000], r[:2000])
    held.update(x[2000:], r[2000:])
    slices = [(slice(0, 6), slice(0, 4))]
    fit = solver.fit_grouped_compensation([(train, held)], slices)
    assert fit.kept_targets == 4
    coarse = lambda weight: np.round(weight * 4) / 4  # noqa: E731  (a grid of 0.25)
    stored = solver.with_stored_weights(fit, [(train, held)], slices, coarse(fit.validated.weight), coarse(fit.fit.weight))

    assert stored.kept_targets == 3 and stored.kept_mask.tolist() == [True, True, True, False]
    assert not stored.fit.weight[:, 3].any() and stored.fit.bias[3] == 0
    np.testing.assert_array_equal(stored.fit.weight[:, :3], coarse(fit.fit.weight)[:, :3])
    # each kept channel's bias is the best one for its stored weights, on all rows
    best_bias = (r - x @ stored.fit.weight).mean(axis=0)
    np.testing.assert_allclose(stored.fit.bias[:3], best_bias[:3], atol=1e-9)
    # the scores are those of the stored, train-only map on the held-out rows
    residual = r[2000:] - stored.validated(x[2000:])
    assert stored.error_ratio_heldout == pytest.approx(np.square(residual).sum() / np.square(r[2000:]).sum(), rel=1e-3)
    assert stored.error_ratio_heldout > fit.error_ratio_heldout


def test_stored_weights_equal_to_the_fitted_ones_change_nothing():
    rng = np.random.default_rng(7)
    x, r, _, _ = _noisy_linear(rng, n=2000, d=5, m=3)
    shift = np.zeros(5, np.float32)
    train, held = solver.NormalEquations(5, 3, shift), solver.NormalEquations(5, 3, shift)
    train.update(x[:1500], r[:1500])
    held.update(x[1500:], r[1500:])
    slices = [(slice(0, 5), slice(0, 3))]
    fit = solver.fit_grouped_compensation([(train, held)], slices)
    same = solver.with_stored_weights(fit, [(train, held)], slices, fit.validated.weight, fit.fit.weight)
    np.testing.assert_allclose(same.fit.bias, fit.fit.bias, rtol=1e-9, atol=1e-9)
    assert same.error_ratio_heldout == pytest.approx(fit.error_ratio_heldout, rel=1e-9)
    assert same.kept_targets == fit.kept_targets


def test_non_finite_statistics_drop_the_compensation_and_say_why():
    rng = np.random.default_rng(6)
    x, r, _, _ = _noisy_linear(rng, n=600)
    r[5, 2] = np.inf  # e.g. an overflow in one block output
    shift = np.zeros(x.shape[1], np.float32)
    train, held = solver.NormalEquations(x.shape[1], r.shape[1], shift), solver.NormalEquations(x.shape[1], r.shape[1], shift)
    train.update(x[:500], r[:500])
    held.update(x[500:], r[500:])
    result = solver.fit_compensation(train, held)
    assert not result.kept and result.not_finite and "NaN or Inf" in result.reason
    assert result.fit.is_finite()


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_few_rows_and_constant_channels_give_a_finite_regularised_solution(rows):
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 16))
    x[:, 3] = 7.0  # a constant channel
    x[:, 5] = x[:, 4]  # two identical channels
    r = rng.standard_normal((rows, 4))
    eq = solver.NormalEquations(16, 4)
    eq.update(x, r)
    for alpha in solver.DEFAULT_ALPHAS:
        fit = solver.fit_ridge(eq, alpha)
        assert fit.is_finite()
        assert np.isfinite(solver.sum_squared_error(eq, fit)).all()


def test_subnormal_values_add_what_zeros_add():
    rng = np.random.default_rng(9)
    x, r = rng.standard_normal((64, 8)).astype(np.float32), rng.standard_normal((64, 3)).astype(np.float32)  # rows longest
    underflowed = x.copy()
    underflowed[:, 2] = np.float32(1e-41)  # subnormal in float32, as features that underflowed are
    assert solver.without_subnormals(x) is x  # none to flush: the array as it is
    np.testing.assert_array_equal(solver.without_subnormals(underflowed)[:, 2], 0.0)
    with_them, zeroed = (solver.NormalEquations(8, 3, shift=np.zeros(8, np.float32)) for _ in range(2))
    with_them.update(underflowed, r)
    zeroed.update(np.where(np.arange(8) == 2, np.float32(0), underflowed), r)
    np.testing.assert_array_equal(with_them.xtx, zeroed.xtx)
    np.testing.assert_array_equal(with_them.xtr, zeroed.xtr)
