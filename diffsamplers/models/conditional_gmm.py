"""An exact class-conditional model, for testing classifier-free guidance against ground truth.

Each class c has its own Gaussian mixture p(x0 | c) = Σ_k w_{c,k} N(μ_{c,k}, Σ_{c,k}); the unconditional
distribution is the class average p(x0) = Σ_c π_c p(x0 | c), a mixture of all components with weights
π_c w_{c,k}. Both denoisers are exact posterior means (:meth:`GaussianMixture.denoise` restricted to one
class's components, or over all of them). Classifier-free guidance (Ho & Salimans 2022, Eq. 6) combines
them, D_w = D_u + w (D_c − D_u); D_w is not the denoiser of any distribution, but its probability-flow ODE
is well defined and :func:`diffsamplers.models.gmm.reference_solution` solves it exactly with
:class:`GuidedMixture`.

The label ``num_classes`` is the null class (unconditional), as in class-conditional networks trained with
label dropout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..denoiser import Denoiser
from ..noise import NoiseProcess
from .gmm import GaussianMixture, GMMModel

__all__ = [
    "ClassConditionalMixture",
    "ConditionalGMMDenoiser",
    "ConditionalGMMModel",
    "GuidedMixture",
    "default_conditional_mixture",
]


class ClassConditionalMixture:
    """One :class:`GaussianMixture` per class, with class prior ``class_weights`` (uniform by default)."""

    def __init__(self, classes: Sequence[GaussianMixture], class_weights: Sequence[float] | None = None):
        if len(classes) < 1:
            raise ValueError("a class-conditional mixture needs at least one class")
        shapes = {tuple(c.sample_shape) for c in classes}
        if len(shapes) != 1:
            raise ValueError(f"all classes must have the same sample shape, got {sorted(shapes)}")
        prior = torch.full((len(classes),), 1.0 / len(classes), dtype=torch.float64)
        if class_weights is not None:
            prior = torch.as_tensor(list(class_weights), dtype=torch.float64)
            if prior.shape != (len(classes),) or torch.any(prior <= 0):
                raise ValueError(f"class_weights must be {len(classes)} positive numbers, got {list(class_weights)}")
            prior = prior / prior.sum()
        self.classes = list(classes)
        self.class_weights = prior
        sizes = [int(c.weights.numel()) for c in classes]
        self.component_class = torch.repeat_interleave(torch.arange(len(classes)), torch.tensor(sizes))
        within = torch.cat([c.weights for c in classes])
        self.pooled = GaussianMixture(
            torch.cat([c.means for c in classes]),
            torch.cat([c.eigvals for c in classes]),
            torch.cat([c.eigvecs for c in classes]),
            within * prior[self.component_class],
            tuple(classes[0].sample_shape),
        )
        # Row c: log weights of class c's components within the class (−inf elsewhere); last row: pooled.
        table = torch.full((len(classes) + 1, within.numel()), -math.inf, dtype=torch.float64)
        for c in range(len(classes)):
            mask = self.component_class == c
            table[c, mask] = within[mask].log()
        table[-1] = self.pooled.weights.log()
        self._log_weight_table = table

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def null_label(self) -> int:
        """The label meaning "no class" (the unconditional model)."""
        return self.num_classes

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.pooled.sample_shape)

    @classmethod
    def random(
        cls,
        num_classes: int = 4,
        components_per_class: int = 2,
        sample_shape: Sequence[int] = (1, 8, 8),
        seed: int = 0,
        mean_scale: float = 0.5,
        eig_range: tuple[float, float] = (1e-3, 0.1),
    ) -> ClassConditionalMixture:
        """Reproducible random classes, each a :meth:`GaussianMixture.random` with its own seed."""
        if num_classes < 1 or components_per_class < 1:
            raise ValueError(f"need at least one class and one component, got {num_classes}, {components_per_class}")
        return cls(
            [
                GaussianMixture.random(sample_shape, components_per_class, seed * 1000 + c, mean_scale, eig_range)
                for c in range(num_classes)
            ]
        )

    def check_labels(self, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"class labels must be integers, got {labels.dtype}")
        return labels.reshape(-1)

    def denoise(
        self,
        x: torch.Tensor,
        alpha: float | torch.Tensor,
        sigma: float | torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """E[x0 | x_t = x, c] per sample (label ``null_label``, or ``labels=None``: unconditional)."""
        if labels is None:
            return self.pooled.denoise(x, alpha, sigma)
        labels = self.check_labels(labels).to(device=x.device)
        if labels.numel() == 1 and x.shape[0] != 1:
            labels = labels.expand(x.shape[0])
        if labels.numel() != x.shape[0]:
            raise ValueError(f"got {labels.numel()} labels for a batch of {x.shape[0]}")
        table = self._log_weight_table.to(x.device)
        # Out-of-range labels would index silently on a GPU; the check is on the host for host tensors only.
        if labels.device.type == "cpu" and (labels.min() < 0 or labels.max() > self.null_label):
            raise ValueError(f"class labels must lie in 0..{self.null_label} ({self.null_label} = unconditional)")
        return self.pooled.denoise(x, alpha, sigma, log_weights=table[labels])

    def guided_denoise(
        self,
        x: torch.Tensor,
        alpha: float | torch.Tensor,
        sigma: float | torch.Tensor,
        labels: torch.Tensor,
        guidance_scale: float,
    ) -> torch.Tensor:
        """Classifier-free guidance D_u + w (D_c − D_u) (w = 1: the conditional denoiser)."""
        cond = self.denoise(x, alpha, sigma, labels)
        if guidance_scale == 1.0:
            return cond
        return torch.lerp(self.pooled.denoise(x, alpha, sigma), cond, float(guidance_scale))

    def sample(
        self, labels: torch.Tensor, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Exact samples of p(x0 | c) for each label (``null_label``: from the class average)."""
        labels = self.check_labels(labels)
        out = torch.empty((labels.numel(), *self.sample_shape), dtype=dtype)
        for c in range(self.num_classes + 1):
            rows = torch.nonzero(labels == c).flatten()
            if rows.numel():
                mixture = self.pooled if c == self.null_label else self.classes[c]
                out[rows] = mixture.sample(rows.numel(), generator=generator, dtype=dtype)
        return out

    def as_denoiser(self, process: NoiseProcess, guidance_scale: float = 1.0) -> ConditionalGMMDenoiser:
        return ConditionalGMMDenoiser(self, process, guidance_scale)

    def as_model(self, process: NoiseProcess, prediction_type: str = "epsilon") -> ConditionalGMMModel:
        return ConditionalGMMModel(self, process, prediction_type)


