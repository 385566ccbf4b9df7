"""Models by name for the command line and the scripts: a denoiser, its data, and what is known exactly.

* ``gmm`` — the bundled exact Gaussian mixture (:func:`~diffsamplers.models.gmm.default_mixture`): exact
  denoiser, unlimited data, exact reference solutions, analytic Gaussian statistics.
* ``diffusers:<directory>`` — a diffusers pipeline saved locally (``save_pretrained``; nothing is downloaded);
  its data come from ``data=`` (a ``.pt``/``.npy``/``.safetensors`` tensor file, or ``sklearn-digits``).
* ``digits`` — the bundled class-conditional digits model (:func:`~diffsamplers.models.digits.load_digits`),
  without guidance, labels drawn uniformly; its data are the 1,438 training digits. The sample metric
  ``fd-digits`` is the Fréchet distance of samples to those digits in the bundled classifier's features.
* anything added with :func:`register_model`.

Sample metrics (a number from generated samples alone, such as a Fréchet distance) are registered with
:func:`register_sample_metric` and looked up by name.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..denoiser import Denoiser

__all__ = [
    "ModelBundle",
    "load_model",
    "register_model",
    "register_sample_metric",
    "sample_metric",
    "load_data",
    "MODELS",
    "SAMPLE_METRICS",
    "fd_digits",
]


@dataclass
class ModelBundle:
    """A model and what the tools need around it.

    ``exact_reference(x_T)`` returns the exact sample from noise ``x_T`` at σ_max (when known); ``labels(n,
    generator)`` draws class labels for a conditional model (``cond_key`` names the model input);
    ``gaussian_statistics()`` returns analytic statistics (when known).
    """

    name: str
    denoiser: Denoiser
    sample_shape: tuple[int, ...]
    data: Any = None
    exact_reference: Callable[[torch.Tensor], torch.Tensor] | None = None
    labels: Callable[[int, torch.Generator], torch.Tensor] | None = None
    cond_key: str = "class_labels"
    gaussian_statistics: Callable[[], Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def cond(self, n: int, seed: int) -> dict[str, torch.Tensor] | None:
        """Per-sample model inputs for ``n`` samples (class labels of a conditional model), or None."""
        if self.labels is None:
            return None
        return {self.cond_key: self.labels(n, torch.Generator().manual_seed(seed))}


def _gmm(**_: Any) -> ModelBundle:
    from ..gaussian_stats import GaussianStatistics
    from .gmm import default_mixture, default_process, reference_solution

    gmm, process = default_mixture(), default_process()

    class _Stream:
        """Endless batches of mixture samples (seeded)."""

        def __iter__(self):
            g = torch.Generator().manual_seed(12345)
            while True:
                yield gmm.sample(4096, generator=g)

    return ModelBundle(
        name="gmm",
        denoiser=gmm.as_denoiser(process),
        sample_shape=gmm.sample_shape,
        data=_Stream(),
        exact_reference=lambda x_T: reference_solution(gmm, process, x_T.double(), process.sigma_max, 0.0),
        gaussian_statistics=lambda: GaussianStatistics.from_gmm(gmm),
        info={"description": "bundled 8-component Gaussian mixture, 1×8×8, DDPM linear β (exact)"},
    )


def load_data(spec: str | Path) -> Any:
    """A data set by name or file: ``sklearn-digits`` (the bundled model's 1,438 training images, 16×16 in [−1, 1], with labels) or a tensor file."""
    spec = str(spec)
    if spec in ("sklearn-digits", "digits"):
        from ..data import load_digits_dataset

        return load_digits_dataset("train")
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"no data file {spec!r} (or use 'sklearn-digits')")
    if path.suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(path)).float()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        x = tensors.get("x", tensors.get("images"))
        if x is None:
            raise ValueError(f"{path} must hold an 'x' or 'images' tensor, has {sorted(tensors)}")
        labels = tensors.get("labels", tensors.get("class_labels"))
        return x.float() if labels is None else (x.float(), labels.long())
    data = torch.load(path, map_location="cpu", weights_only=True)
    return data


