"""Learned schedules on the bundled digits model (docs/few_step.md): the error-objective search against the
package's reference, scored on held-out noises against uniform logSNR and Karras with the same solver.

    python scripts/few_step_digits.py [--solver unipc] [--nfe 5,7,10] [--json docs/few_step/digits.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffsamplers.apps.few_step import run_model_schedules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solver", default="unipc")
    parser.add_argument("--nfe", default="5,7,10")
    parser.add_argument("--json", default="docs/few_step/digits.json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = run_model_schedules("digits", args.solver, [int(v) for v in args.nfe.split(",")])
    report["command"] = f"python scripts/few_step_digits.py --solver {args.solver} --nfe {args.nfe}"
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
