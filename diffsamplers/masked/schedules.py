"""Masking schedules of masked (absorbing-state) diffusion: m(t), the probability that a token is masked at time
t ∈ [0, 1] (m(0) = 0, increasing; α(t) = 1 − m(t) is the probability that it is still clean), and its inverse.

The samplers need only ratios m(s)/m(t): the ancestral (MDLM) step keeps a masked token masked with probability
m(s)/m(t) (Sahoo et al., "Simple and Effective Masked Diffusion Language Models", 2024, Eq. 6/7), and the
first-hitting sampler draws the next unmask time by inverting (m(τ)/m(t))^n = u (Zheng et al., "Masked Diffusion
Models are Secretly Time-Agnostic Masked Models and Exploit Inaccurate Categorical Sampling", 2024,
arXiv:2409.02908, Sec. 4.1), hence each schedule's :meth:`MaskingSchedule.inverse`.

* ``linear`` — m(t) = t;
* ``cosine`` — m(t) = 1 − cos(πt/2) (MaskGIT's cosine schedule, written in t), m⁻¹(m) = (2/π)·arccos(1 − m);
* ``poly:p=P`` — m(t) = t^P, P > 0 (P = 1 is ``linear``), m⁻¹(m) = m^{1/P};
* ``loglinear:eps=E`` — MDLM's log-linear noise: total noise σ(t) = −log(1 − (1 − E)·t), so α(t) = e^{−σ(t)} =
  1 − (1 − E)·t and **m(t) = (1 − E)·t**, with E ∈ [0, 1) (MDLM's default 1e-3). It is the one schedule with
  m(1) = 1 − E < 1; the samplers still start from the all-mask sequence at t = 1 (as MDLM does) and, seeing only
  ratios m(s)/m(t), run exactly as with ``linear``. E matters for training (the loss weight σ'(t)), not here.

Every schedule has a :attr:`~MaskingSchedule.spec` string that :func:`masking_schedule` turns back into it.
Functions accept a Python float (returned as a float) or a tensor (computed and returned in float64, no host read).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TypeVar

import torch

__all__ = [
    "MASKING_SCHEDULES",
    "CosineMasking",
    "LinearMasking",
    "LogLinearMasking",
    "MaskingSchedule",
    "PolynomialMasking",
    "masking_schedule",
]

Time = TypeVar("Time", float, torch.Tensor)


def _as_tensor(value: float | torch.Tensor, what: str) -> tuple[torch.Tensor, bool]:
    """``value`` as a float64 tensor, and whether it came as a Python number (checked to lie in [0, 1])."""
    if isinstance(value, torch.Tensor):
        return value.to(torch.float64), False
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{what} must lie in [0, 1], got {number}")
    return torch.tensor(number, dtype=torch.float64), True


class MaskingSchedule(ABC):
    """m(t): the probability that a token is masked at time t (see the module docstring)."""

    #: The schedule's name in a spec (``linear``, ``cosine``, ``poly``, ``loglinear``).
    name: str = ""

    @abstractmethod
    def _mask(self, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _inverse(self, m: torch.Tensor) -> torch.Tensor: ...

    @property
    def spec(self) -> str:
        """The spec :func:`masking_schedule` rebuilds this schedule from, e.g. ``poly:p=2``."""
        return self.name

    @property
    def m_max(self) -> float:
        """m(1): 1, except for the log-linear schedule (1 − ε)."""
        return 1.0

    def mask_probability(self, t: Time) -> Time:
        """m(t) for t ∈ [0, 1]."""
        tt, number = _as_tensor(t, "the time t")
        out = self._mask(tt)
        return float(out) if number else out

    __call__ = mask_probability

    def alpha(self, t: Time) -> Time:
        """α(t) = 1 − m(t), the probability that a token is still clean at time t."""
        return 1.0 - self.mask_probability(t)

    def inverse(self, m: Time) -> Time:
        """m⁻¹: the time t with m(t) = m, for m ∈ [0, m(1)] (the first-hitting time's inverse CDF needs it)."""
        mm, number = _as_tensor(m, "the masking probability m")
        if number and float(mm) > self.m_max:
            raise ValueError(f"the masking probability m = {float(mm)} exceeds m(1) = {self.m_max} of {self.spec}")
        out = self._inverse(mm)
        return float(out) if number else out


@dataclass(frozen=True)
class LinearMasking(MaskingSchedule):
    """m(t) = t."""

    name = "linear"

    def _mask(self, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    def _inverse(self, m: torch.Tensor) -> torch.Tensor:
        return m.clone()


@dataclass(frozen=True)
class CosineMasking(MaskingSchedule):
    """m(t) = 1 − cos(πt/2); m⁻¹(m) = (2/π)·arccos(1 − m)."""

    name = "cosine"

    def _mask(self, t: torch.Tensor) -> torch.Tensor:
        # 1 − cos x = 2 sin²(x/2): no cancellation near t = 0, where the first-hitting times of long sequences land
        return 2.0 * torch.sin(math.pi * t / 4.0) ** 2

    def _inverse(self, m: torch.Tensor) -> torch.Tensor:
        return (4.0 / math.pi) * torch.asin(torch.sqrt((m / 2.0).clamp(0.0, 1.0)))


@dataclass(frozen=True)
class PolynomialMasking(MaskingSchedule):
    """m(t) = t^p with p > 0; m⁻¹(m) = m^{1/p}."""

    p: float = 2.0
    name = "poly"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.p) and self.p > 0):
            raise ValueError(f"the polynomial masking schedule needs a finite power p > 0, got p={self.p}")

    @property
    def spec(self) -> str:
        return f"poly:p={self.p:g}"

    def _mask(self, t: torch.Tensor) -> torch.Tensor:
        return t**self.p

    def _inverse(self, m: torch.Tensor) -> torch.Tensor:
        return m ** (1.0 / self.p)


