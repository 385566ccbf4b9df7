"""The model registry: what ``--model`` means in every command, job and script.

A model spec is one of

* a registered name — ``gmm`` (the bundled exact Gaussian mixture), ``gmm-flow`` (the same mixture as a
  rectified-flow velocity network), ``gmm-cond`` (its class-conditional version), ``digits`` (the bundled
  class-conditional digits network), ``text`` (the bundled character-level masked diffusion language model, a
  :class:`MaskedModelBundle`), and whatever :func:`register_model` adds;
* a diffusers pipeline folder saved with ``save_pretrained`` (``path/to/folder``, or ``diffusers:path/to/folder``):
  its ``unet/`` or ``transformer/`` and ``scheduler/``; nothing is downloaded;
* ``package.module:factory`` — a function that returns a :class:`ModelBundle`.

A :class:`ModelBundle` gives everything a job needs around the network: the denoiser, the sample shape, the class
labels and the null label for classifier-free guidance, training data, the feature network and sample metrics
where there are ones, Gaussian statistics where they are known in closed form, and the folder it came from.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapters.source_config import read_source_config
from ..denoiser import Denoiser
from ..noise import NoiseProcess, RectifiedFlow, noise_process_from_config
from ..rng import NoiseSource
from ..sampling import initial_noise

__all__ = [
    "GMM_FLOW_SCHEDULER_CONFIG",
    "MODELS",
    "MaskedModelBundle",
    "ModelBundle",
    "Draw",
    "describe_models",
    "load_data",
    "load_model",
    "register_model",
]

Cond = Mapping[str, Any] | None


@dataclass(frozen=True)
class Draw:
    """Initial noises and their conditions for one evaluation: x_T at the model's largest noise level, the
    conditional inputs (class labels) and the unconditional ones (``None`` unless guided)."""

    x_T: torch.Tensor
    cond: Cond
    uncond: Cond
    labels: torch.Tensor | None


@dataclass
class ModelBundle:
    """A model and what the jobs need around it (see the module docstring).

    ``num_classes`` > 0 marks a class-conditional model whose labels (``cond_key``) are 0 … num_classes − 1 and
    whose unconditional input is ``null_class``. ``data`` holds clean training samples (a tensor, ``(samples,
    labels)`` or a stream of batches). ``sample_metrics`` map a name to a function of generated samples (lower is
    better); ``features`` maps uint8 images to features for Fréchet distances.
    """

    name: str
    denoiser: Denoiser
    sample_shape: tuple[int, ...]
    num_classes: int = 0
    null_class: int | None = None
    cond_key: str = "class_labels"
    data: Any = None
    features: Callable[[], Any] | None = None
    sample_metrics: dict[str, Callable[[torch.Tensor], float]] = field(default_factory=dict)
    gaussian_statistics: Callable[[], Any] | None = None
    folder: Path | None = None
    scheduler_config: dict[str, Any] | None = None
    description: str = ""

    @property
    def process(self) -> NoiseProcess:
        return self.denoiser.process

    @property
    def default_schedule(self) -> str:
        """The schedule spec the jobs use when none is given: diffusers' ``linspace`` grid, or for a flow model
        the flow grid with its scheduler config's shift (``flow:shift=S``)."""
        if not isinstance(self.process, RectifiedFlow):
            return "linspace"
        shift = 1.0 if self.scheduler_config is None else _flow_config(self.scheduler_config).get("flow_shift", 1.0)
        return f"flow:shift={float(shift):g}"

    @property
    def device(self) -> torch.device:
        model = self.denoiser.model
        if isinstance(model, torch.nn.Module):
            for p in model.parameters():
                return p.device
        return torch.device("cpu")

    # -- conditions -----------------------------------------------------------------------------------
    def check_classes(self, classes: Sequence[int], flag: str = "classes") -> list[int]:
        """Class labels checked against the model (``ValueError`` naming ``flag`` and the bad values)."""
        values = [int(c) for c in classes]
        if not self.num_classes:
            raise ValueError(f"{flag}: model {self.name!r} is unconditional; it takes no class labels")
        bad = [c for c in values if not 0 <= c < self.num_classes]
        if bad or not values:
            raise ValueError(f"{flag} must be class labels in 0..{self.num_classes - 1}, got {values or 'none'}")
        return values

    def labels_for(self, indices: Sequence[int], classes: Sequence[int] | None = None) -> torch.Tensor | None:
        """The label of each sample index: ``classes`` cycled (all classes by default); ``None`` if unconditional."""
        if not self.num_classes:
            return None
        pool = list(range(self.num_classes)) if not classes else self.check_classes(classes)
        return torch.tensor([pool[int(i) % len(pool)] for i in indices], dtype=torch.long)

    def conditions(self, labels: torch.Tensor | None, guidance_scale: float = 1.0) -> tuple[Cond, Cond]:
        """(cond, uncond) model inputs for ``labels``; ``uncond`` (the null label) only when guided."""
        if labels is None:
            if guidance_scale != 1.0:
                raise ValueError(f"model {self.name!r} is unconditional: it has no guidance scale {guidance_scale:g}")
            return None, None
        device = self.device
        cond = {self.cond_key: labels.to(device)}
        if guidance_scale == 1.0:
            return cond, None
        assert self.null_class is not None
        return cond, {self.cond_key: torch.full((1,), self.null_class, dtype=torch.long, device=device)}

    def draw(
        self,
        n: int,
        seed: int,
        guidance_scale: float = 1.0,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Draw:
        """``n`` seeded initial noises at σ̃_max (:func:`~diffsamplers.sampling.initial_noise`) and, for a
        class-conditional model, labels drawn uniformly from the same generator after them."""
        generator = torch.Generator().manual_seed(int(seed))
        process = self.process
        x_T = initial_noise(
            process,
            process.sigma_max,
            (int(n), *self.sample_shape),
            NoiseSource(generator=generator),
            device=device,
            dtype=dtype,
        )
        labels = torch.randint(0, self.num_classes, (int(n),), generator=generator) if self.num_classes else None
        cond, uncond = self.conditions(labels, guidance_scale)
        return Draw(x_T, cond, uncond, labels)

    def sample_metric(self, name: str) -> Callable[[torch.Tensor], float]:
        try:
            return self.sample_metrics[name]
        except KeyError:
            raise ValueError(
                f"unknown sample metric {name!r} for model {self.name!r}: it has {sorted(self.sample_metrics) or 'none'}"
            ) from None


# -- bundled models ---------------------------------------------------------------------------------


#: diffusers' scheduler config of ``gmm-flow``: Stable Diffusion 3's FlowMatchEuler settings (shift 3).
GMM_FLOW_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}


