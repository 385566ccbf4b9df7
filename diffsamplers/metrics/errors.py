"""Distances of samples from reference samples: the accuracy metrics of the solver tables."""

from __future__ import annotations

import torch

__all__ = ["rms_error", "per_sample_rms", "error_summary"]


def rms_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root-mean-square difference over all elements (float64)."""
    return float((a.detach().double().cpu() - b.detach().double().cpu()).pow(2).mean().sqrt())


def per_sample_rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each sample's root-mean-square difference (float64, on the CPU), shape (N,)."""
    if a.shape != b.shape:
        raise ValueError(f"samples of shape {tuple(a.shape)} and {tuple(b.shape)} cannot be compared")
    diff = a.detach().double().cpu() - b.detach().double().cpu()
    return diff.pow(2).flatten(1).mean(1).sqrt()


def error_summary(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(RMS over all samples, median over samples of the per-sample RMS): the two differ where a few
    trajectories go astray (the RMS is then set by those few, the median by the typical one)."""
    per_sample = per_sample_rms(a, b)
    return float(per_sample.pow(2).mean().sqrt()), float(per_sample.median())
