"""neuronlib: a thin PyTorch library for watching neurons during training."""

__version__ = "0.1.0"