def _gmm_bundle(
    name: str,
    process: NoiseProcess,
    description: str,
    prediction_type: str = "sample",
    scheduler_config: dict[str, Any] | None = None,
) -> ModelBundle:
    """The bundled mixture on ``process``: its exact denoiser (whose network predicts ``prediction_type``),
    seeded training samples and its exact Gaussian statistics."""
    from ..models.gmm import default_mixture
    from ..teleport.statistics import GaussianStatistics

    gmm = default_mixture()

    class _Stream:
        """Endless batches of mixture samples (seeded)."""

        def __iter__(self):
            g = torch.Generator().manual_seed(12345)
            while True:
                yield gmm.sample(4096, generator=g)

    return ModelBundle(
        name=name,
        denoiser=gmm.as_denoiser(process, prediction_type),
        sample_shape=tuple(gmm.sample_shape),
        data=_Stream(),
        gaussian_statistics=lambda: GaussianStatistics.from_gmm(gmm),
        scheduler_config=None if scheduler_config is None else dict(scheduler_config),
        description=description,
    )


def _gmm() -> ModelBundle:
    from ..models.gmm import default_process

    return _gmm_bundle(
        "gmm", default_process(), "bundled 8-component Gaussian mixture, 1×8×8, DDPM linear β; exact denoiser"
    )


