"""The digits model and FD-digits in the model registry; DC-Solver as a sampler of the evaluation jobs;
reference-free evaluation (sample metrics only)."""

import pytest
import torch

from diffsamplers.dc.ratios import DCRatios
from diffsamplers.evaluation.solver_error import evaluate, initial_noise, validation_set
from diffsamplers.evaluation.sources import load_model_source, make_sampler
from diffsamplers.models.registry import fd_digits, load_model, sample_metric


def test_digits_bundle_and_fd_digits():
    bundle = load_model("digits")
    assert bundle.sample_shape == (1, 16, 16)
    x, labels = bundle.data
    assert x.shape == (1438, 1, 16, 16) and labels.shape == (1438,)
    cond = bundle.cond(6, seed=3)
    assert cond["class_labels"].shape == (6,) and torch.equal(
        cond["class_labels"], bundle.cond(6, seed=3)["class_labels"]
    )
    assert sample_metric("fd-digits") is fd_digits
    subset = torch.randperm(1438, generator=torch.Generator().manual_seed(0))[:359]
    real = fd_digits(x[subset])  # a random subset, as large as the held-out split (whose FD-digits is 9.6)
    noise = fd_digits(torch.rand(359, 1, 16, 16) * 2 - 1)
    assert fd_digits(x) < 1e-6 and real < 25.0 and noise > 10 * real


def test_reference_free_evaluation_scores_sample_metrics_only():
    bundle = load_model("gmm")
    exact = validation_set(bundle, 8, seed=1)
    assert exact.reference is not None  # an exact model always has its exact reference
    digits = load_model("digits")
    evaluation = validation_set(digits, 4, seed=1, reference_steps=0)
    assert evaluation.reference is None
    x_T, cond = initial_noise(digits, 4, seed=1)
    assert torch.equal(evaluation.x_T, x_T) and torch.equal(evaluation.cond["class_labels"], cond["class_labels"])
    result = evaluate(digits, evaluation, lambda x, c: torch.zeros_like(x), ())
    assert result == {}
    with pytest.raises(ValueError, match="reference_steps must be >= 0"):
        validation_set(digits, 4, seed=1, reference_steps=-1)


def _ratio_file(path, nfe):
    DCRatios([1.0] * nfe, "digits", 1.0, {}, {}).save(path)
    return path


def test_dc_solver_sampler_from_a_ratio_file(tmp_path):
    source = load_model_source("digits")
    path = _ratio_file(tmp_path / "r4.safetensors", 4)
    dc = make_sampler(source, f"dc-solver:{path}", 4, "linspace/sigma_min", seed=5, batch_size=8)
    unipc = make_sampler(source, "unipc", 4, "linspace/sigma_min", seed=5, batch_size=8)
    with torch.no_grad():
        (a, la), (b, lb) = dc(range(6)), unipc(range(6))
    assert torch.equal(la, lb)
    assert (a.int() - b.int()).abs().max() <= 1  # ratios of 1 are UniPC (up to uint8 rounding)
    with pytest.raises(ValueError, match="ratios for 4 steps, not 6"):
        make_sampler(source, f"dc-solver:{path}", 6, "linspace/sigma_min")
    with pytest.raises(FileNotFoundError, match="no DC-Solver ratios"):
        make_sampler(source, f"dc-solver:{tmp_path / 'missing.safetensors'}", 4)


def test_bundled_cpr_gives_dc_solver_ratios_inside_its_fit_only():
    from diffsamplers.dc.cpr import CascadePolynomialRegression
    from diffsamplers.evaluation.sources import OutsideFitError
    from diffsamplers.models.digits import DIGITS_PIPELINE_DIR

    cpr = CascadePolynomialRegression.load(DIGITS_PIPELINE_DIR / "dc_solver_cpr.safetensors")
    assert cpr.model == "digits" and cpr.nfe_range == (5, 10)
    source = load_model_source("digits")
    run = make_sampler(source, "dc-solver", 6, "linspace/sigma_min", seed=1, batch_size=4)
    with torch.no_grad():
        images, _ = run(range(4))
    assert images.dtype == torch.uint8 and images.shape == (4, 1, 16, 16)
    with pytest.raises(OutsideFitError, match="fitted on NFE 5–10"):
        make_sampler(source, "dc-solver", 20, "linspace/sigma_min")
