"""Dynamic thresholding of x̂0 (Saharia et al. 2022, "Imagen", Sec. 2.3 and Fig. A.31).

Per sample, s = clamp(quantile_p(|x̂0|), 1, max_value); x̂0 ← clamp(x̂0, −s, s)/s. With
``max_value = 1`` (diffusers' default ``sample_max_value``) this is plain clipping to [−1, 1]. A
``max_value`` below 1 makes the clamp return ``max_value`` (torch.clamp's rule when min > max), i.e.
x̂0 ← clamp(x̂0, −m, m)/m, as diffusers computes it. Only for pixel-space models.

The quantile is taken with a sort and host-known indices (linear interpolation, as ``torch.quantile``),
so no value is read back to the host.
"""

from __future__ import annotations

import math

import torch

__all__ = ["DynamicThresholding"]


class DynamicThresholding:
    """Callable x̂0 → thresholded x̂0; ``ratio`` is the quantile p, ``max_value`` caps s."""

    def __init__(self, ratio: float = 0.995, max_value: float = 1.0):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"thresholding ratio must lie in [0, 1], got {ratio}")
        if not max_value > 0.0:
            raise ValueError(f"thresholding max_value must be positive, got {max_value}")
        self.ratio = float(ratio)
        self.max_value = float(max_value)

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        flat = x0.reshape(x0.shape[0], -1)
        n = flat.shape[1]
        pos = self.ratio * (n - 1)
        lo, frac = int(math.floor(pos)), pos - math.floor(pos)
        hi = min(lo + 1, n - 1)
        ordered = flat.abs().sort(dim=1).values
        s = ordered[:, lo] if frac == 0.0 else torch.lerp(ordered[:, lo], ordered[:, hi], frac)
        s = s.clamp(min=1.0, max=self.max_value).unsqueeze(1)
        return (torch.clamp(flat, -s, s) / s).reshape(x0.shape)

    def __repr__(self) -> str:
        return f"DynamicThresholding(ratio={self.ratio}, max_value={self.max_value})"
