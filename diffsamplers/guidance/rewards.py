"""Rewards that ship: per-sample scores r(x0) of clean samples, for the reward-driven particle and candidate methods
— FK steering (Singhal et al. 2025, arXiv:2501.06848, the tilt p(x0)·exp(λ r(x0)) of its Eq. 1) and SVDD (Li et al.
2024, arXiv:2408.08252, the soft value v = α log E[exp(r(x0)/α) | x_t]).

A reward is any callable ``(B, *shape) → (B,)`` on samples in the model's data space; the methods evaluate it under
``torch.no_grad`` and check its shape and finiteness, naming it by its ``__name__``. The two here read images in
[−1, 1], the data space of the bundled digits model and of diffusers' image pipelines (values outside are clipped,
as an image file would), and are differentiable in x where they are not clipped:

* :class:`DigitsClassProbability` — the probability of one class under the bundled digits classifier
  (:class:`~diffsamplers.models.digits_classifier.DigitsClassifier`, the network of FD-digits), in [0, 1];
* :class:`PixelMass` — the mean intensity of the image mapped to [0, 1] (``sign=-1``: the mean darkness, 1 − that);
* :class:`TextCharacterShare` — for the character-level text model: the share of positions in a character class.

The recipe parser builds them from specs (``digits-class:3``, ``pixel-mass``, ``pixel-mass:-1``, or
``package.module:function`` for any other callable): :func:`diffsamplers.apps.recipes.parse_reward`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..models.digits import load_digits_classifier
from ..models.digits_classifier import DigitsClassifier

if TYPE_CHECKING:
    from ..step import StepContext

__all__ = [
    "CHARACTER_CLASSES",
    "DIGITS_SHAPE",
    "DigitsClassProbability",
    "PixelMass",
    "TextCharacterShare",
    "checked_score",
]


def checked_score(
    fn: Callable[..., Any], args: tuple, ctx: StepContext, what: str = "the reward", where: str = "", per: int = 1
) -> torch.Tensor:
    """``fn(*args)`` — a reward or a value of the batch ``args[0]`` — under ``torch.no_grad``, as float64 ``(n,)``;
    ``ValueError`` naming ``fn`` (by its ``__name__``), the step and the sample rows if it returns another shape or
    NaN/Inf (one host read). Row i of the n belongs to sample ``ctx.rows.start + i // per`` (``per`` rows per sample,
    e.g. SVDD's candidates)."""
    x = args[0]
    with torch.no_grad():
        out = fn(*args)
    name = getattr(fn, "__name__", type(fn).__name__)
    at = f"step {ctx.index + 1} of {ctx.num_evals} (evaluation index {ctx.index}, {where})"
    n = x.shape[0]
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (n,):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{what} {name!r} must return a tensor of shape ({n},), got {got} at {at}")
    out = out.detach().to(device=x.device, dtype=torch.float64)
    finite = torch.isfinite(out)
    if not bool(finite.all()):  # the one host read of the step
        bad = sorted(set((torch.nonzero(~finite).flatten() // per + ctx.rows.start).tolist()))
        raise ValueError(f"{what} {name!r} returned NaN/Inf at {at} for sample rows {bad[:8]}")
    return out


#: The shape of one bundled digits image (channels, height, width).
DIGITS_SHAPE = (1, 16, 16)


class DigitsClassProbability:
    """r(x) = p_ψ(``target`` | x): the softmax probability of class ``target`` under the digits classifier, for
    (B, 1, 16, 16) images in [−1, 1] (the bundled digits model's samples; clipped to [−1, 1] first), in [0, 1].

    The classifier (the bundled one by default, loaded once on ``device``) runs in its own float32 on its own device;
    the reward is returned there as float32. ``__name__`` is ``digits-class:<target>``, the spec that builds it.

    Args:
        target: the digit, 0 … num_classes − 1.
        classifier: a trained :class:`DigitsClassifier` (default: the bundled one).
        device: where to load the bundled classifier (ignored with ``classifier``).
    """

    def __init__(
        self,
        target: int,
        classifier: DigitsClassifier | None = None,
        device: str | torch.device | None = None,
    ):
        net = load_digits_classifier(device=device) if classifier is None else classifier.eval()
        classes = int(net.head.out_features)
        if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < classes:
            raise ValueError(f"digits-class: the class must be a digit in 0..{classes - 1}, got {target!r}")
        for p in net.parameters():
            p.requires_grad_(False)  # a reward is differentiated in x only, if at all
        self.classifier = net
        self.target = target
        self.__name__ = f"digits-class:{target}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != DIGITS_SHAPE:
            raise ValueError(
                f"the reward {self.__name__!r} scores (B, 1, 16, 16) digits images in [-1, 1], got {tuple(x.shape)}"
            )
        weight = self.classifier.head.weight
        images = x.clamp(-1.0, 1.0).to(device=weight.device, dtype=weight.dtype)
        return torch.softmax(self.classifier(images), dim=1)[:, self.target]

    def __repr__(self) -> str:
        return f"DigitsClassProbability({self.target})"


class PixelMass:
    """r(x) = mean over pixels of (clip(x, −1, 1) + 1)/2: the mean intensity of an image in [−1, 1], in [0, 1]
    (1 = all white); with ``sign=-1`` the mean darkness 1 − r(x), also in [0, 1].

    The darkness equals −r(x) up to the constant 1, which none of the reward methods sees (FK steering's potentials
    and SVDD's selection depend on reward differences within a group) — so ``sign=-1`` steers towards thin, dark
    images exactly as −r would, while the reward stays a fraction. Any sample shape; float32 or the sample's dtype if
    wider. ``__name__`` is ``pixel-mass`` or ``pixel-mass:-1``.
    """

    def __init__(self, sign: int = 1):
        if isinstance(sign, bool) or sign not in (1, -1):
            raise ValueError(f"pixel-mass: the sign must be 1 or -1, got {sign!r}")
        self.sign = int(sign)
        self.__name__ = "pixel-mass" if self.sign == 1 else "pixel-mass:-1"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2:
            raise ValueError(f"the reward {self.__name__!r} scores a batch (B, *shape), got shape {tuple(x.shape)}")
        dtype = torch.promote_types(x.dtype, torch.float32)
        mass = ((x.to(dtype).clamp(-1.0, 1.0) + 1.0) / 2.0).flatten(1).mean(dim=1)
        return mass if self.sign == 1 else 1.0 - mass

    def __repr__(self) -> str:
        return f"PixelMass(sign={self.sign})"


#: Named character classes of :class:`TextCharacterShare`.
CHARACTER_CLASSES: dict[str, Callable[[str], bool]] = {
    "digit": str.isdigit,
    "upper": str.isupper,
    "lower": str.islower,
    "space": str.isspace,
    "punct": lambda c: not c.isalnum() and not c.isspace(),
}


class TextCharacterShare:
    """The share of a token sequence's positions whose symbol belongs to a character class — a reward on the ids of a
    character-level masked model (``(B, L)`` int64 → ``(B,)`` in [0, 1]), e.g. the target character-class frequency
    of issue 14's guided text. ``characters`` is a named class (:data:`CHARACTER_CLASSES`: digit, upper, lower,
    space, punct) or the characters themselves; masked positions (ids outside the vocabulary) never count. A lookup
    table on the device: no host read."""

    def __init__(self, symbols: str, characters: str):
        test = CHARACTER_CLASSES.get(characters)
        members = [test(c) if test is not None else c in characters for c in symbols]
        if not any(members):
            raise ValueError(f"no symbol of the vocabulary is in {characters!r}: the reward would be 0 everywhere")
        self.table = torch.tensor([*members, False], dtype=torch.float64)  # the last entry: any other id (the mask)
        self.characters = characters
        self.__name__ = f"text-chars:{characters}"

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.dtype.is_floating_point:
            raise ValueError(f"{self.__name__} takes (B, L) token ids, got {ids.dtype} {tuple(ids.shape)}")
        table = self.table.to(ids.device)
        index = torch.where((ids >= 0) & (ids < table.numel() - 1), ids, table.numel() - 1)
        return table[index].mean(dim=1)
