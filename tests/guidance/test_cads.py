"""CADS (Sadat et al. 2024): the schedule γ(t) of eq. 1, the noising and rescale of eqs. 2–4, the guidance on the
digits UNet's class embedding (plain CFG at s = 0 and at γ ≡ 1, the unconditional branch untouched, per-sample
draws, determinism), the spec and its errors."""

import pytest
import torch

from diffsamplers import DPMSolverPlusPlus, sample
from diffsamplers.apps.recipes import parse_guidance
from diffsamplers.apps.registry import load_model
from diffsamplers.guidance.cads import CADS, anneal_condition, cads_gamma, class_embedding_input
from diffsamplers.schedules import build_schedule

pytestmark = pytest.mark.usefixtures("single_thread")

SCALE = 7.5
STEPS = 6  # linspace: normalised times 1, 0.83, 0.67, 0.5, 0.33, 0.17 → γ = 0, 0.23, 0.78, 1, 1, 1 at the defaults


@pytest.fixture(scope="module")
def digits():
    return load_model("digits")


def test_gamma_at_the_breakpoints():
    assert cads_gamma(1.0, 0.6, 0.9) == 0.0  # pure noise at the start
    assert cads_gamma(0.9, 0.6, 0.9) == 0.0
    assert cads_gamma(0.75, 0.6, 0.9) == pytest.approx(0.5)
    assert cads_gamma(0.6, 0.6, 0.9) == 1.0
    assert cads_gamma(0.0, 0.6, 0.9) == 1.0
    times = torch.linspace(0, 1, 101).tolist()
    values = [cads_gamma(t, 0.6, 0.9) for t in times]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone: clean late, noisy early
    assert [cads_gamma(t, 0.5, 0.5) for t in (0.49, 0.5, 0.51)] == [1.0, 1.0, 0.0]  # τ1 = τ2: a step
    assert CADS(tau1=1.0, tau2=1.0).gamma(1.0) == 1.0


def test_anneal_condition_equations():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 7, 5, generator=g) * torch.tensor([0.5, 2.0, 1.0]).view(3, 1, 1) + 1.0
    n = torch.randn(3, 7, 5, generator=g)
    # s = 0, γ > 0, ψ = 1: the rescale undoes √γ (eq. 3), y comes back to float32 rounding
    assert torch.allclose(anneal_condition(y, 0.3, n, 0.0, 1.0), y, atol=1e-5, rtol=0)
    # ψ = 0: eq. 2 alone
    assert torch.allclose(anneal_condition(y, 0.3, n, 0.25, 0.0), 0.3**0.5 * y + 0.25 * 0.7**0.5 * n, atol=1e-6)
    # ψ = 1 keeps each sample's own mean and std (per sample, not over the batch)
    out = anneal_condition(y, 0.0, n, 0.25, 1.0)
    assert torch.allclose(out.mean(dim=(1, 2)), y.mean(dim=(1, 2)), atol=1e-5)
    assert torch.allclose(out.std(dim=(1, 2)), y.std(dim=(1, 2)), atol=1e-5)
    scaled = y.clone()
    scaled[0] *= 100.0
    assert torch.equal(anneal_condition(scaled, 0.4, n, 0.25, 1.0)[1:], anneal_condition(y, 0.4, n, 0.25, 1.0)[1:])
    # γ = 0, ψ = 1: the normalised noise with y's statistics (s drops out), and half way for ψ = 0.5
    z = (n - n.mean(dim=(1, 2), keepdim=True)) / n.std(dim=(1, 2), correction=0, keepdim=True)
    expected = z * y.std(dim=(1, 2), correction=0, keepdim=True) + y.mean(dim=(1, 2), keepdim=True)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(anneal_condition(y, 0.0, n, 0.25, 0.5), 0.5 * (expected + 0.25 * n), atol=1e-5)
    assert anneal_condition(y, 1.0, None, 0.25, 1.0) is y


def test_rescale_nan_guard_is_per_sample():
    y = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    n = torch.randn(2, 16, generator=torch.Generator().manual_seed(2))
    y[0] *= 1e25  # its variance overflows float32: the rescale of sample 0 is not finite
    out = anneal_condition(y, 0.5, n, 0.1, 1.0)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], 0.5**0.5 * y[0] + 0.1 * 0.5**0.5 * n[0])  # sample 0 keeps ŷ (eq. 2)
    assert torch.allclose(out[1].std(), y[1].std(), atol=1e-5)  # sample 1 is rescaled


def test_class_embedding_input_keeps_the_labels_numbers(digits):
    unet = digits.denoiser.model
    embed = class_embedding_input(unet)
    assert class_embedding_input(unet) == embed  # once: the same module
    x, labels = torch.randn(3, 1, 16, 16), torch.tensor([0, 4, 10])
    with torch.no_grad():
        by_label = unet(x, 500, class_labels=labels).sample
        by_embedding = unet(x, 500, class_labels=embed(labels)).sample
    assert torch.equal(by_label, by_embedding)
    assert list(unet.state_dict()).count("class_embedding.weight") == 1


