"""The few-step job (diffsamplers.apps.few_step): disjoint noise sets, rows, the best recipe chosen on stop noises."""

from __future__ import annotations

import pytest
import torch

from diffsamplers.apps.few_step import Recipe, format_rescore, format_tables, make_problem, rescore, run_few_step

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
    for row in prob["rows"]:  # the first 32 test noises (here all 8), all of them, and the count of far ones
        errors = row["errors"]
        assert errors["test"]["5"] == pytest.approx(errors["test_all"]["5"]) and 0 <= errors["far"]["5"] <= 8
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


def test_rescore_reproduces_the_run_and_scores_more_noises() -> None:
    """The fitted rows scored again as fitted: on the run's own test noises the same errors; on more noises (the
    run's first) other ones, with the boundary-noise counts."""
    quiet = lambda _line: None  # noqa: E731
    recipes = (Recipe("unipc:final_step=midpoint", "logsnr", teleport=True),)
    report = run_few_step(["mix128"], [5], recipes, SIZES, log=quiet)
    same = rescore(report, "mix128", SIZES["test"], log=quiet)
    more = rescore(report, "mix128", 12, log=quiet)
    rows = report["problems"]["mix128"]["rows"]
    assert [r["name"] for r in same["rows"]] == [r["name"] for r in rows]
    for row, again, wider in zip(rows, same["rows"], more["rows"]):
        assert again["errors"]["test"]["5"] == pytest.approx(row["errors"]["test"]["5"], rel=1e-6)
        assert wider["errors"]["test_all"]["5"] != row["errors"]["test_all"]["5"]  # 12 noises, not 8
        assert 0 <= wider["errors"]["far"]["5"] <= 12
    assert more["test_samples"] == 12 and "| unipc:final_step=midpoint" in format_rescore(more)
