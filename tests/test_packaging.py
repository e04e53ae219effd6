"""The install files agree with each other."""

import re
from pathlib import Path

import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]

# conda-forge spells a few packages differently from PyPI.
CONDA_TO_PYPI = {"pytorch": "torch"}
NOT_PYTHON_PACKAGES = {"python", "pip"}


def _split(requirement: str) -> tuple[str, str]:
    match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", requirement)
    assert match, requirement
    name = match.group(1).lower().replace("_", "-")
    spec = ",".join(sorted(part.strip() for part in match.group(2).split(",") if part))
    return name, spec


def _pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    return dict(_split(r) for r in requirements)


def _conda_requirements() -> dict[str, str]:
    environment = yaml.safe_load((REPO / "environment.yml").read_text())
    found = {}
    for entry in environment["dependencies"]:
        if isinstance(entry, dict):  # the pip section installs neuronlib itself
            assert entry == {"pip": ["-e ."]}, entry
            continue
        name, spec = _split(entry)
        if name in NOT_PYTHON_PACKAGES:
            continue
        found[CONDA_TO_PYPI.get(name, name)] = spec
    return found


def test_environment_yml_lists_the_same_packages_and_ranges_as_pyproject():
    assert _conda_requirements() == _pyproject_requirements()


def test_package_metadata_uses_ranges_not_pins():
    for name, spec in _pyproject_requirements().items():
        assert "==" not in spec, (
            f"{name} is pinned in pyproject.toml; pin in constraints.txt"
        )


def test_constraints_pin_the_torch_pair_that_installs_here():
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower()] = version
    assert pins["torch"] == "2.14.1"
    assert pins["torchvision"] == "0.29.1"
    for name in _pyproject_requirements():
        assert name in pins, f"{name} has no exact version in constraints.txt"
