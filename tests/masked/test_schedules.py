"""Masking schedules: boundary values, monotonicity, the inverse, specs, and bad parameters."""

from __future__ import annotations

import math

import pytest
import torch

from diffsamplers.masked.schedules import (
    CosineMasking,
    LinearMasking,
    LogLinearMasking,
    PolynomialMasking,
    masking_schedule,
)

SCHEDULES = [LinearMasking(), CosineMasking(), PolynomialMasking(p=2.0), PolynomialMasking(p=0.5), LogLinearMasking()]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.spec)
def test_boundaries_monotonicity_and_inverse(schedule):
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    m = schedule.mask_probability(t)
    assert m[0] == 0.0 and abs(float(m[-1]) - schedule.m_max) < 1e-15
    assert (m.diff() > 0).all()
    assert torch.allclose(schedule.inverse(m), t, atol=1e-12, rtol=0)
    assert torch.allclose(schedule.alpha(t), 1 - m)
    # floats in, floats out, the same numbers
    assert schedule.mask_probability(0.3) == pytest.approx(float(m[300]), abs=1e-15)
    assert isinstance(schedule.inverse(0.25), float)


def test_closed_forms():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(CosineMasking()(t), 1 - torch.cos(math.pi * t / 2), atol=1e-15)
    assert torch.allclose(PolynomialMasking(p=3)(t), t**3)
    eps = 1e-3
    loglinear = LogLinearMasking(eps=eps)
    assert torch.allclose(loglinear.alpha(t), torch.exp(-loglinear.sigma(t)), atol=1e-15)
    assert torch.allclose(loglinear(t), (1 - eps) * t)
    # tiny times: no cancellation in the cosine schedule (first-hitting times of long sequences go there)
    assert CosineMasking().inverse(CosineMasking()(1e-9)) == pytest.approx(1e-9, rel=1e-9)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.spec)
def test_spec_round_trip(schedule):
    assert masking_schedule(schedule.spec) == schedule


def test_bad_parameters_name_the_value():
    with pytest.raises(ValueError, match="p=-1"):
        PolynomialMasking(p=-1)
    with pytest.raises(ValueError, match="p=0"):
        masking_schedule("poly:p=0")
    with pytest.raises(ValueError, match="eps=1"):
        LogLinearMasking(eps=1.0)
    with pytest.raises(ValueError, match="'zigzag'"):
        masking_schedule("zigzag")
    with pytest.raises(ValueError, match="takes no options"):
        masking_schedule("cosine:p=2")
    with pytest.raises(ValueError, match="1.5"):
        LinearMasking().mask_probability(1.5)
    with pytest.raises(ValueError, match="exceeds m\\(1\\)"):
        LogLinearMasking(eps=0.1).inverse(0.95)
