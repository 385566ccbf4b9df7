"""Reading the config of the scheduler a pipeline shipped with: a flow-matching config becomes the flow config it means.

Most recent diffusers pipelines (Stable Diffusion 3, Flux, Sana, …) are flow-matching models whose scheduler is
``FlowMatchEulerDiscreteScheduler``. diffusers' multistep schedulers read such a config as a VP ε-prediction one —
its ``shift`` is "ignored" and the prediction type stays ``"epsilon"`` — so a plain
``DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`` samples garbage (diffusers issue #9924). Ours read
it as the flow scheduler it describes (:func:`read_source_config`, called by
:meth:`~diffsamplers.adapters.scheduler_base.SolverScheduler.from_config` and so by ``from_pretrained``):

====================================  ====================================================================
FlowMatch key                         our key
====================================  ====================================================================
(the class, or a ``shift`` key)       ``use_flow_sigmas=True``, ``prediction_type="flow_prediction"``
``shift``                             ``flow_shift``
``use_dynamic_shifting``,             the same keys (``set_timesteps(mu=…)`` then shifts; the pipelines
``time_shift_type``,                  compute μ from ``base_shift``/``max_shift``/``base_image_seq_len``/
``shift_terminal``, ``base_shift``,   ``max_image_seq_len``, which are kept for them)
``max_shift``, ``base_image_seq_len``,
``max_image_seq_len``
``use_karras_sigmas`` …               the same keys (refused on a flow grid unless UniPC's Karras sigmas)
``invert_sigmas=True``                refused (a time convention no multistep solver here runs)
``stochastic_sampling=True``          not carried, with a warning (the solvers here integrate the ODE; SDE-DPM-Solver++ is
                                      ``algorithm_type="sde-dpmsolver++"``)
====================================  ====================================================================

Keyword arguments of ``from_config`` override the translated keys; ``use_flow_sigmas=False`` keeps diffusers'
reading (a VP scheduler; the FlowMatch keys are dropped with a warning). A config that is not a FlowMatch class but
carries its ``shift`` key is read as a flow config, with a warning saying how to override.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

__all__ = ["FLOW_MATCH_KEYS", "is_flow_matching_config", "read_source_config"]

logger = logging.getLogger(__name__)

#: Keys only FlowMatch schedulers have: they are translated or refused, never passed on.
FLOW_MATCH_KEYS = ("shift", "invert_sigmas", "stochastic_sampling")

#: FlowMatch keys our schedulers share, carried as they are.
_CARRIED = (
    "num_train_timesteps",
    "use_dynamic_shifting",
    "time_shift_type",
    "shift_terminal",
    "base_shift",
    "max_shift",
    "base_image_seq_len",
    "max_image_seq_len",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
)


def is_flow_matching_config(config: Mapping[str, Any]) -> bool:
    """Whether ``config`` is a FlowMatch scheduler's: its class name starts with ``FlowMatch``, or it has the FlowMatch
    ``shift`` key and none of the multistep schedulers' flow keys (``scheduler.config`` in memory has no class
    name; a saved one has)."""
    if str(config.get("_class_name", "")).startswith("FlowMatch"):
        return True
    return "shift" in config and "use_flow_sigmas" not in config and "flow_shift" not in config


def read_source_config(
    config: Mapping[str, Any], overrides: Mapping[str, Any], target: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config, overrides)`` for ``target.from_config``: a flow-matching ``config`` translated as the module
    docstring says, the other configs unchanged; FlowMatch-only keys given as overrides are consumed."""
    cfg, kwargs = dict(config), dict(overrides)
    if not is_flow_matching_config(cfg):
        return cfg, kwargs
    source = cfg.get("_class_name") or "FlowMatchEulerDiscreteScheduler"  # an in-memory config has no class name
    if kwargs.get("use_flow_sigmas") is False:
        dropped = {k: cfg.pop(k) for k in FLOW_MATCH_KEYS if k in cfg}
        logger.warning(
            "use_flow_sigmas=False: %s reads the flow-matching config of %s as a VP config; %s ignored",
            target,
            source,
            dropped or "no FlowMatch keys",
        )
        for key in FLOW_MATCH_KEYS:
            kwargs.pop(key, None)
        return cfg, kwargs
    if not str(source).startswith("FlowMatch"):
        logger.warning(
            "the config of %s has FlowMatch's 'shift' key: %s reads it as a flow-matching config "
            "(use_flow_sigmas=True, prediction_type='flow_prediction'); pass use_flow_sigmas=False to read it as VP",
            source,
            target,
        )
    settings = {key: kwargs.pop(key, cfg.get(key)) for key in FLOW_MATCH_KEYS}
    if settings["invert_sigmas"]:
        raise ValueError(
            f"invert_sigmas=True in the config of {source}: {target} cannot run inverted flow sigmas "
            "(σ = 1 − t); pass invert_sigmas=False to from_config only if the model uses the usual convention"
        )
    if settings["stochastic_sampling"]:
        logger.warning(
            "stochastic_sampling=True of %s is not carried over: %s integrates the probability-flow ODE "
            "(algorithm_type='sde-dpmsolver++' is DPM-Solver++'s stochastic sampler)",
            source,
            target,
        )
    shift = 1.0 if settings["shift"] is None else float(settings["shift"])
    translated = {key: cfg[key] for key in _CARRIED if key in cfg}
    translated.update(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)
    logger.info("%s: flow-matching config of %s read as %s", target, source, translated)
    return translated, kwargs
