"""``python benchmarks/bound_speed.py ...``: the same as ``python -m benchmarks.boundspeed ...``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from benchmarks.boundspeed.__main__ import main  # noqa: E402

if __name__ == "__main__":
    main()
