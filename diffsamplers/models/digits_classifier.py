"""A small CNN for 16×16 digits: a classifier, and the feature network of the Fréchet distance "FD-digits".

FD-digits is the Fréchet distance (Heusel et al. 2017, Eq. 6) between Gaussian fits of this network's
64-dimensional penultimate features. It plays the role Inception plays for FID, on a domain Inception was
never trained on; it is not FID and its numbers are not comparable with FID.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsClassifier"]


class DigitsClassifier(nn.Module):
    """conv(1→32) → conv(32→64, /2) → conv(64→64, /2) → fc(1024→64) = features → fc(64→10) = logits."""

    feature_dim = 64

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width}
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * width * 16, self.feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.feature_dim, num_classes)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1:] != (1, 16, 16):
            raise ValueError(f"the digits feature network takes (N, 1, 16, 16) images in [-1, 1], got {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 64) penultimate features of images in [−1, 1]."""
        self._check(x)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 10) class logits."""
        return self.head(self.features(x))