def _gmm_flow() -> ModelBundle:
    """The same mixture on the rectified-flow path x_t = (1 − t) x0 + t ε (Liu et al. 2023; Lipman et al. 2023),
    its network predicting the velocity ε − x0 at timestep 1000·t, with SD3's FlowMatchEuler config."""
    from ..models.gmm import default_flow_process

    return _gmm_bundle(
        "gmm-flow",
        default_flow_process(),
        "bundled 8-component Gaussian mixture, 1×8×8, rectified flow (velocity network, timestep 1000·t, "
        "FlowMatchEuler shift 3); exact denoiser",
        prediction_type="flow_prediction",
        scheduler_config=GMM_FLOW_SCHEDULER_CONFIG,
    )


def _gmm_cond() -> ModelBundle:
    from ..models.conditional_gmm import default_conditional_mixture
    from ..models.gmm import default_process

    mixture = default_conditional_mixture()
    return ModelBundle(
        name="gmm-cond",
        denoiser=mixture.as_denoiser(default_process()),
        sample_shape=tuple(mixture.sample_shape),
        num_classes=mixture.num_classes,
        null_class=mixture.null_label,
        description="bundled class-conditional Gaussian mixture (10 classes × 3 components, 1×8×8); exact denoisers",
    )


def _digits() -> ModelBundle:
    from ..data import load_digits_dataset
    from ..metrics.fd_digits import digits_features, fd_digits
    from ..models.digits import DIGITS_PIPELINE_DIR

    bundle = load_pipeline_folder(DIGITS_PIPELINE_DIR, name="digits")
    bundle.data = load_digits_dataset("train")
    bundle.features = digits_features
    bundle.sample_metrics = {"fd-digits": fd_digits}
    bundle.description = "bundled class-conditional digits UNet (16×16, v-prediction), null class 10"
    return bundle


@dataclass
class MaskedModelBundle:
    """A masked (discrete) diffusion model and what its jobs need: the model with its vocabulary size, mask id,
    context and masking schedule (:class:`~diffsamplers.masked.samplers.MaskedDiffusion`), the codec between text and
    ids, and its training record."""

    name: str
    diffusion: Any  # diffsamplers.masked.samplers.MaskedDiffusion
    vocab: Any  # diffsamplers.data.text.CharVocab
    metadata: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None
    description: str = ""

    @property
    def sequence_length(self) -> int:
        """The length of a sample: the model's context."""
        return int(self.diffusion.context_length)


def _text() -> MaskedModelBundle:
    from ..masked.samplers import MaskedDiffusion
    from ..models.text_mdm import TEXT_MDM_DIR, load_text_mdm

    model, vocab, metadata = load_text_mdm()
    diffusion = MaskedDiffusion(
        model, vocab.size, mask_id=vocab.mask_id, context_length=model.context_length, time_conditioned=False
    )
    return MaskedModelBundle(
        "text",
        diffusion,
        vocab,
        metadata,
        TEXT_MDM_DIR,
        f"bundled character-level masked diffusion language model ({vocab.size} symbols, context "
        f"{model.context_length}, time-agnostic), trained on Python's documentation text",
    )


MODELS: dict[str, Callable[[], ModelBundle | MaskedModelBundle]] = {
    "gmm": _gmm,
    "gmm-flow": _gmm_flow,
    "gmm-cond": _gmm_cond,
    "digits": _digits,
    "text": _text,
}


def register_model(name: str, factory: Callable[[], ModelBundle | MaskedModelBundle]) -> None:
    """Make ``load_model(name)`` return ``factory()``."""
    MODELS[name] = factory


def describe_models() -> str:
    """The model specs ``load_model`` accepts, for help texts and errors."""
    return f"{', '.join(sorted(MODELS))}, a diffusers pipeline folder, or package.module:factory"


# -- pipeline folders and factories -----------------------------------------------------------------