@dataclass(frozen=True)
class LogLinearMasking(MaskingSchedule):
    """MDLM's log-linear schedule: σ(t) = −log(1 − (1 − ε)t), α(t) = 1 − (1 − ε)t, m(t) = (1 − ε)t, ε ∈ [0, 1)."""

    eps: float = 1e-3
    name = "loglinear"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.eps) and 0.0 <= self.eps < 1.0):
            raise ValueError(f"the log-linear masking schedule needs eps in [0, 1), got eps={self.eps}")

    @property
    def spec(self) -> str:
        return f"loglinear:eps={self.eps:g}"

    @property
    def m_max(self) -> float:
        return 1.0 - self.eps

    def sigma(self, t: Time) -> Time:
        """The total noise σ(t) = −log(1 − (1 − ε)t) = −log α(t)."""
        tt, number = _as_tensor(t, "the time t")
        out = -torch.log1p(-(1.0 - self.eps) * tt)
        return float(out) if number else out

    def _mask(self, t: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.eps) * t

    def _inverse(self, m: torch.Tensor) -> torch.Tensor:
        return m / (1.0 - self.eps)


#: Schedule name → class (``polynomial`` is an alias of ``poly``, ``log-linear`` of ``loglinear``).
MASKING_SCHEDULES: dict[str, type[MaskingSchedule]] = {
    "linear": LinearMasking,
    "cosine": CosineMasking,
    "poly": PolynomialMasking,
    "polynomial": PolynomialMasking,
    "loglinear": LogLinearMasking,
    "log-linear": LogLinearMasking,
}


def masking_schedule(spec: str | MaskingSchedule = "linear", **options: float) -> MaskingSchedule:
    """A masking schedule from a spec ``NAME[:key=value,…]`` (``linear``, ``cosine``, ``poly:p=2``,
    ``loglinear:eps=1e-3``) or a name and keyword options; a schedule is returned as it is."""
    if isinstance(spec, MaskingSchedule):
        if options:
            raise ValueError(f"options {sorted(options)} given with a ready schedule {spec.spec}")
        return spec
    name, _, rest = spec.partition(":")
    parsed: dict[str, float] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"masking schedule option {item!r} in {spec!r} is not key=value")
        try:
            parsed[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"masking schedule option {key.strip()}={value!r} in {spec!r} is not a number") from None
    parsed.update(options)
    cls = MASKING_SCHEDULES.get(name.strip().lower())
    if cls is None:
        raise ValueError(f"unknown masking schedule {name!r}: expected one of {sorted(MASKING_SCHEDULES)}")
    try:
        return cls(**parsed)
    except TypeError:
        raise ValueError(f"masking schedule {name!r} takes no options {sorted(parsed)}") from None
