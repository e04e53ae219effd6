"""Probes: objects that attach to a model, listen to fit's events and record."""
