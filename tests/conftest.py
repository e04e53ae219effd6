"""Paths shared by the tests (the scale is set by the repository's conftest.py)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
