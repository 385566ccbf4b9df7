"""The denoiser: prediction types, classifier-free guidance in one call, calling conventions, bad input."""

import pytest
import torch

from diffsamplers import Denoiser
from diffsamplers.models.gmm import default_mixture, default_process
from diffsamplers.noise import RectifiedFlow
from diffsamplers.prediction import PREDICTION_TYPES, check_prediction_type, from_x0, to_x0

PROCESS = default_process()
GMM = default_mixture()


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_conversions_are_inverse(prediction_type):
    x, x0 = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    a, s = (0.3, 0.7) if prediction_type == "flow_prediction" else (0.6, 0.8)  # flow: α + σ = 1; v: α² + σ² = 1
    out = from_x0(x0, x, a, s, prediction_type)
    assert torch.allclose(to_x0(out, x, a, s, prediction_type), x0, atol=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_denoiser_recovers_the_exact_prediction(prediction_type):
    den = Denoiser(GMM.as_model(PROCESS, prediction_type), PROCESS, prediction_type)
    x = torch.randn(4, *GMM.sample_shape, dtype=torch.float64)
    for t in (999.0, 500.0, 3.0, 250.5):
        a, s = (float(v) for v in PROCESS.alpha_sigma(PROCESS.sigma_tilde(t)))
        assert torch.allclose(den(x, t), GMM.denoise(x, a, s), atol=1e-8)
    eps = den.epsilon(x, 500.0)
    a, s = (float(v) for v in PROCESS.alpha_sigma(PROCESS.sigma_tilde(500.0)))
    assert torch.allclose(eps, (x - a * GMM.denoise(x, a, s)) / s, atol=1e-8)


def test_flow_prediction_on_rectified_flow():
    flow = RectifiedFlow()
    den = Denoiser(GMM.as_model(flow, "flow_prediction"), flow, "flow")
    x = torch.randn(2, *GMM.sample_shape, dtype=torch.float64)
    a, s = 0.7, 0.3
    assert torch.allclose(den(x, 0.3), GMM.denoise(x, a, s), atol=1e-9)


def test_per_sample_times():
    den = Denoiser(GMM.as_model(PROCESS, "epsilon"), PROCESS, "epsilon")
    x = torch.randn(3, *GMM.sample_shape, dtype=torch.float64)
    t = torch.tensor([900.0, 400.0, 20.0]).numpy()
    batched = den(x, t)
    for i in range(3):
        assert torch.allclose(batched[i : i + 1], den(x[i : i + 1], float(t[i])), atol=1e-9)


class _CondModel(torch.nn.Module):
    """ε = x·t/1000 + label; records its calls."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, sample, timestep, class_labels=None):
        self.calls.append(sample.shape[0])
        out = sample * timestep.view(-1, 1, 1, 1) / 1000 * self.scale
        return out + class_labels.view(-1, 1, 1, 1).to(out.dtype)


def test_classifier_free_guidance_is_one_batched_call():
    model = _CondModel()
    den = Denoiser(model, PROCESS, "epsilon", guidance_scale=3.0)
    x = torch.randn(4, 1, 2, 2)
    cond, uncond = {"class_labels": torch.tensor([1, 2, 3, 4])}, {"class_labels": torch.tensor([0])}
    with torch.no_grad():
        guided = den(x, 500.0, cond=cond, uncond=uncond)
        assert model.calls == [8]
        c = den(x, 500.0, cond=cond, guidance_scale=1.0)
        u = den(x, 500.0, cond={"class_labels": torch.zeros(4, dtype=torch.long)}, guidance_scale=1.0)
    assert torch.allclose(guided, u + 3.0 * (c - u), atol=1e-5)


def test_transformer_style_keyword_timestep():
    class Transformer(torch.nn.Module):
        def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, return_dict=True):
            assert timestep is not None and timestep.shape == (hidden_states.shape[0],)
            return (hidden_states * 0 + encoder_hidden_states.mean(),)

    den = Denoiser(Transformer(), PROCESS, "sample")
    out = den(torch.zeros(2, 3), 10.0, cond={"encoder_hidden_states": torch.ones(2, 4)})
    assert torch.allclose(out, torch.ones(2, 3))


def test_learned_variance_channels_are_dropped():
    model = lambda x, t: torch.cat([torch.zeros_like(x), torch.full_like(x, 99.0)], dim=1)
    den = Denoiser(model, PROCESS, "sample")
    assert torch.equal(den(torch.ones(2, 3, 4, 4), 5.0), torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="does not match the sample shape"):
        Denoiser(model, PROCESS, "sample", learned_variance=False)(torch.ones(2, 3, 4, 4), 5.0)


def test_fp16_model_gives_float32_prediction():
    lin = torch.nn.Conv2d(3, 3, 1).half()

    class Half(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x, t):
            return self.lin(x)

    den = Denoiser(lambda x, t: lin(x), PROCESS, "epsilon")
    den_mod = Denoiser(Half(), PROCESS, "epsilon")
    x = torch.randn(2, 3, 4, 4)
    assert den_mod.model_dtype == torch.float16
    with pytest.raises(RuntimeError):
        den(x, 10.0)  # a plain callable gets the sample as is (float32 into an fp16 conv fails)
    assert den_mod(x, 10.0).dtype == torch.float32


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: Denoiser(lambda x, t: x, PROCESS, "noise"), ValueError, "unknown prediction_type 'noise'"),
        (lambda: check_prediction_type(None), ValueError, "unknown prediction_type None"),
        (lambda: Denoiser(42, PROCESS), TypeError, "model must be callable"),
        (lambda: Denoiser(lambda x, t: x, "vp"), TypeError, "process must be a NoiseProcess"),
        (
            lambda: Denoiser(lambda x, t: x[:, :2], PROCESS)(torch.ones(2, 3, 4, 4), 5.0),
            ValueError,
            r"model output shape \(2, 2, 4, 4\) does not match the sample shape \(2, 3, 4, 4\)",
        ),
        (lambda: Denoiser(lambda x, t: None, PROCESS)(torch.ones(2, 3), 5.0), TypeError, "not a tensor"),
        (
            lambda: Denoiser(_CondModel(), PROCESS, guidance_scale=2.0)(
                torch.ones(2, 1, 2, 2),
                5.0,
                cond={"class_labels": torch.ones(3)},
                uncond={"class_labels": torch.ones(3)},
            ),
            ValueError,
            "do not match the sample batch 2",
        ),
    ],
)
def test_bad_input(make, error, message):
    with pytest.raises(error, match=message):
        make()
