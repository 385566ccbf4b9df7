"""CADS, the condition-annealed diffusion sampler (Sadat, Buhmann, Bradley, Hilliges & Weber, "CADS: Unleashing the
Diversity of Diffusion Models through Condition-Annealed Sampling", ICLR 2024, arXiv:2310.17347).

At every step the *conditional* input y of the model is replaced by a noised copy whose noise decays as sampling
goes from noise (t = 1) to data (t = 0):

* eq. 1 — the annealing schedule γ(t) = 1 for t ≤ τ1, (τ2 − t)/(τ2 − τ1) for τ1 < t < τ2, 0 for t ≥ τ2
  (:func:`cads_gamma`): early in sampling (large t) the condition is mostly noise, which gives diversity; late it
  is clean, which keeps the samples aligned with it;
* eq. 2 — ŷ = √γ(t)·y + s·√(1 − γ(t))·n, n ~ N(0, I) fresh at every step;
* eqs. 3–4 — the rescale ŷ_rescaled = (ŷ − mean(ŷ))/std(ŷ)·σ_in + μ_in, ŷ_final = ψ·ŷ_rescaled + (1 − ψ)·ŷ,
  with μ_in, σ_in the mean and std of the clean y (:func:`anneal_condition`).

Choices, after the notes in ``shared/reference/guidance_and_masked.md`` §3:

* **time** is the normalised diffusion time :attr:`StepContext.time <diffsamplers.step.StepContext.time>` (process
  time over its largest, 1 = the model's noisiest level), not the step index, so the τ's mean the same thing on
  every schedule and number of steps;
* **statistics** (mean, std) are per sample, over all non-batch dimensions, in float32 (float64 stays float64),
  with ε in the std; a sample whose rescale is not finite keeps its un-rescaled ŷ (the NaN guard), decided on the
  device without a host read;
* **classifier-free guidance** is D(z, y_null) + w·(D(z, ŷ_final) − D(z, y_null)), as the paper writes it: only
  the conditional input is annealed and the unconditional one stays clean. ``both=True`` also anneals the
  unconditional input (with its own noise), as the A1111 and ComfyUI implementations do;
* **n** comes from each sample's own stream (:meth:`StepContext.noise <diffsamplers.step.StepContext.noise>`, key
  ``"cads:<key>"``), so a sample's draws depend neither on its batch nor on the solver's noise;
* **defaults** τ1 = 0.6, τ2 = 0.9, ψ = 1 (the paper's ablation and both community implementations) and
  s = 0.1: the paper's class-conditional ablation finds s from 0.025 to 0.1 improving FID and recall and s = 0.25
  "severely" hurting, while 0.25 is the community default for text-to-image (pass ``noise_scale=0.25`` there);
* **s = 0** is the identity (plain sampling). Eq. 2 with s = 0 only scales y by √γ, which the rescale (ψ = 1) undoes
  wherever γ > 0 (:func:`anneal_condition` gives y back to float rounding); at γ = 0 it would erase the condition
  (0/0 in the rescale), which is not what "no noise" means.

**What counts as y: an embedding.** Float condition tensors are annealed as they are — a text encoder's token
embeddings (``encoder_hidden_states``), a pooled vector (pass ``keys=["added_cond_kwargs.text_embeds"]``). An
integer class label is not an embedding: for a network that embeds its labels (a diffusers UNet's
``class_embedding``, an ``nn.Embedding``), :func:`class_embedding_input` makes the network accept the embedding in
place of the label (labels still give the same numbers) and returns the label → embedding map, which ``embeddings``
gives CADS for that key; CADS then feeds the (annealed) class embedding, as the paper does for DiT. The
unconditional input is embedded as well (clean), so both halves of the batched call carry embeddings.

**Exact models.** The exact class-conditional mixture ``gmm-cond`` has no embedding — its denoiser reads an integer
label and computes a posterior mean of that class's Gaussians — so CADS does not apply to it and says so
(``ValueError``): any map from a noised vector to class weights would be an invention of ours, and CADS on it would
measure that invention, not the method.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from ..step import Conditions, Guidance, StepContext

__all__ = ["CADS", "ClassEmbeddingInput", "anneal_condition", "cads_gamma", "class_embedding_input"]

#: ε added to the variance before the square root in the rescale's std (eq. 3).
RESCALE_EPS = 1e-10

#: The name of CADS's per-sample random streams (one per annealed key: ``"cads:<key>"``).
STREAM = "cads"

Draw = Callable[[Sequence[int], torch.device, torch.dtype], torch.Tensor]


def cads_gamma(time: float, tau1: float, tau2: float) -> float:
    """The annealing schedule γ(t) of eq. 1 at normalised time ``time`` (1 = noise): 1 up to τ1, linear down to 0
    at τ2, 0 after (τ1 = τ2 is a step from 1 to 0 there)."""
    t = float(time)
    if t <= tau1:
        return 1.0
    if t >= tau2:
        return 0.0
    return (tau2 - t) / (tau2 - tau1)


def anneal_condition(
    y: torch.Tensor, gamma: float, noise: torch.Tensor | None, noise_scale: float, psi: float
) -> torch.Tensor:
    """ŷ_final of eqs. 2–4 for a batch of conditions ``y`` (first dimension: the samples) and their noise ``n``.

    ŷ = √γ·y + s·√(1 − γ)·n (eq. 2); ŷ_rescaled = (ŷ − mean ŷ)/std ŷ·σ_in + μ_in with each sample's own mean and std
    over its other dimensions, μ_in and σ_in those of its clean y (eq. 3); ŷ_final = ψ·ŷ_rescaled + (1 − ψ)·ŷ (eq. 4).
    Computed in float32 (float64 stays float64) and returned in ``y``'s dtype. γ = 1 returns y itself (eq. 2 gives
    y exactly, eq. 3 gives it back to rounding), ``noise`` may then be ``None``.
    """
    if gamma >= 1.0:
        return y
    if noise is None:
        raise ValueError(f"CADS at γ = {gamma:g} < 1 needs the noise n of eq. 2")
    work = torch.promote_types(y.dtype, torch.float32)
    y32 = y.to(work)
    noised = math.sqrt(gamma) * y32 + (noise_scale * math.sqrt(1.0 - gamma)) * noise.to(device=y.device, dtype=work)
    if psi == 0.0:
        return noised.to(y.dtype)
    dims = tuple(range(1, y.ndim))
    mean_in, std_in = _moments(y32, dims)
    mean, std = _moments(noised, dims)
    rescaled = (noised - mean) / std * std_in + mean_in
    finite = torch.isfinite(rescaled).flatten(1).all(dim=1).view(-1, *(1,) * (y.ndim - 1))
    rescaled = torch.where(finite, rescaled, noised)  # the NaN guard: keep ŷ where the rescale is not finite
    return torch.lerp(noised, rescaled, psi).to(y.dtype)


def _moments(y: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and std (population, ε in the variance) over ``dims``, kept for broadcasting."""
    var, mean = torch.var_mean(y, dim=dims, correction=0, keepdim=True)
    return mean, (var + RESCALE_EPS).sqrt()


