"""DC-Solver's accuracy claims on the exact mixtures, with stated margins (small settings, fast enough for CI).

Every method starts from the same 64 noises (and class labels) as the reference solution of the same (guided)
ODE; ratios are searched on 10 other noises (the paper's count). Errors: RMS over samples (√MSE) and the
median per-sample RMS. The grid is the DC paper's diffusers setting: UniPC bh2 order 2, linspace timesteps,
ending at σ_min. Measured values (docs/dc_solver.md's tables use 256 samples): see the comments.

Under guidance 7.5 the exact guided mixture makes 1–5 % of UniPC's trajectories go astray (per-sample errors
above 1 where the typical one is 0.1); the RMS then depends on those few samples, and on RMS the
UniPC-based DC-Solver beats DPM-Solver++ on some evaluation sets and not on others (docs/dc_solver.md). The claims
tested under guidance are the robust ones: the typical (median) sample, and RMS against its own base.
"""

import pytest

from diffsamplers.apps.dc_report import REFINED, SEARCHED, evaluate_dc
from diffsamplers.apps.registry import load_model

BASELINES = ("UniPC (unipc2-bh2)", "DPM-Solver++ 2M", "DPM-Solver++ 3M")
DC = SEARCHED


@pytest.fixture(scope="module")
def unconditional():
    return evaluate_dc(load_model("gmm"), nfes=(5, 6, 8), num_eval=64)


@pytest.fixture(scope="module")
def conditional():
    return evaluate_dc(
        load_model("gmm-cond"),
        nfes=(5, 6, 8),
        guidance_scales=(1.0, 7.5),
        unseen=[(7, 1.0), (7, 7.5)],
        num_eval=64,
        plug_in=True,
    )


def _row(report, nfe, scale):
    return next(r for r in report["rows"] if r["nfe"] == nfe and r["guidance_scale"] == scale)


def _best_baseline(row, key):
    return min(row[key][name] for name in BASELINES)


@pytest.mark.parametrize("nfe", [5, 6, 8])
def test_unconditional_mixture(unconditional, nfe):
    """Measured (RMS): 0.114 vs 0.124 at 5, 0.095 vs 0.101 at 6, 0.075 vs 0.077 at 8; medians 3–8 % lower."""
    row = _row(unconditional, nfe, 1.0)
    for key in ("errors", "median_errors"):
        assert row[key][DC] < 0.99 * _best_baseline(row, key), (key, row[key])


@pytest.mark.parametrize("nfe", [5, 6, 8])
def test_class_conditional_without_guidance(conditional, nfe):
    """Scale 1 (conditional sampling). Measured (RMS): 0.099 vs 0.105, 0.088 vs 0.090, 0.075 vs 0.078."""
    row = _row(conditional, nfe, 1.0)
    for key in ("errors", "median_errors"):
        assert row[key][DC] < 0.99 * _best_baseline(row, key), (key, row[key])


@pytest.mark.parametrize("nfe", [5, 6, 8])
def test_class_conditional_with_guidance(conditional, nfe):
    """Scale 7.5. Measured medians 0.094 / 0.089 / 0.056 vs the best baseline's 0.108 / 0.101 / 0.083; RMS
    against UniPC 0.107 / 0.090 / 0.076 vs 0.165 / 0.309 / 0.084."""
    row = _row(conditional, nfe, 7.5)
    assert row["median_errors"][DC] < 0.95 * _best_baseline(row, "median_errors"), row["median_errors"]
    assert row["errors"][DC] < 0.95 * row["errors"]["UniPC (unipc2-bh2)"], row["errors"]
    plug_in = row["median_errors"]["DC on DPM-Solver++ 2M (searched)"]
    assert plug_in < 0.95 * row["median_errors"]["DPM-Solver++ 2M"]  # DC as a plug-in for DPM-Solver++


def test_cpr_recovers_the_searched_gain_off_the_grid(conditional):
    """CPR fitted on NFE {5, 6, 8} × scale {1, 7.5} predicts NFE 7. Measured recovery: 87 % / 87 % (RMS /
    median) at scale 1, 42 % / 59 % at 7.5 (the RMS there again set by a few samples)."""
    assert _row(conditional, 7, 1.0)["cpr_recovery"] >= 0.5
    assert _row(conditional, 7, 1.0)["cpr_recovery_median"] >= 0.5
    assert _row(conditional, 7, 7.5)["cpr_recovery_median"] >= 0.5
    # the CPR ratios were predicted, not searched: they differ from the searched ones
    unseen = _row(conditional, 7, 7.5)
    assert unseen["unseen"] and unseen["cpr_ratios"] != pytest.approx(unseen["ratios"], abs=1e-3)


def test_joint_refinement_beats_every_baseline_on_digits_under_strong_guidance():
    """The digits claim of docs/dc_solver.md at its hardest point, in small: guidance 7.5, NFE 5, where the paper's greedy
    search loses to DPM-Solver++ 2M and the joint refinement beats it (docs/dc_solver.md, 256 noises: 0.151 vs 0.171).
    32 noises and a 300-step reference here."""
    report = evaluate_dc(
        load_model("digits"),
        nfes=(5,),
        guidance_scales=(7.5,),
        num_eval=32,
        reference_steps=300,
        refine_iterations=100,
        cpr=False,
        sample_metrics=False,
    )
    row = _row(report, 5, 7.5)
    refined = row["errors"][REFINED]
    assert refined < 0.95 * _best_baseline(row, "errors"), row["errors"]
    assert refined < row["errors"][DC], row["errors"]
