"""Per-sample distances between batches of samples: ``d(a, b) -> (B,)``, differentiable.

One home for what the minority score (:mod:`diffsamplers.tuning.minority`, Um et al. 2024) and the self-guided
minority sampler (:mod:`diffsamplers.guidance.self_minority`, Um & Ye 2024) both measure: ℓ2 / ℓ1 norms of the
difference over all but the batch dimension, and LPIPS (Zhang et al. 2018) only where the ``lpips`` package, its
linear heads and torchvision's backbone are already on disk — this package never downloads weights.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["Distance", "MissingWeightsError", "l1_distance", "l2_distance", "lpips_distance"]

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: torchvision's backbone checkpoints LPIPS loads, by ``net``.
_LPIPS_BACKBONES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


class MissingWeightsError(FileNotFoundError, ValueError):
    """Weights a distance needs are not on disk (a ``FileNotFoundError``, and a ``ValueError`` for spec parsers)."""


def _norm(a: torch.Tensor, b: torch.Tensor, p: int) -> torch.Tensor:
    diff = (a - b).flatten(1)
    return torch.linalg.vector_norm(diff.to(torch.promote_types(diff.dtype, torch.float32)), ord=p, dim=1)


def l2_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a − b‖₂ per sample (over all elements), in float32 or wider."""
    return _norm(a, b, 2)


def l1_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a − b‖₁ per sample (over all elements), in float32 or wider."""
    return _norm(a, b, 1)


def lpips_distance(net: str = "alex") -> Distance:
    """LPIPS with backbone ``net`` (``alex``, ``vgg``, ``squeeze``) from weights already on disk, else
    :class:`MissingWeightsError` naming every missing file. Differentiable (its parameters frozen); inputs in
    [−1, 1]; one-channel samples are repeated to three channels."""
    if net not in _LPIPS_BACKBONES:
        raise ValueError(f"LPIPS net must be one of {sorted(_LPIPS_BACKBONES)}, got {net!r}")
    spec = importlib.util.find_spec("lpips")
    needed = [Path(torch.hub.get_dir()) / "checkpoints" / _LPIPS_BACKBONES[net]]
    if spec is not None and spec.origin is not None:
        needed.append(Path(spec.origin).parent / "weights" / "v0.1" / f"{net}.pth")
    missing = ([] if spec is not None else ["the lpips package"]) + [str(p) for p in needed if not p.is_file()]
    if missing:
        raise MissingWeightsError(
            f"distance 'lpips' needs LPIPS-{net} on disk (nothing is downloaded); missing: {', '.join(missing)}; "
            "use distance=l2 or pass a callable d(a, b) -> per-sample tensor"
        )
    import lpips  # type: ignore[import-not-found]

    model = lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False)

    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape[1] == 1:
            a, b = a.expand(-1, 3, *a.shape[2:]), b.expand(-1, 3, *b.shape[2:])
        return model.to(a.device)(a.float(), b.float()).flatten()

    distance.__name__ = f"lpips({net})"
    return distance