def _flow_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A scheduler config as our schedulers read it (a FlowMatch config becomes the flow config it means)."""
    return read_source_config(config, {}, "the model registry")[0]


def load_pipeline_folder(path: str | Path, name: str | None = None) -> ModelBundle:
    """A diffusers pipeline folder (``save_pretrained``) with ``unet/`` or ``transformer/`` and ``scheduler/``.

    The network class is the one its ``config.json`` names; a class-conditional ``UNet2DModel``
    (``num_class_embeds`` = C + 1) has labels 0 … C − 1 and null label C.
    """
    import diffusers

    root = Path(path)
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    network_dir = next((root / d for d in ("unet", "transformer") if (root / d / "config.json").exists()), None)
    if network_dir is None or not scheduler_file.exists():
        raise FileNotFoundError(
            f"{root} is not a diffusers pipeline folder: it needs unet/ (or transformer/) and scheduler/"
        )
    net_config = json.loads((network_dir / "config.json").read_text())
    cls = getattr(diffusers, str(net_config.get("_class_name")), None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"{network_dir}/config.json names {net_config.get('_class_name')!r}, not a diffusers model")
    net = cls.from_pretrained(network_dir, local_files_only=True).eval()
    config = json.loads(scheduler_file.read_text())
    prediction_type = _flow_config(config).get("prediction_type", "epsilon")  # a FlowMatch config has none
    size = net.config.sample_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    embeds = int(getattr(net.config, "num_class_embeds", None) or 0)
    return ModelBundle(
        name=name or str(root),
        denoiser=Denoiser(net, noise_process_from_config(config), prediction_type),
        sample_shape=(int(net.config.in_channels), *(int(s) for s in size)),
        num_classes=max(embeds - 1, 0),
        null_class=embeds - 1 if embeds else None,
        folder=root,
        scheduler_config=config,
        description=f"diffusers pipeline folder {root} ({type(net).__name__})",
    )


def _from_factory(spec: str) -> ModelBundle:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"model {spec!r}: cannot import {attr!r} from {module_name!r} ({err})") from None
    bundle = factory()
    if not isinstance(bundle, ModelBundle):
        raise TypeError(f"model {spec!r}: the factory returned {type(bundle).__name__}, not a ModelBundle")
    return bundle


def load_model(
    spec: str, device: str | torch.device | None = None, data: str | None = None, *, masked_ok: bool = False
) -> ModelBundle:
    """The model named by ``spec`` (see the module docstring), its network moved to ``device``; ``data``
    replaces its training data (a tensor file or ``sklearn-digits``). A masked (discrete) model comes back as a
    :class:`MaskedModelBundle` only to a caller that takes one (``masked_ok``); elsewhere it is a ``ValueError``."""
    spec = str(spec)
    if spec in MODELS:
        bundle = MODELS[spec]()
    elif spec.startswith("diffusers:"):
        bundle = load_pipeline_folder(spec.split(":", 1)[1])
    elif Path(spec).is_dir():
        bundle = load_pipeline_folder(spec)
    elif ":" in spec and not Path(spec).exists():
        bundle = _from_factory(spec)
    else:
        raise ValueError(f"unknown model {spec!r}: expected {describe_models()}")
    if isinstance(bundle, MaskedModelBundle):
        if not masked_ok:
            raise ValueError(
                f"model {spec!r} is a masked (discrete) diffusion model: `diffsamplers sample` and `diffsamplers eval` "
                "take it, this job samples continuous models"
            )
        if data is not None:
            raise ValueError(f"model {spec!r} is a masked (discrete) model: it takes no --data")
        if device is not None and isinstance(bundle.diffusion.model, torch.nn.Module):
            bundle.diffusion.model.to(device)
        return bundle  # type: ignore[return-value]
    if data is not None:
        bundle.data = load_data(data)
    if device is not None and isinstance(bundle.denoiser.model, torch.nn.Module):
        bundle.denoiser.model.to(device)
    return bundle


def load_data(spec: str | Path) -> Any:
    """A data set by name or file: ``sklearn-digits`` (the digits model's 1,438 training images, 16×16 in [−1, 1],
    with labels) or a tensor file (``.pt``, ``.npy``, or ``.safetensors`` holding ``x``/``images`` and optional
    ``labels``)."""
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
    return torch.load(path, map_location="cpu", weights_only=True)
