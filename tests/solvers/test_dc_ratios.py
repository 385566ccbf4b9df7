"""Ratio files: safetensors + JSON metadata, atomic writes, and clear refusals for another configuration."""

import json

import pytest
import torch

from diffsamplers.artifacts import ArtifactError, load_artifact, save_artifact
from diffsamplers.models.gmm import default_process
from diffsamplers.schedules import diffusers_spacing
from diffsamplers.solvers import DCSolver, DPMSolverPlusPlus, UniPC
from diffsamplers.solvers.dc_cpr import CascadePolynomialRegression
from diffsamplers.solvers.dc_ratios import DCRatios, RatioMismatchError, schedule_description, solver_settings

PROCESS = default_process()


def _ratios(nfe=6, model="gmm", scale=7.5, solver=None):
    solver = solver or DCSolver()
    return DCRatios(
        ratios=[1.0, 1.0] + [0.9 + 0.05 * i for i in range(nfe - 2)],
        model=model,
        guidance_scale=scale,
        schedule=schedule_description(diffusers_spacing(PROCESS, nfe), PROCESS),
        solver=solver_settings(solver),
        search={"datapoints": 10},
    )


def test_round_trip_and_metadata(tmp_path):
    r = _ratios()
    path = r.save(tmp_path / "sub" / "r.safetensors")
    loaded = DCRatios.load(path)
    assert loaded == r and loaded.complete and loaded.nfe == 6
    tensors, meta = load_artifact(path)
    assert tensors["ratios"].dtype == torch.float64 and meta["kind"] == "dc_solver_ratios"
    assert meta["model"] == "gmm" and meta["guidance_scale"] == 7.5 and meta["solver"]["variant"] == "bh2"
    assert len(meta["schedule"]["sigmas"]) == 7 and meta["schedule"]["timesteps"][0] == 999.0
    json.dumps(meta)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["r.safetensors"]  # no temporary file left


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(nfe=8), "were searched for NFE 6, but this run has NFE 8"),
        (dict(model="digits"), "were searched for model 'gmm', not 'digits'"),
        (dict(guidance_scale=3.0), "were searched for guidance scale 7.5, not 3"),
        (
            dict(schedule=schedule_description(diffusers_spacing(PROCESS, 6, final="sigma_min"), PROCESS)),
            "noise levels",
        ),
        (dict(solver=solver_settings(DCSolver(base=UniPC(2, "bh1")))), "variant='bh2', not variant='bh1'"),
        (dict(solver=solver_settings(DCSolver(base=DPMSolverPlusPlus(2)))), "base='UniPC'"),
    ],
)
def test_refuses_another_configuration(kwargs, message):
    with pytest.raises(RatioMismatchError, match=message):
        _ratios().check(**kwargs)


def test_incomplete_search_is_refused_for_sampling():
    r = _ratios()
    r.searched_steps = 3
    with pytest.raises(RatioMismatchError, match="stopped after 3 of 6 steps"):
        r.check(nfe=6)
    assert r.check(nfe=6, allow_incomplete=True) is r


def test_not_a_ratio_file(tmp_path):
    fit = CascadePolynomialRegression(torch.zeros(36).numpy())
    fit.save(tmp_path / "cpr.safetensors")
    with pytest.raises(ArtifactError, match="holds 'dc_solver_cpr', not 'dc_solver_ratios'"):
        DCRatios.load(tmp_path / "cpr.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="is not a safetensors file"):
        DCRatios.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        DCRatios.load(tmp_path / "missing.safetensors")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "a.safetensors"
    save_artifact(path, {"x": torch.ones(2)}, {"kind": "test", "n": 1})

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        save_artifact(path, {"x": torch.zeros(2)}, {"kind": "test", "bad": Unserialisable()})
    tensors, meta = load_artifact(path, "test")
    assert meta["n"] == 1 and torch.equal(tensors["x"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
