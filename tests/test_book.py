"""The whole book builds strictly at the quick scale and its pages render in Chromium.

The build executes every chapter (``execute_notebooks: force``), treats warnings as
errors, and writes into a temporary folder, so the reader's own ``_build`` and its
execution cache are left alone. Chromium is Debian's package, installed by ``.ci/run``
(``apt-get install chromium``); the test fails, with that instruction, when it is
missing.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from matplotlib import image as mpimg

from conftest import REPO

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=10000",
]
TRACEBACK_MARKERS = ("Traceback (most recent call last)", "Error Traceback")


def _toc_files() -> list[str]:
    toc = yaml.safe_load((REPO / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc["parts"]:
        files += [chapter["file"] for chapter in part["chapters"]]
    return files


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        "Chromium is needed to check the built pages; install Debian's package "
        "with `apt-get install chromium` (.ci/run does this)."
    )


@pytest.fixture(scope="module")
def built_book(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("book")
    config = yaml.safe_load((REPO / "_config.yml").read_text())
    config["execute"]["execute_notebooks"] = "force"
    config_path = out / "_config.yml"
    config_path.write_text(yaml.safe_dump(config))
    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    command = [
        str(jupyter_book),
        "build",
        "--all",
        "-W",
        "-n",
        "--keep-going",
        "--config",
        str(config_path),
        "--path-output",
        str(out),
        str(REPO),
    ]
    env = {**os.environ, "NEURONLIB_SCALE": "quick"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    log = result.stdout[-6000:] + result.stderr[-6000:]
    assert result.returncode == 0, f"strict book build failed:\n{log}"
    return out / "_build" / "html"


def test_every_toc_page_is_built(built_book):
    for file in _toc_files():
        assert (built_book / f"{file}.html").is_file(), file


def _expected_figures(file: str) -> int:
    path = REPO / f"{file}.ipynb"
    if not path.exists():
        return 0
    cells = json.loads(path.read_text())["cells"]
    text = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return text.count("{glue:figure}")


@pytest.mark.parametrize("file", _toc_files())
def test_page_renders_in_chromium_with_figures_and_no_traceback(
    built_book, file, tmp_path
):
    page = built_book / f"{file}.html"
    result = subprocess.run(
        [
            _chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    dom = result.stdout
    assert result.returncode == 0 and "<h1" in dom, result.stderr[-2000:]

    for marker in TRACEBACK_MARKERS:
        assert marker not in dom, f"{file}: the page shows a traceback"

    figures = re.findall(r"<figure[^>]*>.*?</figure>", dom, flags=re.S)
    images = [re.search(r'<img[^>]*src="([^"]+)"', f) for f in figures]
    images = [m.group(1) for m in images if m]
    assert len(images) >= _expected_figures(file), f"{file}: figures missing"
    for src in images:
        picture = mpimg.imread(page.parent / src)
        assert picture.shape[0] > 50 and picture.shape[1] > 50, src
        assert picture.std() > 0, f"{file}: {src} is a blank image"
