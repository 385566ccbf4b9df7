"""Few-step accuracy tables (docs/few_step.md): every ingredient and the best recipe per NFE on four exact mixtures.

    python scripts/few_step_table.py [--problems mix768,mix512,mix128,gmm] [--nfe 5,7,8,10,20] [--out docs/few_step]
    python scripts/few_step_table.py --problems gmm --nfe 5,6,7,8,10,15,20 --ship   # the recipes shipped for gmm
    python scripts/few_step_table.py --problems mix768 --rescore [--test-samples N]   # an existing JSON's test errors

Writes ``<out>/<problem>.json`` per mixture (resuming: a mixture whose JSON exists is skipped), then
``<out>/tables.md`` from every JSON there. ``--ship`` also writes the best recipe per NFE of the bundled mixture to
``diffsamplers/assets/best/gmm.json`` (what ``--solver best`` and ``diffsamplers compare`` use). ``--rescore`` measures
the test errors of an existing ``<problem>.json`` again, as fitted (nothing is fitted again), and rewrites it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffsamplers.apps.best import BestRecipe, write_best
from diffsamplers.apps.few_step import PROBLEMS, format_tables, rescore, run_few_step

#: The mixtures that are bundled models (their recipes can be shipped).
SHIPPABLE = ("gmm",)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--nfe", default="5,7,8,10,20")
    parser.add_argument("--out", default="docs/few_step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ship", action="store_true", help="write the bundled mixture's best recipes to the package")
    parser.add_argument("--rescore", action="store_true", help="measure an existing JSON's test errors again")
    parser.add_argument("--test-samples", type=int, default=None, help="with --rescore: on this many test noises")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    nfes = [int(v) for v in args.nfe.split(",")]
    for name in args.problems.split(","):
        path = out / f"{name}.json"
        if args.rescore:
            report = rescore(json.loads(path.read_text()), test_samples=args.test_samples)
            more = "" if args.test_samples is None else f" --test-samples {args.test_samples}"
            report["command"] += f"; python scripts/few_step_table.py --problems {name} --rescore{more}"
            _write(path, report)
            continue
        if path.is_file():
            print(f"{path} exists: skipped")
            continue
        report = run_few_step([name], nfes)
        report["command"] = f"python scripts/few_step_table.py --problems {name} --nfe {args.nfe}"
        _write(path, report)
        if args.ship and name in SHIPPABLE:
            print(f"wrote {ship(name, report)}")
    merged = {"nfe": [], "problems": {}}
    for path in sorted(out.glob("*.json")):
        part = json.loads(path.read_text())
        if "problems" not in part:  # digits.json (scripts/few_step_digits.py)
            continue
        merged["nfe"] = part["nfe"]
        merged["problems"].update(part["problems"])
    (out / "tables.md").write_text(format_tables(merged) + "\n")


def _write(path: Path, report: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)
    print(f"wrote {path}")


def ship(name: str, report: dict) -> Path:
    """The best recipe per NFE (chosen on the stop noises) as the package's ``best`` for the bundled model."""
    best = report["problems"][name]["best"]
    recipes = {}
    for nfe, pick in best.items():
        cfg = pick["config"]
        recipes[int(nfe)] = BestRecipe(
            nfe=int(nfe),
            name=pick["ours"],
            solver=cfg["solver"],
            sigmas=tuple(cfg["sigmas"]),
            teleport=cfg["teleport"],
            ratios=None if cfg["ratios"] is None else tuple(cfg["ratios"]),
            measured={
                "stop": pick["ours_stop"],
                "test": pick["ours_test"],
                "diffusers_best_test": pick["diffusers_test"],
            },
        )
    return write_best(name, recipes, {"command": report["command"] + " --ship", "chosen_on": "stop noises (seed 2)"})


if __name__ == "__main__":
    main()
