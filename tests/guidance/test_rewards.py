"""The shipped rewards and the reward specs: the digits classifier's class probability on held-out digits, the pixel
mass in closed form, ``package.module:function`` imports, and the errors for bad specs."""

from __future__ import annotations

import sys

import pytest
import torch

from diffsamplers.apps.recipes import REWARDS, describe_rewards, parse_reward
from diffsamplers.apps.registry import load_model
from diffsamplers.data.digits import load_digits_dataset
from diffsamplers.guidance.rewards import DigitsClassProbability, PixelMass

pytestmark = pytest.mark.usefixtures("single_thread")


def squared_norm(x: torch.Tensor) -> torch.Tensor:
    """A reward for the import test: −‖x‖² per sample."""
    return -(x.flatten(1) ** 2).sum(1)


NOT_CALLABLE = 3.0


@pytest.fixture(scope="module")
def held_out():
    return load_digits_dataset("test")


@pytest.fixture(scope="module")
def rewards():
    """digits-class:C for every digit (one classifier load each, as the spec builds them)."""
    return [parse_reward(f"digits-class:{c}") for c in range(10)]


def test_digits_class_probability_scores_held_out_digits(held_out, rewards):
    """On the 359 held-out digits (in [−1, 1], the digits model's data space) the ten rewards are the classifier's
    softmax: they sum to 1, the largest names the true digit for ≥ 95 % (the classifier's held-out accuracy is 98 %),
    and the probability of 3 is high on the 3s and low on the rest."""
    images, labels = held_out
    probs = torch.stack([r(images) for r in rewards], dim=1)
    assert probs.shape == (len(labels), 10) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(1), torch.ones(len(labels)), atol=1e-5)
    assert float((probs.argmax(1) == labels).double().mean()) >= 0.95
    three = rewards[3](images)
    assert float(three[labels == 3].mean()) > 0.9 and float(three[labels != 3].mean()) < 0.05
    assert rewards[3].__name__ == "digits-class:3"


def test_digits_class_probability_clips_and_takes_any_float_dtype(held_out, rewards):
    images = held_out[0][:16]
    saturated = images.sign() * 5.0  # outside [−1, 1]: clipped to ±1, as an image file would
    assert torch.equal(rewards[3](saturated), rewards[3](images.sign()))
    assert torch.allclose(rewards[3](images.double()), rewards[3](images), atol=1e-6)
    with pytest.raises(ValueError, match=r"'digits-class:3' scores \(B, 1, 16, 16\) digits images.*\(4, 1, 8, 8\)"):
        rewards[3](torch.zeros(4, 1, 8, 8))


def test_digits_class_probability_is_differentiable(held_out, rewards):
    x = held_out[0][:4].clone().clamp(-0.99, 0.99).requires_grad_(True)
    rewards[3](x).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert all(not p.requires_grad for p in rewards[3].classifier.parameters())


@pytest.mark.parametrize("value", [-1.0, -0.5, 0.0, 0.25, 1.0])
def test_pixel_mass_in_closed_form(value):
    x = torch.full((3, 1, 4, 4), value)
    expected = torch.full((3,), (value + 1) / 2)
    assert torch.allclose(PixelMass()(x), expected, atol=1e-7)
    assert torch.allclose(PixelMass(-1)(x), 1 - expected, atol=1e-7)


def test_pixel_mass_per_sample_on_any_shape():
    x = torch.tensor([[-1.0, 1.0, 3.0, -2.0], [0.0, 0.0, 0.5, 0.5]])  # 3 and −2 are clipped to ±1
    assert torch.allclose(PixelMass()(x), torch.tensor([0.5, 0.625]))
    assert PixelMass()(x.double()).dtype == torch.float64
    assert (PixelMass().__name__, PixelMass(-1).__name__) == ("pixel-mass", "pixel-mass:-1")
    with pytest.raises(ValueError, match="sign must be 1 or -1, got 2"):
        PixelMass(2)
    with pytest.raises(ValueError, match=r"scores a batch \(B, \*shape\), got shape \(4,\)"):
        PixelMass()(torch.zeros(4))


def test_reward_specs_build_the_shipped_rewards():
    assert set(REWARDS) == {"digits-class", "pixel-mass", "text-chars"}
    mass = parse_reward("pixel-mass")
    assert isinstance(mass, PixelMass) and mass.sign == 1
    assert parse_reward(" pixel-mass:-1 ").sign == -1 and parse_reward("pixel-mass:1").sign == 1
    digits = parse_reward("digits-class:7", load_model("digits"))
    assert isinstance(digits, DigitsClassProbability) and digits.target == 7


def test_reward_spec_imports_a_callable():
    assert parse_reward(f"{__name__}:squared_norm") is squared_norm
    assert parse_reward("torch.linalg:norm") is torch.linalg.norm
    assert parse_reward("torch:linalg.norm") is torch.linalg.norm  # dotted attributes


def test_reward_spec_errors(tmp_path, monkeypatch):
    known = describe_rewards()
    assert "digits-class:C" in known and "pixel-mass[:-1]" in known and "package.module:function" in known
    (tmp_path / "broken_reward_module.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "broken_reward_module", raising=False)
    cases = {
        "digits-clas:3": f"unknown reward 'digits-clas:3': expected {known}",
        "clip": "unknown reward 'clip'",
        "digits-class": "reward 'digits-class': name the digit",
        "digits-class:x": "name the digit whose probability it is, e.g. digits-class:3, got 'x'",
        "digits-class:12": "the class must be a digit in 0..9, got 12",
        "pixel-mass:2": "reward 'pixel-mass:2': the sign is 1 (bright) or -1 (dark), got '2'",
        "no_such_module_xyz:f": "reward 'no_such_module_xyz:f': no module 'no_such_module_xyz' to import",
        f"{__name__}:missing": f"module '{__name__}' has no attribute 'missing'",
        f"{__name__}:NOT_CALLABLE": f"{__name__}.NOT_CALLABLE is a float, not a callable",
        "broken_reward_module:f": "importing 'broken_reward_module' failed (RuntimeError: no GPU here)",
    }
    for spec, message in cases.items():
        with pytest.raises(ValueError) as err:
            parse_reward(spec)
        assert message in str(err.value) and "\n" not in str(err.value), (spec, str(err.value))


def test_digits_class_refuses_another_model():
    with pytest.raises(ValueError, match=r"scores 1×16×16 digits images.*model 'gmm-cond' makes samples of shape"):
        parse_reward("digits-class:3", load_model("gmm-cond"))
