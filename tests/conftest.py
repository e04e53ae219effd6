"""Settings shared by the whole test suite.

The suite always runs the chapters at the ``quick`` scale (set before any notebook
kernel starts, so nbval's kernels inherit it), with a non-interactive matplotlib
backend. ``NEURONLIB_TEST_SCALE`` overrides the scale for a deliberate slower run.
"""

import os
from pathlib import Path

os.environ["NEURONLIB_SCALE"] = os.environ.get("NEURONLIB_TEST_SCALE", "quick")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
