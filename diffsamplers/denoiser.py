"""The denoiser: any network, seen through one signature x̂0 = D(x, t, cond).

Adapts a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` / transformer, or any callable
``f(x, timestep, **cond)``, whatever its prediction type (ε, x0, v, flow), and applies classifier-free
guidance (Ho & Salimans 2022, Eq. 6) with one batched model call. The result is always in float32 (or
float64 for float64 inputs), whatever the network's dtype.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from .noise import NoiseProcess
from .prediction import check_prediction_type, from_x0, to_x0

__all__ = ["Denoiser", "compute_dtype", "slice_cond", "cond_batch_size"]

Cond = Mapping[str, Any] | None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype solver arithmetic runs in: at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _expand_tree(value: Any, batch: int) -> Any:
    if isinstance(value, Mapping):
        return {k: _expand_tree(v, batch) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == 1 and batch != 1:
        return value.expand(batch, *value.shape[1:])
    return value


def _concat_tree(uncond: Any, cond: Any, batch: int, key: str = "cond") -> Any:
    """Stack the unconditional and conditional inputs along the batch, as one model call needs them."""
    if isinstance(cond, Mapping) or isinstance(uncond, Mapping):
        if not (isinstance(cond, Mapping) and isinstance(uncond, Mapping)):
            raise TypeError(f"{key}: cond and uncond must both be mappings")
        if set(cond) != set(uncond):
            raise ValueError(f"{key}: cond and uncond have different keys: {sorted(cond)} vs {sorted(uncond)}")
        return {k: _concat_tree(uncond[k], cond[k], batch, f"{key}.{k}") for k in cond}
    if isinstance(cond, torch.Tensor) and cond.ndim >= 1:
        if not isinstance(uncond, torch.Tensor):
            raise TypeError(f"{key}: cond is a tensor but uncond is {type(uncond).__name__}")
        c, u = _expand_tree(cond, batch), _expand_tree(uncond, batch)
        if c.shape[0] != batch or u.shape[0] != batch:
            raise ValueError(
                f"{key}: batch sizes {tuple(c.shape)} / {tuple(u.shape)} do not match the sample batch {batch}"
            )
        return torch.cat([u, c.to(u.device)], dim=0)
    return cond


def cond_batch_size(cond: Any) -> int | None:
    """The batch size of the first tensor with a batch dimension in a (nested) condition, if any."""
    if isinstance(cond, Mapping):
        for v in cond.values():
            b = cond_batch_size(v)
            if b is not None:
                return b
        return None
    if isinstance(cond, torch.Tensor) and cond.ndim >= 1:
        return int(cond.shape[0])
    return None


def slice_cond(cond: Any, start: int, stop: int, batch: int) -> Any:
    """Take rows ``start:stop`` of every tensor in a (nested) condition whose first dimension is ``batch``."""
    if isinstance(cond, Mapping):
        return {k: slice_cond(v, start, stop, batch) for k, v in cond.items()}
    if isinstance(cond, torch.Tensor) and cond.ndim >= 1 and cond.shape[0] == batch:
        return cond[start:stop]
    return cond


def _timestep_calling_convention(model: Callable) -> str:
    fn = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return "positional"
    names = [p.name for p in params]
    if len(names) >= 2 and names[1] in ("timestep", "timesteps", "t", "sigma", "time"):
        return "positional"
    if "timestep" in names:
        return "keyword"
    return "positional"


def _model_dtype(model: Callable) -> torch.dtype | None:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.dtype
    return getattr(model, "dtype", None) if isinstance(getattr(model, "dtype", None), torch.dtype) else None


class Denoiser:
    """x̂0 = D(x, t, cond) for a network trained on ``process`` with the given ``prediction_type``.

    Args:
        model: a diffusers model or any callable ``model(x, timestep, **cond)`` returning a tensor, a tuple
            whose first item is the prediction, or an object with ``.sample``.
        process: the noise process the model was trained on.
        prediction_type: ``"epsilon"``, ``"sample"``, ``"v_prediction"`` or ``"flow_prediction"``.
        guidance_scale: classifier-free guidance weight w in ``u + w (c − u)``; 1 disables guidance.
        learned_variance: whether the output carries a variance half in the channel dimension (ADM/DeepFloyd);
            ``None`` detects it from an output with twice the input channels.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        process: NoiseProcess,
        prediction_type: str = "epsilon",
        guidance_scale: float = 1.0,
        learned_variance: bool | None = None,
    ):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if not isinstance(process, NoiseProcess):
            raise TypeError(f"process must be a NoiseProcess, got {type(process).__name__}")
        self.model = model
        self.process = process
        self.prediction_type = check_prediction_type(prediction_type)
        self.guidance_scale = float(guidance_scale)
        self.learned_variance = learned_variance
        self._convention = _timestep_calling_convention(model)

    @property
    def model_dtype(self) -> torch.dtype | None:
        return _model_dtype(self.model)

    # ------------------------------------------------------------------------------------------
    def __call__(
        self,
        x: torch.Tensor,
        t: float | np.ndarray,
        cond: Cond = None,
        uncond: Cond = None,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """x̂0 at process time ``t`` (a float, or one value per sample as a host array)."""
        alpha, sigma, timestep = self._coefficients(x, t)
        return self.predict_x0(x, timestep, alpha, sigma, cond=cond, uncond=uncond, guidance_scale=guidance_scale)

    def epsilon(
        self,
        x: torch.Tensor,
        t: float | np.ndarray,
        cond: Cond = None,
        uncond: Cond = None,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """The noise prediction ε̂ = (x − α x̂0)/σ at process time ``t``."""
        x0 = self(x, t, cond=cond, uncond=uncond, guidance_scale=guidance_scale)
        alpha, sigma, _ = self._coefficients(x, t)
        return from_x0(x0, x.to(x0.dtype), alpha, sigma, "epsilon")

    def _coefficients(self, x: torch.Tensor, t: float | np.ndarray) -> tuple[Any, Any, Any]:
        t_arr = np.asarray(t, dtype=np.float64)
        sigma_tilde = self.process.sigma_tilde(t_arr)
        alpha, sigma = self.process.alpha_sigma(sigma_tilde)
        timestep = self.process.timestep(t_arr)
        if t_arr.ndim == 0:
            return float(alpha), float(sigma), float(timestep)
        if t_arr.shape != (x.shape[0],):
            raise ValueError(f"per-sample times must have shape ({x.shape[0]},), got {t_arr.shape}")
        view = (-1,) + (1,) * (x.ndim - 1)
        dtype = compute_dtype(x.dtype)
        as_tensor = lambda a: torch.as_tensor(a, dtype=dtype).to(x.device, non_blocking=True).view(view)  # noqa: E731
        return as_tensor(alpha), as_tensor(sigma), torch.as_tensor(timestep, dtype=torch.float32).to(x.device)

    # ------------------------------------------------------------------------------------------
    def predict_x0(
        self,
        x: torch.Tensor,
        timestep: float | torch.Tensor,
        alpha: float | torch.Tensor,
        sigma: float | torch.Tensor,
        cond: Cond = None,
        uncond: Cond = None,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """x̂0 given the network timestep and the marginal coefficients, precomputed by the caller."""
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        batch = x.shape[0]
        guided = uncond is not None and scale != 1.0
        if guided:
            x_in = torch.cat([x, x], dim=0)
            kwargs = _concat_tree(uncond, cond if cond is not None else {}, batch)
        else:
            x_in = x
            kwargs = _expand_tree(cond, batch) if cond is not None else {}
        out = self.call_model(x_in, timestep, kwargs)
        work = compute_dtype(x.dtype)
        if out.dtype != work:
            out = out.to(work)
        if guided:
            out_u, out_c = out.chunk(2, dim=0)
            out = torch.lerp(out_u, out_c, scale)
        return to_x0(out, x if x.dtype == work else x.to(work), alpha, sigma, self.prediction_type)

    def call_model(self, x: torch.Tensor, timestep: float | torch.Tensor, kwargs: Mapping[str, Any]) -> torch.Tensor:
        """One raw network call on a batch; returns the prediction with the sample's shape."""
        batch = x.shape[0]
        if isinstance(timestep, torch.Tensor):
            ts = timestep.to(x.device) if timestep.device != x.device else timestep
            ts = ts.expand(batch) if ts.ndim == 0 else (ts.repeat(batch // ts.shape[0]) if ts.shape[0] != batch else ts)
        else:
            value = float(timestep)
            dtype = torch.int64 if value.is_integer() else torch.float32
            ts = torch.full((batch,), value if dtype is torch.float32 else int(value), dtype=dtype, device=x.device)
        mdtype = self.model_dtype
        x_in = x.to(mdtype) if mdtype is not None and mdtype.is_floating_point and mdtype != x.dtype else x
        if self._convention == "keyword":
            raw = self.model(x_in, timestep=ts, **kwargs)
        else:
            raw = self.model(x_in, ts, **kwargs)
        out = raw.sample if hasattr(raw, "sample") else (raw[0] if isinstance(raw, (tuple, list)) else raw)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model returned {type(raw).__name__}, not a tensor or an output with .sample")
        return self._check_output(out, x)

    def _check_output(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if out.shape == x.shape and self.learned_variance is not True:
            return out
        doubled = (
            out.ndim == x.ndim
            and out.ndim >= 2
            and out.shape[0] == x.shape[0]
            and out.shape[1] == 2 * x.shape[1]
            and out.shape[2:] == x.shape[2:]
        )
        if doubled and self.learned_variance is not False:
            return out[:, : x.shape[1]]
        raise ValueError(
            f"model output shape {tuple(out.shape)} does not match the sample shape {tuple(x.shape)}"
            + (" (learned_variance=True expects twice the channels)" if self.learned_variance else "")
        )