# -- class labels → embeddings ------------------------------------------------------------------------


class ClassEmbeddingInput(torch.nn.Embedding):
    """A network's class embedding that also takes the embedding itself: integer labels are looked up as before
    (the same numbers), a float tensor of shape (batch, embedding_dim) passes through (cast to the weight's dtype).
    It holds the original module's weight parameter, so ``state_dict`` keys and values are unchanged."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Embedding's name)
        if input.is_floating_point():
            if input.shape[-1] != self.embedding_dim:
                raise ValueError(
                    f"a class embedding must have {self.embedding_dim} features, got shape {tuple(input.shape)}"
                )
            return input.to(self.weight.dtype)
        return super().forward(input)

    def embed(self, labels: torch.Tensor) -> torch.Tensor:
        """The embedding of integer ``labels`` (no graph to the weight)."""
        with torch.no_grad():
            return super().forward(labels)


def class_embedding_input(model: Any, who: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Make ``model`` (a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` with a learned class embedding) accept
    class embeddings where it takes ``class_labels``, and return the label → embedding map that CADS needs.

    The model's ``class_embedding`` (an ``nn.Embedding``) is replaced, in place and once, by a
    :class:`ClassEmbeddingInput` holding the same weight: labels give the same output as before. A model without
    such an embedding (an exact mixture, a ``class_embed_type`` that first projects the labels) raises
    ``ValueError`` naming it.
    """
    name = who or type(model).__name__
    embedding = getattr(model, "class_embedding", None)
    config = getattr(model, "config", None)
    embed_type = getattr(config, "class_embed_type", None) if config is not None else None
    if not isinstance(embedding, torch.nn.Embedding) or embed_type not in (None, "none"):
        raise ValueError(
            f"CADS noises an embedding of the condition, and {name} has no learned class embedding to noise (it needs "
            f"an nn.Embedding 'class_embedding' that class_labels index; found "
            f"{type(embedding).__name__ if embedding is not None else 'none'}"
            f"{f', class_embed_type={embed_type!r}' if embed_type not in (None, 'none') else ''}): an integer label "
            "is not an embedding, and an exact model (gmm-cond) has none"
        )
    if not isinstance(embedding, ClassEmbeddingInput):
        swapped = ClassEmbeddingInput(
            embedding.num_embeddings,
            embedding.embedding_dim,
            padding_idx=embedding.padding_idx,
            max_norm=embedding.max_norm,
            norm_type=embedding.norm_type,
            scale_grad_by_freq=embedding.scale_grad_by_freq,
            sparse=embedding.sparse,
            _weight=embedding.weight.detach(),
        )
        swapped.weight = embedding.weight  # the same parameter: nothing is copied
        swapped.train(embedding.training)
        model.class_embedding = swapped
        embedding = swapped
    return embedding.embed