def _run(bundle, guidance=None, n: int = 6, batch_size: int | None = None, seed: int = 100) -> torch.Tensor:
    labels = torch.arange(n) % bundle.num_classes
    cond, uncond = bundle.conditions(labels, SCALE)
    return sample(
        bundle.denoiser,
        DPMSolverPlusPlus(2),
        build_schedule(bundle.process, STEPS, "linspace"),
        shape=(n, *bundle.sample_shape),
        seeds=range(seed, seed + n),
        batch_size=batch_size,
        cond=cond,
        uncond=uncond,
        guidance_scale=SCALE,
        guidance=guidance,
        progress=False,
    )


def _times(bundle) -> list[float]:
    process = bundle.process
    sigmas = build_schedule(process, STEPS, "linspace").sigmas[:STEPS]
    return [float(process.t_from_sigma_tilde(s)) / process.t_max for s in sigmas]


def _cads(bundle, spec: str) -> CADS:
    (guidance,) = parse_guidance(f"{SCALE}+{spec}").build(bundle)
    assert isinstance(guidance, CADS)
    return guidance


def test_plain_cfg_at_s_zero_and_gamma_one(digits):
    cfg = _run(digits)
    assert torch.equal(_run(digits, _cads(digits, "cads:s=0")), cfg)
    # τ1 = τ2 = 1: γ ≡ 1, the class embedding goes through the network in place of the label
    assert torch.allclose(_run(digits, _cads(digits, "cads:tau1=1,tau2=1,s=0.25")), cfg, atol=1e-5, rtol=0)
    assert (_run(digits, _cads(digits, "cads:s=0.25")) - cfg).abs().max() > 0.05


def test_only_the_conditional_input_is_annealed(digits):
    unet = digits.denoiser.model
    cads = _cads(digits, "cads:s=0.25")
    embed = cads.embeddings["class_labels"]
    seen: list[torch.Tensor] = []
    hook = unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["class_labels"]), with_kwargs=True)
    try:
        _run(digits, cads, n=4)
    finally:
        hook.remove()
    clean = embed(torch.arange(4))
    null = embed(torch.tensor([digits.null_class])).expand(4, -1)
    assert len(seen) == STEPS
    for k, labels in enumerate(seen):
        uncond, cond = labels.chunk(2)
        assert torch.equal(uncond, null)  # the unconditional half: the clean null embedding, every step
        gamma = cads.gamma(_times(digits)[k])
        assert torch.equal(cond, clean) == (gamma == 1.0)
    first = seen[0].chunk(2)[1]  # γ(1) = 0: the label is gone, only its statistics are left
    assert torch.allclose(first.std(dim=1), clean.std(dim=1), atol=1e-5)
    assert torch.nn.functional.cosine_similarity(first - first.mean(1, keepdim=True), clean).abs().max() < 0.6

    both, seen = _cads(digits, "cads:s=0.25,both=true"), []
    hook = unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["class_labels"]), with_kwargs=True)
    try:
        _run(digits, both, n=4)
    finally:
        hook.remove()
    assert not torch.equal(seen[0].chunk(2)[0], null) and torch.equal(seen[-1].chunk(2)[0], null)


def test_draws_are_per_sample_and_deterministic(digits):
    cads = _cads(digits, "cads:s=0.25")
    whole = _run(digits, cads)
    assert torch.allclose(_run(digits, cads, batch_size=2), whole, atol=1e-5, rtol=0)
    assert torch.equal(_run(digits, cads), whole)  # the same seeds, the same samples
    assert not torch.allclose(_run(digits, cads, seed=200), whole, atol=1e-2)


def test_spec_errors_name_the_value(digits):
    bad = {
        "cads:tau1=0.95": "tau1 ≤ tau2, got tau1=0.95 > tau2=0.9",
        "cads:tau2=1.5": r"tau2 must lie in \[0, 1\], got 1.5",
        "cads:tau1=-0.1,tau2=0.5": r"tau1 must lie in \[0, 1\], got -0.1",
        "cads:s=-0.1": "noise scale s must be ≥ 0, got -0.1",
        "cads:psi=2": r"psi must lie in \[0, 1\], got 2",
        "cads:both=maybe": "'both' must be true or false, got 'maybe'",
        "cads:sigma=1": "bad option",
    }
    for spec, message in bad.items():
        with pytest.raises(ValueError, match=message):
            parse_guidance(f"7.5+{spec}").build(digits)
    with pytest.raises(ValueError, match="'gmm-cond' has no learned class embedding"):
        parse_guidance("7.5+cads").build(load_model("gmm-cond"))
    with pytest.raises(ValueError, match="'gmm' is unconditional"):
        parse_guidance("cads").build(load_model("gmm"))
    with pytest.raises(ValueError, match=r"no condition embedding to anneal in \['class_labels'\]"):
        _run(digits, CADS())  # labels without an embedding
    with pytest.raises(ValueError, match=r"cond\['class_labels'\] holds integer labels"):
        _run(digits, CADS(keys=["class_labels"]))


def test_float_conditions_are_annealed_as_they_are():
    """A text-embedding-like float condition (no embedding map), nested keys, and the repr names the branch."""
    cads = CADS(noise_scale=0.25, keys=["encoder_hidden_states", "added.text_embeds"])
    y = torch.randn(2, 4, 8)
    out = cads.anneal(y, 1.0, lambda shape, device, dtype: torch.randn(2, *shape, dtype=dtype))
    assert out.shape == y.shape and not torch.allclose(out, y)
    assert torch.equal(cads.anneal(y, 0.5, lambda *a: pytest.fail("no draw at γ = 1")), y)
    assert "both=False" in repr(cads)
