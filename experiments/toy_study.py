"""The paper's toy study on moons (Fig. 3 and Fig. 4a): an alias of ``study.py rho-beta --datasets moons``.

    .venv/bin/python experiments/toy_study.py [--quick] [--steps N] [--seeds N] [--workers N] [--out DIR]

The study itself (runs, scores, table and figure) lives in experiments/study.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study import main  # noqa: E402 (the folder is put on the path first)

if __name__ == "__main__":
    main(["rho-beta", "--datasets", "moons", *sys.argv[1:]])
