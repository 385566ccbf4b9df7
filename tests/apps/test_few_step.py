"""The few-step job (diffsamplers.apps.few_step): disjoint noise sets, rows, the best recipe chosen on stop noises."""

from __future__ import annotations

import pytest
import torch

from diffsamplers.apps.few_step import Recipe, format_tables, make_problem, rescore, run_few_step

SIZES = {"test": 8, "fit": 16, "stop": 8}


def test_noise_sets_are_disjoint_and_exact() -> None:
    problem = make_problem("mix128", SIZES)
    xs = [problem.sets[k].x_T for k in ("test", "fit", "stop")]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not torch.isclose(xs[a][:1], xs[b][:1]).all()
    assert problem.sets["fit"].reference.shape == (16, 128)
    with pytest.raises(ValueError, match="unknown mixture"):
        make_problem("mix1")


def test_report_rows_and_the_best_recipe_are_chosen_on_stop_noises() -> None:
    recipes = (Recipe("unipc", "logsnr"), Recipe("unipc:final_step=midpoint", "logsnr", teleport=True))
    report = run_few_step(["mix128"], [5], recipes, SIZES, log=lambda _line: None)
    prob = report["problems"]["mix128"]
    ours = [r for r in prob["rows"] if r["library"] == "diffsamplers"]
    assert [r["name"] for r in ours] == [r.name for r in recipes]
    assert len(prob["rows"]) == len(recipes) + 5  # and diffusers' five schedulers
    pick = min(ours, key=lambda r: r["errors"]["stop"]["5"])
    assert prob["best"]["5"]["ours"] == pick["name"] and prob["best"]["5"]["ours_test"] == pick["errors"]["test"]["5"]
    for row in prob["rows"]:  # the RMS over the test noises, the noises sent astray and the RMS of the others
        errors = row["errors"]
        astray, rest, rms = errors["astray"]["5"], errors["test_rest"]["5"], errors["test"]["5"]
        assert 0 <= astray <= 8 and (astray > 0 or rest == pytest.approx(rms))
    config = prob["best"]["5"]["config"]
    assert len(config["sigmas"]) == 6 and config["sigmas"][-1] == 0.0
    teleported, levels = ours[1]["configs"]["5"], prob["teleport_levels"]
    assert sorted(levels, key=float) == ["0.001", "0.003", "0.01", "0.03"]
    assert all(levels[a] >= levels[b] for a, b in zip(["0.001", "0.003", "0.01"], ["0.003", "0.01", "0.03"]))
    if teleported["teleport"]:  # the level of the tolerance chosen on the stop noises
        assert teleported["sigmas"][0] == pytest.approx(levels[str(teleported["teleport_tolerance"])])
    else:
        assert teleported["teleport_tolerance"] is None
    assert levels["0.03"] < make_problem("mix128", SIZES).sigma_max
    text = format_tables(report)
    assert "best of ours" in text and "diffusers' best" in text and ours[0]["name"] in text


def test_rescore_measures_the_test_errors_again_without_fitting() -> None:
    """The fitted rows scored again as fitted (levels, teleport and ratios from the report): the same errors and
    counts, and the best recipes re-read."""
    quiet = lambda _line: None  # noqa: E731
    recipes = (Recipe("unipc:final_step=midpoint", "logsnr", teleport=True),)
    report = run_few_step(["mix128"], [5], recipes, SIZES, log=quiet)
    rows = report["problems"]["mix128"]["rows"]
    before = [{k: dict(v) for k, v in r["errors"].items()} for r in rows]
    for row in rows:
        row["errors"]["test"]["5"] = -1.0  # spoiled: rescore must measure it again
    again = rescore(report, log=quiet)["problems"]["mix128"]
    for row, old in zip(again["rows"], before):
        assert row["errors"]["test"]["5"] == pytest.approx(old["test"]["5"], rel=1e-6)
        assert row["errors"]["astray"] == old["astray"] and row["errors"].get("stop") == old.get("stop")
    assert again["best"]["5"]["ours_test"] > 0
    eight = again["rows"][0]["errors"]["test"]["5"]
    more = rescore(report, log=quiet, test_samples=12)["problems"]["mix128"]  # in place: the report's own rows
    assert more["sizes"]["test"] == 12 and more["rows"][0]["errors"]["test"]["5"] != eight