# -- the guidance --------------------------------------------------------------------------------------


class CADS(Guidance):
    """Condition-annealed sampling (Sadat et al. 2024, eqs. 1–4) as the ``condition`` hook of the step.

    Args:
        tau1, tau2: the schedule's breakpoints, 0 ≤ τ1 ≤ τ2 ≤ 1 in normalised time (eq. 1).
        noise_scale: s ≥ 0, the absolute std of the noise added to the condition (eq. 2); 0 is the identity.
        psi: ψ ∈ [0, 1], the share of the rescaled condition (eq. 4); 1 restores its mean and std exactly.
        both: also anneal the unconditional input (its own noise); off by default (the paper's CFG).
        keys: the conditions to anneal, top-level keys of ``cond`` or dotted paths into nested mappings
            (``"added_cond_kwargs.text_embeds"``); by default every float tensor at the top level and every key
            of ``embeddings``.
        embeddings: key → map from integer labels to the embeddings the model accepts in their place (e.g.
            :func:`class_embedding_input`).
    """

    def __init__(
        self,
        tau1: float = 0.6,
        tau2: float = 0.9,
        noise_scale: float = 0.1,
        psi: float = 1.0,
        *,
        both: bool = False,
        keys: Sequence[str] | None = None,
        embeddings: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    ):
        self.tau1, self.tau2 = _unit("tau1", tau1), _unit("tau2", tau2)
        if self.tau1 > self.tau2:
            raise ValueError(f"CADS needs tau1 ≤ tau2, got tau1={tau1!r} > tau2={tau2!r}")
        self.noise_scale = _number("s (noise_scale)", noise_scale)
        if self.noise_scale < 0:
            raise ValueError(f"CADS noise scale s must be ≥ 0, got {noise_scale!r}")
        self.psi = _unit("psi", psi)
        if not isinstance(both, bool):
            raise ValueError(f"CADS 'both' must be true or false, got {both!r}")
        self.both = both
        self.keys = None if keys is None else tuple(str(k) for k in keys)
        self.embeddings = dict(embeddings or {})

    def gamma(self, time: float) -> float:
        """γ(t) of eq. 1."""
        return cads_gamma(time, self.tau1, self.tau2)

    def anneal(self, y: torch.Tensor, time: float, draw: Draw) -> torch.Tensor:
        """ŷ_final (eqs. 2–4) of the conditions ``y`` at normalised time ``time``; ``draw(shape, device, dtype)``
        gives n, one row per sample (only called where γ < 1). The one implementation, shared with the diffusers
        pipeline helper (:mod:`diffsamplers.adapters.cads_pipeline`)."""
        if self.noise_scale == 0.0:
            return y
        gamma = self.gamma(time)
        if gamma >= 1.0:
            return y
        noise = draw(tuple(y.shape[1:]), y.device, torch.promote_types(y.dtype, torch.float32))
        return anneal_condition(y, gamma, noise, self.noise_scale, self.psi)

    # -- the hook ---------------------------------------------------------------------------------------
    def condition(self, ctx: StepContext, conditions: Conditions) -> Conditions:
        if not conditions.cond:
            raise ValueError("CADS anneals the model's condition, and this run has none (cond is empty)")
        if self.noise_scale == 0.0:
            return conditions
        time, batch = ctx.time, len(ctx.rows)
        cond: Any = dict(conditions.cond)
        uncond: Any = None if conditions.uncond is None else dict(conditions.uncond)
        for key in self._keys(conditions.cond):
            y = self._embedded(key, _get(cond, key), batch, "cond")
            cond = _set(cond, key, self.anneal(y, time, _stream(ctx, key)))
            if uncond is None or not _has(uncond, key):
                continue
            u = self._embedded(key, _get(uncond, key), batch if self.both else None, "uncond")
            if self.both:
                u = self.anneal(u, time, _stream(ctx, f"{key}/uncond"))
            uncond = _set(uncond, key, u)
        return replace(conditions, cond=cond, uncond=uncond)

    def _keys(self, cond: Mapping[str, Any]) -> tuple[str, ...]:
        if self.keys is not None:
            missing = [k for k in self.keys if not _has(cond, k)]
            if missing:
                raise ValueError(f"CADS keys {missing} are not in the condition (it has {sorted(cond)})")
            return self.keys
        keys = tuple(
            k
            for k, v in cond.items()
            if isinstance(v, torch.Tensor) and (v.is_floating_point() or k in self.embeddings)
        )
        if not keys:
            raise ValueError(
                f"CADS found no condition embedding to anneal in {sorted(cond)}: it anneals float tensors (e.g. text "
                "embeddings) and integer labels the model can take as embeddings (class_embedding_input)"
            )
        return keys

    def _embedded(self, key: str, value: Any, batch: int | None, which: str) -> torch.Tensor:
        """The condition at ``key`` as a float embedding, expanded to ``batch`` rows where one is given."""
        if not isinstance(value, torch.Tensor) or value.ndim < 1:
            raise ValueError(
                f"CADS: {which}[{key!r}] must be a tensor with a batch dimension, got {type(value).__name__}"
            )
        if not value.is_floating_point():
            embed = self.embeddings.get(key)
            if embed is None:
                raise ValueError(
                    f"CADS: {which}[{key!r}] holds integer labels ({value.dtype}) and no embedding was given for them: "
                    "CADS noises embeddings, not labels (see class_embedding_input)"
                )
            value = embed(value)
        if batch is not None and value.shape[0] != batch:
            if value.shape[0] != 1:
                raise ValueError(f"CADS: {which}[{key!r}] has {value.shape[0]} rows for a batch of {batch}")
            value = value.expand(batch, *value.shape[1:])
        return value

    def __repr__(self) -> str:
        return (
            f"CADS(tau1={self.tau1:g}, tau2={self.tau2:g}, s={self.noise_scale:g}, psi={self.psi:g}, "
            f"both={self.both}, keys={list(self.keys) if self.keys is not None else 'float tensors'}"
            f"{f', embedded labels={sorted(self.embeddings)}' if self.embeddings else ''})"
        )


def _stream(ctx: StepContext, key: str) -> Draw:
    return lambda shape, device, dtype: ctx.noise(f"{STREAM}:{key}", shape, device, dtype)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"CADS {name} must be a finite number, got {value!r}")
    return float(value)


def _unit(name: str, value: Any) -> float:
    number = _number(name, value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"CADS {name} must lie in [0, 1], got {value!r}")
    return number


def _has(tree: Mapping[str, Any], path: str) -> bool:
    head, _, rest = path.partition(".")
    if head not in tree:
        return False
    return not rest or (isinstance(tree[head], Mapping) and _has(tree[head], rest))


def _get(tree: Mapping[str, Any], path: str) -> Any:
    head, _, rest = path.partition(".")
    return _get(tree[head], rest) if rest else tree[head]


def _set(tree: Mapping[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``tree`` with ``path`` set (the nested mappings on the way copied, the rest shared)."""
    head, _, rest = path.partition(".")
    return {**tree, head: _set(tree[head], rest, value) if rest else value}
