"""Resampling of weighted particles, on the device and without a host read: the building block of the
sequential Monte Carlo methods (Feynman–Kac correctors, Skreta et al. 2025; FK steering, Singhal et al. 2025).

Particles come in G groups of K (one group per prompt, class or sample; a group never mixes with another), with
log-weights ``(G, K)`` in float64. :func:`resample` draws K ancestors per group by one of four schemes, all
unbiased (each particle's expected number of offspring is K·w):

* ``multinomial`` — K independent draws from the weights;
* ``stratified`` — one draw in each of the K strata [k/K, (k + 1)/K) of the CDF (Kitagawa 1996);
* ``systematic`` — the strata with one shared offset u/K + k/K (Carpenter, Clifford & Fearnhead 1999); the
  lowest variance in practice, and what the official FKC code uses;
* ``residual`` — ⌊K·w⌋ copies of each particle, the remaining R = K − Σ⌊K·w⌋ drawn multinomially from the
  residual weights K·w − ⌊K·w⌋ (Liu & Chen 1998).

The uniforms come from the caller — drawn from each group's own random stream, so a group's resampling does not
depend on the batch it ran in — as a ``(G, K)`` tensor in [0, 1) (systematic uses the first column). The ancestors
are returned as flat row indices into the G·K batch (group g's particles are rows g·K … g·K + K − 1), ready for
:meth:`diffsamplers.step.SamplingRun.reindex`. :func:`resample_adaptively` resamples only the groups whose
effective sample size ESS = (Σw)²/Σw² falls below ``threshold``·K, with :func:`torch.where` instead of a branch.
"""

from __future__ import annotations

import torch

__all__ = ["SCHEMES", "effective_sample_size", "normalised_weights", "resample", "resample_adaptively"]

#: The resampling schemes :func:`resample` knows.
SCHEMES = ("multinomial", "stratified", "systematic", "residual")


def _check_log_weights(log_weights: torch.Tensor) -> torch.Tensor:
    if log_weights.ndim != 2 or log_weights.shape[1] < 1:
        raise ValueError(f"log-weights must have shape (groups, particles), got {tuple(log_weights.shape)}")
    lw = log_weights.to(torch.float64)
    if torch.isnan(lw).any() or torch.isposinf(lw).any():
        raise ValueError("log-weights contain NaN or +inf (a potential or reward that is not finite)")
    return lw


def normalised_weights(log_weights: torch.Tensor) -> torch.Tensor:
    """The weights of each group, normalised to sum to 1 (float64). A group whose log-weights are all −∞ has no
    particle left to resample from: raises ``ValueError`` naming it (no silent uniform reset)."""
    lw = _check_log_weights(log_weights)
    dead = torch.isneginf(lw).all(dim=1)
    if dead.any():  # an error path: reading the device here is fine
        groups = torch.nonzero(dead).flatten().tolist()
        raise ValueError(f"every particle of group(s) {groups[:8]} has weight 0 (all log-weights −inf)")
    return torch.softmax(lw, dim=1)


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """ESS = (Σ w)² / Σ w² per group (K for equal weights, 1 for a single particle), computed in log space."""
    lw = _check_log_weights(log_weights)
    return torch.exp(2 * torch.logsumexp(lw, dim=1) - torch.logsumexp(2 * lw, dim=1))


def _inverse_cdf(weights: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """For each row, the index j with cdf[j − 1] ≤ point < cdf[j] (points in [0, 1))."""
    cdf = torch.cumsum(weights, dim=1)
    cdf[:, -1] = 1.0  # rounding must not leave a point above the last bin
    index = torch.searchsorted(cdf, points.contiguous(), right=True)
    return index.clamp_(max=weights.shape[1] - 1)


def resample(log_weights: torch.Tensor, uniforms: torch.Tensor, scheme: str = "systematic") -> torch.Tensor:
    """K ancestors per group, as flat row indices into the G·K batch (see the module docstring).

    Args:
        log_weights: ``(G, K)`` log-weights (any real dtype; used in float64).
        uniforms: ``(G, K)`` uniforms in [0, 1), one row per group from its own stream.
        scheme: one of :data:`SCHEMES`.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown resampling scheme {scheme!r}: expected one of {SCHEMES}")
    weights = normalised_weights(log_weights)
    groups, k = weights.shape
    if tuple(uniforms.shape) != (groups, k):
        raise ValueError(f"uniforms must have shape {(groups, k)} (groups, particles), got {tuple(uniforms.shape)}")
    u = uniforms.to(device=weights.device, dtype=torch.float64)
    strata = torch.arange(k, device=weights.device, dtype=torch.float64)
    if scheme == "multinomial":
        index = _inverse_cdf(weights, u)
    elif scheme == "stratified":
        index = _inverse_cdf(weights, (strata + u) / k)
    elif scheme == "systematic":
        index = _inverse_cdf(weights, (strata + u[:, :1]) / k)
    else:
        index = _residual(weights, u)
    offsets = torch.arange(groups, device=weights.device).unsqueeze(1) * k
    return (index + offsets).flatten()


def _residual(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Residual resampling, vectorised: slot s < Σ⌊K·w⌋ takes the deterministic copies in order, later slots
    draw from the residual weights."""
    k = weights.shape[1]
    scaled = weights * k
    copies = torch.floor(scaled)
    ends = torch.cumsum(copies, dim=1)  # the deterministic slots of particle j end at ends[j]
    slots = torch.arange(k, device=weights.device, dtype=torch.float64).expand_as(weights).contiguous()
    deterministic = torch.searchsorted(ends, slots, right=True).clamp_(max=k - 1)
    rest = scaled - copies
    total = rest.sum(dim=1, keepdim=True)
    residual_weights = torch.where(total > 0, rest / total.clamp_min(1e-300), torch.full_like(rest, 1.0 / k))
    drawn = _inverse_cdf(residual_weights, u)
    return torch.where(slots < ends[:, -1:], deterministic, drawn)


def resample_adaptively(
    log_weights: torch.Tensor, uniforms: torch.Tensor, threshold: float = 0.5, scheme: str = "systematic"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resample the groups whose ESS is below ``threshold``·K (``threshold`` in (0, 1]; the common choice is 0.5).

    Returns ``(ancestors, log_weights, resampled)``: flat ancestors (the identity for the groups kept), the
    log-weights after it (0 for resampled groups, unchanged otherwise) and the per-group mask — all on the device,
    with no host read. To resample at fixed intervals instead, call :func:`resample` at those steps.
    """
    threshold = float(threshold)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"the ESS threshold must lie in (0, 1], got {threshold!r}")
    lw = _check_log_weights(log_weights)
    groups, k = lw.shape
    resampled = effective_sample_size(lw) < threshold * k
    ancestors = resample(lw, uniforms, scheme).view(groups, k)
    identity = torch.arange(groups * k, device=lw.device).view(groups, k)
    ancestors = torch.where(resampled.unsqueeze(1), ancestors, identity).flatten()
    new_log_weights = torch.where(resampled.unsqueeze(1), torch.zeros_like(lw), lw)
    return ancestors, new_log_weights, resampled
