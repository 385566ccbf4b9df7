"""Learn an Align Your Steps schedule: the same job as ``diffsamplers schedule optimize`` (same arguments).

python scripts/optimize_schedule.py --model gmm --solver dpm++2m --nfe 10 --output docs/ays/gmm_dpm++2m_10.safetensors
"""

import sys

from diffsamplers.apps.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["schedule", "optimize", *sys.argv[1:]]))
