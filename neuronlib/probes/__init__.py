"""Probes: objects that attach to a model, listen to fit's events and record."""

from neuronlib.probes.signs import GradientSignRecorder, SignRecord

__all__ = ["GradientSignRecorder", "SignRecord"]
