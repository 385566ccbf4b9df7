"""``--solver best``: the recipe shipped per NFE (diffsamplers.apps.best), in compare and in the sample job."""

from __future__ import annotations

import pytest
import torch

from diffsamplers.apps.best import BEST_DIR, BestRecipe, best_recipe, best_recipes, write_best
from diffsamplers.apps.compare import Method, run_compare
from diffsamplers.apps.recipes import parse_solver
from diffsamplers.apps.registry import load_model
from diffsamplers.apps.samplers import make_sampler
from diffsamplers.models.gmm import default_mixture, default_process
from diffsamplers.sampling import initial_noise
from diffsamplers.schedules import uniform_logsnr
from diffsamplers.teleport.statistics import GaussianStatistics

SHIPPED = best_recipes("gmm")  # shipped by scripts/few_step_table.py --problems gmm ... --ship


def _recipe(teleport: bool) -> BestRecipe:
    process = default_process()
    top = 20.0 if teleport else float(process.sigma_max)
    sigmas = uniform_logsnr(process, 4, sigma_max=top).sigmas
    return BestRecipe(4, "test", "unipc:final_step=midpoint", tuple(sigmas.tolist()), teleport=teleport)


def test_recipes_round_trip_and_name_what_exists(tmp_path) -> None:
    recipes = {4: _recipe(True), 6: BestRecipe(6, "dc", "dc-solver:search", (80.0, 1.0, 0.0), ratios=(1.0, 1.0))}
    write_best("toy", recipes, {"command": "test"}, tmp_path)
    back = best_recipes("toy", tmp_path)
    assert back == recipes
    with pytest.raises(ValueError, match="shipped NFEs: 4, 6"):
        best_recipe("toy", 5, tmp_path)
    assert best_recipes("nothing", tmp_path) == {}
    assert parse_solver("best").is_best
    with pytest.raises(ValueError, match="shipped recipe"):
        parse_solver("best").build()


def test_a_teleporting_recipe_spends_exactly_its_evaluations() -> None:
    gmm, process = default_mixture(), default_process()
    den = gmm.as_denoiser(process)
    calls = []
    inner = den.predict_x0

    def counted(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    den.predict_x0 = counted  # type: ignore[method-assign]
    recipe = _recipe(True)
    x_T = initial_noise(process, recipe.initial_sigma(den), (8, *gmm.sample_shape), 0)
    assert recipe.initial_sigma(den) == pytest.approx(process.sigma_max)
    out = recipe.sample(den, x_T, GaussianStatistics.from_gmm(gmm), progress=False)
    assert len(calls) == 4 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="Gaussian statistics"):
        recipe.start(den, x_T, None)


def test_shipped_gmm_recipes_beat_diffusers_on_the_compare_noises() -> None:
    assert SHIPPED, "diffsamplers/assets/best/gmm.json is part of the package"
    """The compare job's own noises (seed 0, not those the recipes were chosen on): the shipped recipe at each NFE
    is more accurate than diffusers' DPM-Solver++ 2M and UniPC with Karras sigmas at the same NFE."""
    nfes = sorted(n for n in SHIPPED if n <= 10)[:3]
    methods = [
        Method("best", "best"),
        Method("2M Karras", "diffusers:DPMSolverMultistepScheduler:use_karras_sigmas=true"),
        Method("UniPC Karras", "diffusers:UniPCMultistepScheduler:use_karras_sigmas=true"),
    ]
    report = run_compare(nfes=nfes, num_samples=32, methods=methods, progress=False)
    rows = {m["name"]: m["errors"] for m in report["methods"]}
    for n in nfes:
        assert rows["best"][str(n)] < min(rows["2M Karras"][str(n)], rows["UniPC Karras"][str(n)])
    assert set(report["best_shipped"]) == {str(n) for n in nfes}


def test_sample_job_uses_the_shipped_recipe() -> None:
    bundle = load_model("gmm")
    n = min(SHIPPED)
    images, _ = make_sampler(bundle, "best", n)(range(4))
    assert images.shape[0] == 4
    with pytest.raises(ValueError, match="no recipe shipped"):
        make_sampler(bundle, "best", 999)


def test_shipped_files_hold_complete_recipes() -> None:
    for path in BEST_DIR.glob("*.json"):
        for nfe, recipe in best_recipes(path.stem).items():
            assert len(recipe.sigmas) == nfe + 1 and recipe.sigmas[-1] == 0.0
            assert recipe.measured and "stop" in recipe.measured
