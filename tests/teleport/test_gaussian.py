"""Gaussian teleportation: the closed form against SciPy, statistics estimation and files, the handover."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from diffsamplers import DPMSolverPlusPlus, sample
from diffsamplers.data import load_digits_dataset
from diffsamplers.models.gmm import GaussianMixture, default_mixture, default_process, reference_solution
from diffsamplers.noise import RectifiedFlow, VarianceExploding
from diffsamplers.schedules import karras, uniform_logsnr
from diffsamplers.teleport.gaussian import GaussianDenoiser, GaussianTeleport, choose_skip, gaussian_flow
from diffsamplers.teleport.statistics import (
    GaussianStatistics,
    class_statistics,
    load_class_statistics,
    save_class_statistics,
)
from tests.helpers import rms

# Small-tensor ops (SciPy's ODE right-hand sides above all): one thread, see the fixture.
pytestmark = pytest.mark.usefixtures("single_thread")


def _random_stats(d=6, rank=None, rho=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    lam = torch.exp(torch.linspace(math.log(2.0), math.log(0.01), d, dtype=torch.float64))
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    r = d if rank is None else rank
    return GaussianStatistics(mu, lam[:r], u[:, :r], rho if r < d else 0.0, (d,))


def _alpha_and_derivative(scaling, s):
    if scaling == "vp":
        return 1 / math.sqrt(1 + s * s), -s / (1 + s * s) ** 1.5
    if scaling == "ve":
        return 1.0, 0.0
    return 1 / (1 + s), -1 / (1 + s) ** 2


def _scipy_flow(stats, process, x, s_from, s_to):
    """The PF-ODE of N(μ, Σ) in the process's own scaling x = α(σ̃) y, integrated over log σ̃ with DOP853:
    dx/dσ̃ = (α'/α) x + α (y − D(y; σ̃))/σ̃, D(y; σ̃) = μ + Σ (Σ + σ̃² I)⁻¹ (y − μ) (Karras et al. 2022, Eq. 4)."""
    cov, mu = stats.covariance().numpy(), stats.mean.numpy()
    eye = np.eye(stats.dim)

    def rhs(tau, flat):
        s = math.exp(tau)
        a, da = _alpha_and_derivative(process.scaling, s)
        xs = flat.reshape(-1, stats.dim)
        y = xs / a
        d = mu + np.linalg.solve(cov + s * s * eye, (y - mu).T).T @ cov.T
        dx_ds = (da / a) * xs + a * (y - d) / s
        return (s * dx_ds).reshape(-1)

    sol = solve_ivp(rhs, (math.log(s_from), math.log(s_to)), x.numpy().reshape(-1), "DOP853", rtol=1e-12, atol=1e-12)
    assert sol.success
    return torch.from_numpy(sol.y[:, -1].reshape(x.shape))


@pytest.mark.parametrize(
    "process, s_from, s_to",
    [(default_process(), 157.0, 0.3), (VarianceExploding(0.002, 80.0), 80.0, 0.05), (RectifiedFlow(), 999.0, 0.2)],
    ids=["vp", "ve", "flow"],
)
@pytest.mark.parametrize("kind", ["full", "low_rank_isotropic", "low_rank"])
def test_closed_form_matches_scipy(process, s_from, s_to, kind):
    stats = {
        "full": _random_stats(),
        "low_rank_isotropic": _random_stats(rank=2, rho=0.05),
        "low_rank": _random_stats(rank=3, rho=0.0),
    }[kind]
    a_from = float(process.alpha_sigma(s_from)[0])
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * s_from * a_from
    x = x + a_from * stats.mean
    ours = gaussian_flow(stats, process, x, s_from, s_to)
    assert float((ours - _scipy_flow(stats, process, x, s_from, s_to)).abs().max()) < 1e-6
    # The flow composes: from → mid → to equals from → to.
    mid = gaussian_flow(stats, process, gaussian_flow(stats, process, x, s_from, 3.0), 3.0, s_to)
    assert torch.allclose(mid, ours, atol=1e-10)


def test_statistics_from_data_tensor_and_stream():
    x, _ = load_digits_dataset("all")
    flat = x.reshape(len(x), -1).double()
    exact = GaussianStatistics.from_data(x, batch_size=4096)
    assert exact.sample_shape == (1, 16, 16) and exact.num_samples == 1797
    assert torch.allclose(exact.mean, flat.mean(0), atol=1e-12)
    assert torch.allclose(exact.covariance(), torch.cov(flat.T), atol=1e-12)
    # A stream of uneven batches (a generator, read once) gives the same moments.
    stream = (x[i : i + n] for i, n in zip(range(0, 1797, 250), [250] * 7 + [47]))
    streamed = GaussianStatistics.from_data(stream)
    assert torch.allclose(streamed.covariance(), exact.covariance(), atol=1e-12)
    # Low rank + isotropic from the exact covariance keeps the total variance.
    low = exact.truncate(16)
    eig = torch.linalg.eigvalsh(torch.cov(flat.T)).flip(0)  # descending
    assert low.rank == 16 and torch.allclose(low.eigvals, eig[:16], rtol=1e-9)
    assert low.residual_variance == pytest.approx(float(eig[16:].mean()), rel=1e-9)  # the discarded variance, spread
    assert float(low.eigvals.sum()) + low.residual_variance * (256 - 16) == pytest.approx(float(flat.var(0).sum()))
    # The single-pass Nyström sketch finds the leading eigenpairs and the exact trace.
    sketch = GaussianStatistics.from_data((x[i : i + 300] for i in range(0, 1797, 300)), rank=16, method="sketch")
    assert torch.allclose(sketch.mean, exact.mean, atol=1e-12)
    assert torch.allclose(sketch.eigvals[:8], exact.eigvals[:8], rtol=1e-2)
    assert float(torch.linalg.svdvals(sketch.eigvecs[:, :8].T @ exact.eigvecs[:, :8]).min()) > 0.99
    total = float(sketch.eigvals.sum()) + sketch.residual_variance * (256 - 16)
    assert total == pytest.approx(float(flat.var(0).sum()), rel=1e-10)


def test_statistics_of_a_gaussian_mixture():
    gmm = GaussianMixture.random((1, 3, 3), num_components=3, seed=4)
    stats = GaussianStatistics.from_gmm(gmm)
    draws = gmm.sample(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64).flatten(1)
    assert torch.allclose(stats.mean, draws.mean(0), atol=3e-3)
    assert torch.allclose(stats.covariance(), torch.cov(draws.T), atol=3e-3)
    single = GaussianMixture(gmm.means[:1], gmm.eigvals[:1], gmm.eigvecs[:1], torch.ones(1, dtype=torch.float64), (9,))
    one = GaussianStatistics.from_gmm(single)
    cov = (single.eigvecs[0] * single.eigvals[0]) @ single.eigvecs[0].T
    assert torch.allclose(one.covariance(), cov, atol=1e-12) and torch.equal(one.mean, single.means[0])


def test_covariance_checks_and_repair():
    cov = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.9], [0.0, 0.9, 1.0]], dtype=torch.float64)  # eigenvalue −0.27
    with pytest.warns(RuntimeWarning, match=r"not positive semi-definite: smallest eigenvalue -0\.27"):
        repaired = GaussianStatistics.from_moments(torch.zeros(3), cov)
    assert float(repaired.eigvals.min()) == 0.0
    assert float(torch.linalg.eigvalsh(repaired.covariance()).min()) > -1e-12
    with pytest.raises(ValueError, match=r"not positive semi-definite: smallest eigenvalue -0\.27"):
        GaussianStatistics.from_moments(torch.zeros(3), cov, psd="error")
    with pytest.raises(ValueError, match="not symmetric"):
        GaussianStatistics.from_moments(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="NaN"):
        GaussianStatistics.from_moments(torch.zeros(2), torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        GaussianStatistics.from_data(torch.full((4, 3), float("inf")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # round-off negatives of a PSD matrix are clipped silently
        GaussianStatistics.from_moments(torch.zeros(3), torch.ones(3, 3))


def test_save_and_load(tmp_path):
    stats = _random_stats(d=8, rank=3, rho=0.02)
    path = stats.save(tmp_path / "stats.safetensors")
    back = GaussianStatistics.load(path)
    assert torch.equal(back.mean, stats.mean) and torch.equal(back.eigvecs, stats.eigvecs)
    assert back.residual_variance == stats.residual_variance and back.sample_shape == (8,)
    assert [p.name for p in tmp_path.iterdir()] == ["stats.safetensors"]  # no temporary file left behind
    from diffsamplers.artifacts import save_artifact

    save_artifact(tmp_path / "other.safetensors", {"x": torch.zeros(1)}, {"kind": "learned_schedule"})
    with pytest.raises(ValueError, match="holds 'learned_schedule', not 'gaussian_statistics'"):
        GaussianStatistics.load(tmp_path / "other.safetensors")


def test_teleport_is_exact_for_gaussian_data():
    """With Gaussian data the skipped part is exact: teleporting never increases the error, and the criterion
    skips as much as it is allowed to."""
    stats = GaussianStatistics.from_gmm(default_mixture()).truncate(64)
    process = default_process()
    gauss = GaussianDenoiser(stats, process)
    sched = karras(process, 12, final="append_zero")
    x_T = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = gaussian_flow(stats, process, x_T, float(sched.sigmas[0]), 0.0)
    full = sample(gauss, DPMSolverPlusPlus(2), sched, x_T=x_T, dtype=torch.float64, progress=False)
    errors = [rms(full, exact)]
    for k in (2, 4, 6):
        tele = GaussianTeleport(stats, skip=k).sample(
            gauss, DPMSolverPlusPlus(2), sched, x_T=x_T, dtype=torch.float64, progress=False
        )
        errors.append(rms(tele, exact))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    choice = choose_skip(gauss, stats, sched, tolerance=1e-6, max_fraction=0.5)
    assert choice.skip == 6 and max(choice.errors) < 1e-9  # the float32 rounding of the model's x̂0


def test_skip_criterion_and_handover_on_the_mixture():
    gmm, process = default_mixture(), default_process()
    den = gmm.as_denoiser(process)
    stats = GaussianStatistics.from_gmm(gmm)
    sched = karras(process, 20, final="append_zero")
    # The teleport level falls from 3.4 (tolerance 0.005) to 1.4 (0.05) on this mixture; with the default cap of
    # half the evaluations every tolerance skips 10 of the 20 (e = 1.7e-3 at σ̃_10 = 4.7).
    capped = choose_skip(den, stats, sched, tolerance=0.01)
    assert capped.skip == 10 and capped.errors[0] == 0.0 and max(capped.errors) < 3e-3
    tight = choose_skip(den, stats, sched, tolerance=0.005, max_fraction=1.0)
    loose = choose_skip(den, stats, sched, tolerance=0.05, max_fraction=1.0)
    assert (tight.skip, loose.skip) == (10, 12)  # levels 3.4 and 1.4 on this grid
    for choice in (tight, loose):  # the landing level passes, the next grid level does not
        assert float(sched.sigmas[choice.skip]) >= choice.level.sigma > float(sched.sigmas[choice.skip + 1])
        assert max(choice.errors) <= choice.tolerance < choice.level.errors[-1]
    # Handover: the teleported start plus the solver on the rest of the grid; the teleport alone is close to the
    # exact flow at the landing level.
    x_T = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigma_k = float(sched.sigmas[tight.skip])
    landed = gaussian_flow(stats, process, x_T, float(sched.sigmas[0]), sigma_k)
    truth = reference_solution(gmm, process, x_T, float(sched.sigmas[0]), sigma_k, rtol=1e-8, atol=1e-8)
    scale = float(truth.std())
    assert rms(landed, truth) < 0.02 * scale
    tele = GaussianTeleport(stats, tolerance=0.01)
    out = tele.sample(den, DPMSolverPlusPlus(2), sched, x_T=x_T.float(), progress=False)
    assert tele.last_choice.skip == capped.skip and out.shape == x_T.shape
    # the saving at equal error: 10 evaluations end as close to the exact solution as all 20 do
    # (measured: RMS 0.00872 teleported against 0.00875 plain, and 0.00094 between the two)
    plain = sample(den, DPMSolverPlusPlus(2), sched, x_T=x_T.float(), progress=False)
    final = reference_solution(gmm, process, x_T, float(sched.sigmas[0]), 0.0)
    assert rms(out, final) < 1.05 * rms(plain, final) and rms(out, plain) < 0.15 * rms(plain, final)
    with pytest.raises(ValueError, match="skip must be a non-negative integer"):
        GaussianTeleport(stats, skip=-1)
    with pytest.raises(ValueError, match="cannot skip 20 of the schedule's 20"):
        GaussianTeleport(stats, skip=20).sample(den, DPMSolverPlusPlus(2), sched, x_T=x_T)
    sigma_tele = GaussianTeleport(stats, sigma_skip=float(sched.sigmas[3]) * 1.0001)
    assert sigma_tele.resolve_skip(den, sched) == 3
    assert uniform_logsnr(process, 5).num_steps == 5


def test_class_conditional_statistics_and_teleport(tmp_path):
    """A class-conditional model teleports each sample with its class's Gaussian"""
    images, labels = load_digits_dataset("all", resolution=8)
    per_class = class_statistics((images, labels), batch_size=500)
    assert sorted(per_class) == list(range(10))
    three = images[labels == 3].reshape(-1, 64).double()
    assert torch.allclose(per_class[3].covariance(), torch.cov(three.T), atol=1e-12)
    back = load_class_statistics(save_class_statistics(tmp_path / "c.safetensors", per_class))
    assert torch.equal(back[7].eigvecs, per_class[7].eigvecs)
    process = default_process()
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lab = torch.tensor([3, 1, 3, 0, 9, 1])
    together = gaussian_flow(per_class, process, x, 157.0, 0.5, lab)
    for i in range(6):
        alone = gaussian_flow(per_class[int(lab[i])], process, x[i : i + 1], 157.0, 0.5)
        assert torch.allclose(together[i : i + 1], alone, atol=1e-12)
    with pytest.raises(ValueError, match="need the class labels"):
        gaussian_flow(per_class, process, x, 157.0, 0.5)
    den = GaussianDenoiser(per_class, process)
    # the probes cycle through the classes
    choice = choose_skip(den, per_class, karras(process, 10, final="append_zero"), tolerance=1e-6)
    assert choice.skip == 5 and max(choice.errors) < 1e-9
