"""Our samplers on a flow model through the diffusers schedulers: DC-Solver ratios searched with ``sample()`` on the
scheduler's own flow grid, and any flow schedule (a learned one) passed as ``sigmas=``, give in the scheduler the
numbers ``sample()`` gives.
"""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffsamplers import (
    DCSolver,
    DCSolverScheduler,
    Denoiser,
    DPMSolverPlusPlus,
    DPMSolverPlusPlusScheduler,
    sample,
)
from diffsamplers.noise import noise_process_from_config
from diffsamplers.reference import reference_samples, reference_trajectory
from diffsamplers.schedules import Schedule
from diffsamplers.schedules.diffusers_compat import schedule_from_scheduler_config
from diffsamplers.solvers.dc_ratios import DCRatios, schedule_description
from diffsamplers.tuning.dc_search import search_dc_ratios
from tests.adapters.test_flow_matching import SD3, velocity, x_T
from tests.helpers import SMOOTH_MIXTURE, rms, scheduler_loop

pytestmark = pytest.mark.usefixtures("single_thread")

SOURCE = FlowMatchEulerDiscreteScheduler(**SD3).config


def test_searched_dc_ratios_run_in_the_scheduler(tmp_path):
    """Ratios searched on the DC scheduler's 6-step flow grid load into ``DCSolverScheduler.from_config(FlowMatch
    config, dc_ratios=file)``; its loop equals ``sample()`` with those ratios and, on held-out noise, is closer to
    the reference than the same scheduler without ratios (UniPC): measured RMS 0.163 against 0.179 on 32 noises
    (SD3's shift 3 grid on this mixture; the search runs on the network as the pipeline calls it, at diffusers'
    truncated timesteps)."""
    nfe = 6
    plain = DCSolverScheduler.from_config(SOURCE)
    process = noise_process_from_config(plain.config)
    schedule = schedule_from_scheduler_config(process, plain.config, nfe, flavour="unipc")
    # the network as the pipeline calls it: at diffusers' truncated timesteps, which the plan carries
    network = Denoiser(SMOOTH_MIXTURE.as_model(process, "flow_prediction"), process, "flow_prediction")
    x_search = x_T(10, batch=10)
    reference = reference_trajectory(network, schedule, x_search)
    found = search_dc_ratios(network, DCSolver(), schedule, x_search, model_id="flow", reference=reference)
    path = found.save(tmp_path / "ratios.safetensors")
    assert DCRatios.load(path).schedule == schedule_description(schedule, process)

    scheduler = DCSolverScheduler.from_config(SOURCE, dc_ratios=str(path))
    x = x_T(11, batch=32)
    ours = scheduler_loop(scheduler, x, velocity, num_inference_steps=nfe)
    looped = sample(network, DCSolver(found.ratios), schedule, x_T=x, progress=False)
    assert (ours - looped).abs().max() <= 1e-5
    truth = reference_samples(SMOOTH_MIXTURE.as_denoiser(process), x, schedule=schedule)
    unipc = scheduler_loop(plain, x, velocity, num_inference_steps=nfe)
    assert rms(ours, truth) < 0.95 * rms(unipc, truth), (rms(ours, truth), rms(unipc, truth))


def test_a_flow_schedule_passes_through_sigmas():
    """A schedule in flow times (here a hand-made one, as a learned Align Your Steps file gives) reaches the scheduler
    unchanged when the shift is off: ``sigmas=`` = its levels without the final 0, and the loop equals ``sample()``
    on that schedule."""
    t = np.array([0.99, 0.9, 0.7, 0.45, 0.2, 0.05])
    scheduler = DPMSolverPlusPlusScheduler.from_config(SOURCE, flow_shift=1.0)
    process = noise_process_from_config(scheduler.config)
    x = x_T(5)
    ours = scheduler_loop(scheduler, x, velocity, sigmas=t)
    assert torch.allclose(scheduler.sigmas[:-1].double(), torch.from_numpy(t), atol=1e-7)
    schedule = Schedule(np.append(t / (1 - t), 0.0))
    looped = sample(SMOOTH_MIXTURE.as_denoiser(process), DPMSolverPlusPlus(2), schedule, x_T=x, progress=False)
    assert (ours - looped).abs().max() <= 1e-5
