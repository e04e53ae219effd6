"""Settings for the whole test suite, the notebooks under nbval included.

The suite always runs the chapters at the ``quick`` scale. The variable is set here,
before any notebook kernel starts, so that nbval's kernels inherit it.
``NEURONLIB_TEST_SCALE`` overrides the scale for a deliberate slower run.
"""

import os

os.environ["NEURONLIB_SCALE"] = os.environ.get("NEURONLIB_TEST_SCALE", "quick")
os.environ.setdefault("MPLBACKEND", "Agg")
# nbval runs each notebook from its own folder: make a relative data path absolute.
if os.environ.get("NEURONLIB_DATA"):
    os.environ["NEURONLIB_DATA"] = os.path.abspath(os.environ["NEURONLIB_DATA"])