@dataclass
class GuidedMixture:
    """The guided denoiser of fixed labels as an object with ``denoise(x, α, σ)`` (for ``reference_solution``)."""

    mixture: ClassConditionalMixture
    labels: torch.Tensor
    guidance_scale: float

    def denoise(self, x: torch.Tensor, alpha: float | torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        return self.mixture.guided_denoise(x, alpha, sigma, self.labels, self.guidance_scale)


class ConditionalGMMModel(GMMModel):
    """The class-conditional mixture as a diffusers-style network: ``model(x, t, class_labels=y).sample``."""

    def forward(  # type: ignore[override]
        self,
        sample: torch.Tensor,
        timestep: float | torch.Tensor,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Any:
        return self._predict(sample, timestep, return_dict, labels=class_labels)


class ConditionalGMMDenoiser(Denoiser):
    """The exact guided denoiser, reading ``cond["class_labels"]`` (uncond: the null label); no host reads."""

    def __init__(self, mixture: ClassConditionalMixture, process: NoiseProcess, guidance_scale: float = 1.0):
        super().__init__(ConditionalGMMModel(mixture, process, "sample"), process, "sample", guidance_scale)
        self.mixture = mixture

    def predict_x0(self, x, timestep, alpha, sigma, cond=None, uncond=None, guidance_scale=None):  # noqa: D102
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        labels = None if cond is None else cond.get("class_labels")
        x0 = self.mixture.denoise(x, alpha, sigma, labels)
        if uncond is None or scale == 1.0:
            return x0
        null = uncond.get("class_labels")
        return torch.lerp(self.mixture.denoise(x, alpha, sigma, null), x0, scale)


def default_conditional_mixture() -> ClassConditionalMixture:
    """The bundled exact class-conditional model, shaped like a digits task: 10 classes × 3 components over
    1×8×8 "images" (each class drawn like :func:`diffsamplers.models.gmm.default_mixture`), seed 0."""
    return ClassConditionalMixture.random(num_classes=10, components_per_class=3, sample_shape=(1, 8, 8), seed=0)
