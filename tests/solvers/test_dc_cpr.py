"""Cascade polynomial regression: the official formula, exact recovery, degree limits, files."""

import numpy as np
import pytest

from diffsamplers.solvers.dc_cpr import CascadePolynomialRegression
from diffsamplers.solvers.dc_ratios import DCRatios, RatioMismatchError

# The 36 coefficients the DC-Solver authors fitted for Stable Diffusion 2.1 (dc_solver/cpr_coeffs_path/sd2.1.npy
# in wl-zhao/DC-Solver), used here only to test our formula against ratios computed from them independently.
SD21 = [
    1523.67661966, -1111.47464508, 198.38349618, -1346.08900228, 1007.19494126, -186.25475774,
    168.39730243, -128.03894894, 24.88478975, -8140.64401858, 5906.74827912, -1035.99411231,
    6941.4138994, -5193.98065982, 950.3205653, -848.21046751, 650.69033333, -121.28674277,
    13309.27038462, -9616.67032053, 1668.76859621, -11037.10779439, 8256.66668566, -1503.79920359,
    1293.97404351, -999.56293282, 188.22170414, -6747.42182161, 4853.15305335, -835.51167928,
    5489.11518378, -4096.89721821, 743.09534131, -619.56127633, 480.14971466, -90.89633129,
]  # fmt: skip


@pytest.mark.parametrize(
    "nfe, scale, expected",
    [
        (5, 7.5, [1, 1, 1.027, 0.739, 1.226]),
        (10, 7.5, [1, 1, 0.445, 0.898, 1.063, 1.043, 0.941, 0.861, 0.907, 1.182]),
        (10, 3.0, [1, 1, 0.712, 0.970, 1.093, 1.127, 1.118, 1.114, 1.161, 1.305]),
    ],
)
def test_official_formula(nfe, scale, expected):
    assert CascadePolynomialRegression(np.array(SD21)).predict(nfe, scale) == pytest.approx(expected, abs=5e-4)


def _searched(nfe, scale, ratios, model="m"):
    return DCRatios(list(ratios), model, scale, {"sigmas": [], "metadata": {}}, {"base": "UniPC", "dc_order": 2})


def test_fit_recovers_a_cascade_exactly():
    truth = CascadePolynomialRegression(np.random.default_rng(0).normal(size=36))
    configs = [(n, g) for n in (6, 9, 12) for g in (1.0, 4.0, 9.0)]  # ≥ 4 searched steps per NFE: full rank
    fit = CascadePolynomialRegression.fit([_searched(n, g, truth.predict(n, g)) for n, g in configs])
    for n, g in [(6, 2.0), (10, 7.5), (20, 5.0)]:
        assert fit.predict(n, g) == pytest.approx(truth.predict(n, g), abs=1e-6)


def test_degrees_follow_the_data():
    """Two guidance scales: linear in g; one NFE: constant in n; unused coefficients stay 0."""
    ratios = [_searched(8, g, [1, 1] + [1 + 0.01 * g * i for i in range(6)]) for g in (1.0, 7.5)]
    fit = CascadePolynomialRegression.fit(ratios)
    c = fit.coefficients
    assert np.all(c[:, 0, :] == 0) and np.all(c[:, :, :2] == 0)
    for r in ratios:
        assert fit.predict(8, r.guidance_scale) == pytest.approx(r.ratios, abs=1e-9)
    mid = fit.predict(8, 4.25)  # linear in g: the mean of the two
    assert mid == pytest.approx([(a + b) / 2 for a, b in zip(*(r.ratios for r in ratios))], abs=1e-9)


def test_save_load_and_errors(tmp_path):
    fit = CascadePolynomialRegression.fit([_searched(6, 1.0, [1, 1, 0.9, 1.0, 1.1, 1.2])])
    loaded = CascadePolynomialRegression.load(fit.save(tmp_path / "cpr.safetensors"))
    assert np.array_equal(loaded.coefficients, fit.coefficients) and loaded.fitted_on == fit.fitted_on
    with pytest.raises(RatioMismatchError, match="different models"):
        CascadePolynomialRegression.fit([_searched(6, 1.0, [1] * 6), _searched(8, 1.0, [1] * 8, model="other")])
    with pytest.raises(ValueError, match="36 coefficients"):
        CascadePolynomialRegression(np.zeros(35))
    with pytest.raises(ValueError, match="nfe must be a positive integer"):
        fit.predict(0, 1.0)