def _diffusers(path: str, data: str | None = None, **_: Any) -> ModelBundle:
    from diffusers import DiffusionPipeline

    from ..noise import noise_process_from_config

    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    net = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if net is None:
        raise ValueError(f"the pipeline in {path} has no unet or transformer")
    config = dict(pipe.scheduler.config)
    process = noise_process_from_config(config)
    net.eval()
    shape = (int(net.config.in_channels), int(net.config.sample_size), int(net.config.sample_size))
    return ModelBundle(
        name=f"diffusers:{path}",
        denoiser=Denoiser(net, process, config.get("prediction_type", "epsilon")),
        sample_shape=shape,
        data=None if data is None else load_data(data),
        info={"pipeline": type(pipe).__name__},
    )


def _digits(**_: Any) -> ModelBundle:
    from ..data import load_digits_dataset
    from .digits import load_digits

    model = load_digits()
    return ModelBundle(
        name="digits",
        denoiser=model.denoiser(),
        sample_shape=(1, model.unet.config.sample_size, model.unet.config.sample_size),
        data=load_digits_dataset("train"),
        labels=lambda n, g: torch.randint(0, 10, (n,), generator=g),
        info={"description": "bundled class-conditional digits UNet (16×16, v-prediction), no guidance"},
    )


@functools.lru_cache(maxsize=1)
def _digits_feature_reference() -> tuple[Any, Any]:
    from ..data.digits import load_digits_dataset, to_uint8
    from ..evaluation.features import DigitsFeatures
    from ..evaluation.frechet import FeatureStats
    from .digits import load_digits_classifier

    extractor = DigitsFeatures(load_digits_classifier())
    images, _ = load_digits_dataset("train")
    return extractor, FeatureStats(extractor.dim).update(extractor(to_uint8(images)))


def fd_digits(samples: torch.Tensor, bundle: ModelBundle | None = None) -> float:
    """FD-digits of ``samples`` ([−1, 1], (N, 1, 16, 16)) against the 1,438 training digits (not FID)."""
    from ..data.digits import to_uint8
    from ..evaluation.frechet import FeatureStats, frechet_distance

    extractor, ref = _digits_feature_reference()
    stats = FeatureStats(extractor.dim).update(extractor(to_uint8(samples.float().cpu())))
    return frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)


MODELS: dict[str, Callable[..., ModelBundle]] = {"gmm": _gmm, "digits": _digits}
SAMPLE_METRICS: dict[str, Callable[[torch.Tensor, ModelBundle], float]] = {"fd-digits": fd_digits}


def register_model(name: str, factory: Callable[..., ModelBundle]) -> None:
    """Make ``load_model(name)`` call ``factory(**kwargs)``."""
    MODELS[name] = factory


def register_sample_metric(name: str, fn: Callable[[torch.Tensor, ModelBundle], float]) -> None:
    """A metric of generated samples (lower is better), e.g. a Fréchet distance to the data."""
    SAMPLE_METRICS[name] = fn


def sample_metric(name: str) -> Callable[[torch.Tensor, ModelBundle], float]:
    try:
        return SAMPLE_METRICS[name]
    except KeyError:
        raise ValueError(f"unknown sample metric {name!r}: registered are {sorted(SAMPLE_METRICS) or 'none'}") from None


def load_model(spec: str, device: str | torch.device | None = None, **kwargs: Any) -> ModelBundle:
    """``gmm``, ``diffusers:<directory>`` or a registered name; ``kwargs`` go to the factory (e.g. ``data=``;
    ``data=None`` keeps the model's own data). ``device`` moves a network there."""
    if spec.startswith("diffusers:"):
        bundle = _diffusers(spec.split(":", 1)[1], **kwargs)
    else:
        factory = MODELS.get(spec)
        if factory is None:
            raise ValueError(f"unknown model {spec!r}: expected one of {sorted(MODELS)} or diffusers:<directory>")
        bundle = factory(**kwargs)
        if kwargs.get("data") is not None:
            bundle.data = load_data(kwargs["data"])
    if device is not None and isinstance(bundle.denoiser.model, torch.nn.Module):
        bundle.denoiser.model.to(device)
    return bundle
