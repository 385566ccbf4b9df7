"""``MaskedDiffusionScheduler``: masked (absorbing-state) discrete diffusion behind diffusers' scheduler interface.

It follows diffusers' discrete schedulers (``AmusedScheduler``, ``VQDiffusionScheduler``): ``step`` takes the
network's **logits** ``(B, L, V)`` over the V real tokens as ``model_output`` and a **LongTensor** ``sample``
``(B, L)`` of token ids, the mask being ``mask_token_id`` (V by default, outside [0, V)), and returns the next
LongTensor. The maths is :mod:`diffsamplers.masked`: ``step`` calls :func:`~diffsamplers.masked.ancestral_step` or
:func:`~diffsamplers.masked.first_hitting_step` and restates nothing. With the same generator a diffusers-style loop
gives the library samplers' tokens bit for bit (both samplers; tested on the exact Markov-chain model)::

    scheduler.set_timesteps(num_inference_steps)
    x = scheduler.init_noise(batch_size, length)
    for t in scheduler.timesteps:
        logits = model(x, scheduler.model_timesteps(x, generator=g))  # or model(x, t) for a time-agnostic model
        x = scheduler.step(logits, t, x, generator=g).prev_sample

**Ancestral** (``sampler="ancestral"``; MDLM, Sahoo et al. 2024, Eq. 7): ``set_timesteps(N)`` makes the uniform grid
t_k = 1 − k/N, k = 0 … N − 1, the times of the N model calls (float32, as :class:`~diffsamplers.masked.
AncestralSampler` passes them); step k goes from t_k to t_{k+1} (t_N = 0, where every mask left is filled): a masked
token stays masked with probability m(t_{k+1})/m(t_k). A pipeline may reuse the last logits when a step changed no
token and the model is time-agnostic (what the library sampler's cache does); the scheduler does not need to know.

**First-hitting** (``sampler="first_hitting"``; Zheng et al., "Masked Diffusion Models are Secretly Time-Agnostic
Masked Models and Exploit Inaccurate Categorical Sampling", 2024, arXiv:2409.02908, Sec. 4.1, Alg. 1): each step is
one *event*: the row's next first-hitting time τ = m⁻¹(m(t)·u^{1/n}) (n the row's masked tokens), then
``tokens_per_step`` = k uniformly chosen masked positions take tokens from the logits. Times are random and per row,
so the schedule is a count of events: ``set_timesteps(N)`` means N model calls, and N must be at least ⌈n/k⌉ for
the most masked row of the sample met at the first step (⌈L/k⌉ from the all-mask start:
:meth:`MaskedDiffusionScheduler.first_hitting_steps`); extra steps leave finished rows untouched. ``timesteps`` is
then the countdown N − 1, …, 0 of events left after the current one (a LongTensor, as ``AmusedScheduler``'s). The
continuous times are exposed per row: :attr:`~MaskedDiffusionScheduler.row_times` ``(B,)`` float64, each row's time
after the last step (τ of its last event; 1 before the first step), and :meth:`~MaskedDiffusionScheduler.
model_timesteps`, the ``(B,)`` times at which a time-conditioned network must be called for the coming step (τ of
the coming event): the first-hitting step draws its hitting-time uniforms first, so these are read ahead from the
generator's state without consuming it (``step`` must then get the same generator, untouched in between).

**Model times.** With ``time_conditioned=False`` (the optimal denoiser is time-agnostic, Zheng et al. 2024,
Prop. 3.2) :meth:`~MaskedDiffusionScheduler.model_timesteps` returns ``None``, what the library passes such a model.

**Host reads.** The first step of a run reads the sample's token check (and, first-hitting, the largest number of
masked tokens) back from the device, once; the first step's ``timestep``, if a device tensor, is read to find its
index. Later steps read nothing, unless ``sample`` is not the tensor the previous step returned (then its tokens are
checked again, one read). ``add_noise`` checks its inputs (one read).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ..masked.samplers import MaskedDiffusion, ancestral_step, first_hitting_step, first_hitting_times
from ..masked.schedules import MaskingSchedule, masking_schedule
from .scheduler_base import check_json_config

__all__ = ["MaskedDiffusionScheduler", "MaskedSchedulerOutput"]

#: The ``sampler`` config values.
SAMPLERS = ("ancestral", "first_hitting")
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class MaskedSchedulerOutput(BaseOutput):
    """What :meth:`MaskedDiffusionScheduler.step` returns.

    Attributes:
        prev_sample: ``(B, L)`` int64, the tokens after the step (the next model input).
        pred_original_sample: ``(B, L)`` int64, x̂0: the sample with every masked position filled by the argmax of
            its logits (a preview; not a draw).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def _no_model(x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    raise RuntimeError("the scheduler's diffusion has no model: step() hands it the logits")


def _stream(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    """The generator ``torch.rand(..., generator=generator, device=device)`` draws from."""
    if generator is not None:
        return generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    if device.type == "cpu":
        return torch.default_generator
    raise ValueError(f"pass a generator to read hitting times ahead on a {device.type} device")


class MaskedDiffusionScheduler(SchedulerMixin, ConfigMixin):
    """The ancestral (MDLM) and first-hitting samplers of masked diffusion as a diffusers scheduler (see the module
    docstring for the loop, the timesteps of each sampler and the host reads).

    Args:
        vocab_size: V, the number of real tokens (the logits' last axis).
        mask_token_id: the mask's id (``None``: V, registered as such); must not lie in [0, V).
        masking_schedule: a spec of :func:`diffsamplers.masked.masking_schedule`: ``linear``, ``cosine``,
            ``poly:p=2``, ``loglinear:eps=0.001``, …
        sampler: ``"ancestral"`` or ``"first_hitting"``.
        tokens_per_step: k, the tokens a first-hitting step unmasks per row (k > 1: the parallel variant, which
            draws them conditionally independently from the same logits); unused by the ancestral sampler.
        categorical_dtype: ``"float64"`` (exact) or ``"float32"`` (reproduces the truncated Gumbel noise of float32
            code, which lowers the effective temperature: Zheng et al. 2024, Sec. 5).
        time_conditioned: whether the network reads t (see :meth:`model_timesteps`).
        categorical_chunk_rows: rows per chunk of categorical sampling, to bound memory (``None``: all at once).
    """

    order = 1
    _compatibles: list[str] = []

    @register_to_config
    def __init__(
        self,
        vocab_size: int,
        mask_token_id: int | None = None,
        masking_schedule: str = "linear",
        sampler: str = "ancestral",
        tokens_per_step: int = 1,
        categorical_dtype: str = "float64",
        time_conditioned: bool = False,
        categorical_chunk_rows: int | None = None,
    ):
        if isinstance(masking_schedule, MaskingSchedule):
            self.register_to_config(masking_schedule=masking_schedule.spec)
        if mask_token_id is None:
            self.register_to_config(mask_token_id=vocab_size)
        # diffusers lists positional arguments among the defaults used, and from_config(config) then drops them;
        # vocab_size is required and the mask id is registered, so neither is a default
        defaults = self.config.get("_use_default_values")
        if defaults is not None:
            kept = [k for k in defaults if k not in ("vocab_size", "mask_token_id")]
            self.register_to_config(_use_default_values=kept)
        check_json_config(self.config, type(self).__name__)
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}: expected one of {SAMPLERS}")
        if not isinstance(tokens_per_step, int) or isinstance(tokens_per_step, bool) or tokens_per_step < 1:
            raise ValueError(f"tokens_per_step must be a positive integer, got {tokens_per_step!r}")
        if categorical_dtype not in _DTYPES:
            raise ValueError(f"unknown categorical_dtype {categorical_dtype!r}: expected one of {sorted(_DTYPES)}")
        self.schedule: MaskingSchedule = _schedule_from(self.config.masking_schedule)
        #: The library's view of the process (its model is never called: ``step`` passes the logits).
        self.diffusion = MaskedDiffusion(
            _no_model,
            vocab_size,
            self.schedule,
            mask_id=self.config.mask_token_id,
            time_conditioned=bool(time_conditioned),
            dtype=_DTYPES[categorical_dtype],
            chunk_rows=categorical_chunk_rows,
        )
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None
        self._times: list[float] = []
        self._masks: list[float] = []
        self._reset()

    def _reset(self) -> None:
        self._step_index: int | None = None
        self._row_times: torch.Tensor | None = None
        self._last: torch.Tensor | None = None

    # -- schedule -------------------------------------------------------------------------------
    @property
    def mask_token_id(self) -> int:
        """The mask's id."""
        return self.diffusion.mask

    @property
    def step_index(self) -> int | None:
        """Index of the coming step in :attr:`timesteps` (``None`` before the first step)."""
        return self._step_index

    @property
    def row_times(self) -> torch.Tensor | None:
        """``(B,)`` float64: each row's time after the last step (ancestral: t_{k+1} for every row; first-hitting:
        the row's last hitting time, 1 before its first event); ``None`` before the first step."""
        return self._row_times

    def first_hitting_steps(self, length: int) -> int:
        """⌈length / k⌉: the first-hitting steps that unmask ``length`` masked tokens, k = ``tokens_per_step``."""
        if length < 1:
            raise ValueError(f"length must be positive, got {length}")
        return math.ceil(length / self.config.tokens_per_step)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Set the schedule of N = ``num_inference_steps`` model calls (see the module docstring): ancestral, the
        float32 grid t_k = 1 − k/N; first-hitting, the int64 countdown N − 1, …, 0 of events."""
        n = num_inference_steps
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {n!r}")
        self.num_inference_steps = n
        if self.config.sampler == "ancestral":
            # the library sampler's grid, as Python floats (AncestralSampler.sample, start_time = 1)
            self._times = [1.0 * (1.0 - k / n) for k in range(n + 1)]
            self._masks = [self.schedule.mask_probability(t) for t in self._times]
            self.timesteps = torch.tensor(self._times[:-1], dtype=torch.float32, device=device)
        else:
            self._times, self._masks = [], []
            self.timesteps = torch.arange(n - 1, -1, -1, dtype=torch.int64, device=device)
        self._reset()

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """The identity (token ids are not scaled)."""
        return sample

    def init_noise(self, batch_size: int, length: int, device: str | torch.device | None = None) -> torch.Tensor:
        """The all-mask ``(batch_size, length)`` int64 start of sampling (the state at t = 1)."""
        return self.diffusion.all_masked(batch_size, length, device=device or "cpu")

    # -- stepping -------------------------------------------------------------------------------
    def _index_for_timestep(self, timestep: float | torch.Tensor) -> int:
        """Position of ``timestep`` in :attr:`timesteps` (the first step only; reads a device tensor once)."""
        assert self.timesteps is not None
        given = float(timestep.item()) if isinstance(timestep, torch.Tensor) else float(timestep)
        host = self.timesteps.detach().cpu()
        value = given
        if host.dtype.is_floating_point:  # compare at the schedule's precision (a Python 0.9 is float32's 0.9)
            value = float(torch.tensor(given, dtype=host.dtype))
        matches = (host.double() == value).nonzero()
        if matches.numel() == 0:
            raise ValueError(f"timestep {given:g} is not in the schedule {[round(v, 6) for v in host.tolist()]}")
        return int(matches[0, 0])

    def _check_step_inputs(self, logits: torch.Tensor, sample: torch.Tensor) -> None:
        if sample.ndim != 2 or sample.dtype.is_floating_point or sample.dtype.is_complex or sample.dtype == torch.bool:
            raise ValueError(
                f"sample must be a (batch, length) integer tensor of token ids, got {sample.dtype} of shape "
                f"{tuple(sample.shape)}"
            )
        if not logits.dtype.is_floating_point:
            raise ValueError(f"model_output must be floating-point logits, got {logits.dtype}")
        vocab = self.config.vocab_size
        if logits.ndim != 3 or tuple(logits.shape[:2]) != tuple(sample.shape):
            raise ValueError(
                f"model_output must be logits of shape (batch, length, vocab) = {(*sample.shape, vocab)}, got "
                f"{tuple(logits.shape)}"
            )
        if logits.shape[-1] != vocab:
            raise ValueError(
                f"model_output has logits over {logits.shape[-1]} tokens; the scheduler's vocabulary has "
                f"vocab_size={vocab} (the mask gets no logit)"
            )

    def model_timesteps(self, sample: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """``(B,)`` float32: the times at which a time-conditioned network must be called on ``sample`` for the
        coming step, as the library samplers call it (``None`` with ``time_conditioned=False``).

        Ancestral: t_k for every row. First-hitting: each row's coming hitting time τ, read ahead from
        ``generator`` (``None``: the device's default generator) without consuming it: ``step`` must get the same
        generator, with nothing drawn from it in between. No host read.
        """
        if not self.config.time_conditioned:
            return None
        if self.timesteps is None:
            raise ValueError("call set_timesteps before model_timesteps")
        k = self._step_index or 0
        if k >= len(self.timesteps):
            raise ValueError(f"all {len(self.timesteps)} steps have been taken; call set_timesteps again")
        batch = sample.shape[0]
        if self.config.sampler == "ancestral":
            return torch.full((batch,), self._times[k], dtype=torch.float32, device=sample.device)
        t = self._current_times(sample)
        stream = _stream(generator, sample.device)
        state = stream.get_state()
        # the uniforms first_hitting_step draws first, drawn alike and then given back to the generator
        u = torch.rand(
            batch, self.config.tokens_per_step, generator=generator, dtype=torch.float64, device=sample.device
        )
        stream.set_state(state)
        masked = (sample == self.mask_token_id).sum(dim=1)
        return first_hitting_times(self.schedule, t, masked, u)[:, 0].to(torch.float32)

    def _current_times(self, sample: torch.Tensor) -> torch.Tensor:
        if self._row_times is None:
            return torch.ones(sample.shape[0], dtype=torch.float64, device=sample.device)
        if self._row_times.shape[0] != sample.shape[0]:
            raise ValueError(
                f"sample has {sample.shape[0]} rows but this run started with {self._row_times.shape[0]}; "
                "call set_timesteps to start a new run"
            )
        return self._row_times

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> MaskedSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One step of the configured sampler.

        Args:
            model_output: ``(B, L, V)`` logits of p_θ(x0 | sample) over the V real tokens (any float dtype; turned
                into probabilities in float64).
            timestep: the current element of :attr:`timesteps` (used to find the first step's index).
            sample: ``(B, L)`` int64 token ids in [0, V) or the mask id.
            generator: the random stream (on the sample's device); ``None``: the global one.
            return_dict: return a :class:`MaskedSchedulerOutput` rather than ``(prev_sample, pred_original_sample)``.
        """
        if self.timesteps is None or self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None': call set_timesteps before step")
        self._check_step_inputs(model_output, sample)
        first = self._step_index is None
        k = self._index_for_timestep(timestep) if first else self._step_index
        assert k is not None
        if k >= self.num_inference_steps:
            raise ValueError(f"all {self.num_inference_steps} steps have been taken; call set_timesteps again")
        if first or sample is not self._last:
            self.diffusion.check(sample)  # one host read: ids in [0, V) or the mask
        x = sample.long()
        mask = self.mask_token_id
        if self.config.sampler == "ancestral":
            probs = torch.softmax(model_output.to(torch.float64), dim=-1)
            prev = ancestral_step(self.diffusion, x, probs, self._masks[k], self._masks[k + 1], generator)
            times = torch.full((x.shape[0],), self._times[k + 1], dtype=torch.float64, device=x.device)
        else:
            t = self._current_times(x)
            if first:
                most = int((x == mask).sum(dim=1).max())  # one host read, at the first step
                needed = self.first_hitting_steps(most) if most else 0
                if needed > self.num_inference_steps - k:
                    raise ValueError(
                        f"{self.num_inference_steps - k} first-hitting steps cannot unmask {most} tokens "
                        f"{self.config.tokens_per_step} at a time: need {needed}; call set_timesteps({needed + k})"
                    )
            diffusion = dataclasses.replace(self.diffusion, model=lambda _x, _t: model_output)
            prev, times = first_hitting_step(diffusion, x, t, generator, self.config.tokens_per_step)
        x0 = torch.where(x == mask, model_output.argmax(dim=-1), x)
        self._step_index = k + 1
        self._row_times = times
        self._last = prev
        if not return_dict:
            return prev, x0
        return MaskedSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    # -- forward process ------------------------------------------------------------------------
    def add_noise(
        self,
        original_samples: torch.Tensor,
        timesteps: float | torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The forward process: each token of ``original_samples`` ``(B, L)`` is replaced by the mask independently
        with probability m(t) (masks already there stay).

        Args:
            original_samples: ``(B, L)`` token ids in [0, V) or the mask id.
            timesteps: continuous times t ∈ [0, 1]: a number, or a float tensor of one time or one per row.
            generator: the random stream for the ``(B, L)`` float64 uniforms (on the samples' device).
        """
        x = self.diffusion.check(original_samples)
        if isinstance(timesteps, torch.Tensor):
            if not timesteps.dtype.is_floating_point:
                raise ValueError(
                    f"timesteps are continuous times t in [0, 1]: pass a float tensor, got {timesteps.dtype} "
                    "(first-hitting's timesteps count events, they are not times)"
                )
            t = timesteps.to(device=x.device, dtype=torch.float64).reshape(-1)
        else:
            t = torch.tensor([float(timesteps)], dtype=torch.float64, device=x.device)
        if t.numel() not in (1, x.shape[0]):
            raise ValueError(f"need one time or one per row ({x.shape[0]}), got {t.numel()} times")
        outside = (t < 0) | (t > 1) | t.isnan()
        if outside.any():
            raise ValueError(f"timesteps must lie in [0, 1], got {float(t[outside][0])}")
        m = self.schedule.mask_probability(t).reshape(-1, 1)
        u = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=x.device)
        return torch.where(u < m, torch.full_like(x, self.mask_token_id), x)


def _schedule_from(spec: str) -> MaskingSchedule:
    """The schedule of a config's ``masking_schedule`` spec (a ``ValueError`` names an unknown one)."""
    if not isinstance(spec, str):
        raise ValueError(f"masking_schedule must be a spec string such as 'cosine' or 'poly:p=2', got {spec!r}")
    return masking_schedule(spec)
