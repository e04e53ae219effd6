import random

import numpy as np
import pytest
import torch

from neuronlib import config


@pytest.mark.parametrize("scale", ["quick", "default", "paper", " Quick "])
def test_scale_from_environment(monkeypatch, scale):
    monkeypatch.setenv("NEURONLIB_SCALE", scale)
    assert config.get_scale() == scale.strip().lower()


def test_scale_defaults_to_default(monkeypatch):
    monkeypatch.delenv("NEURONLIB_SCALE", raising=False)
    assert config.get_scale() == "default"


def test_unknown_scale_names_the_valid_ones(monkeypatch):
    monkeypatch.setenv("NEURONLIB_SCALE", "huge")
    with pytest.raises(ValueError, match=r"'huge'.*quick, default, paper"):
        config.get_scale()


def test_by_scale_picks_the_value_of_the_scale():
    values = {"quick": 1, "default": 2, "paper": 3}
    for name, value in values.items():
        assert config.by_scale(**values, scale=name) == value


def test_seeding_makes_python_numpy_and_torch_repeat():
    def draw():
        config.seed_everything(7)
        return random.random(), np.random.rand(), torch.rand(3).tolist()

    assert draw() == draw()
    generator = config.seed_everything(7)
    assert torch.equal(
        torch.rand(2, generator=generator),
        torch.rand(2, generator=torch.Generator().manual_seed(7)),
    )


@pytest.mark.parametrize("seed", [-1, 1.5, "3", True])
def test_invalid_seed_is_rejected(seed):
    with pytest.raises(ValueError, match="non-negative integer"):
        config.seed_everything(seed)


def test_seeded_training_step_is_bitwise_repeatable():
    def train():
        config.seed_everything(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
        for _ in range(5):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        return torch.cat([p.flatten() for p in model.parameters()])

    assert torch.equal(train(), train())


def test_device_defaults_to_cpu_here_and_accepts_an_override(monkeypatch):
    monkeypatch.delenv("NEURONLIB_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        expected = "mps"
    assert config.get_device().type == expected
    monkeypatch.setenv("NEURONLIB_DEVICE", "cpu")
    assert config.get_device() == torch.device("cpu")


def test_unavailable_or_invalid_device_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("NEURONLIB_DEVICE", "banana")
    with pytest.raises(ValueError, match="Invalid device 'banana'"):
        config.get_device()
    if not torch.cuda.is_available():
        monkeypatch.setenv("NEURONLIB_DEVICE", "cuda")
        with pytest.raises(ValueError, match="CUDA is not available"):
            config.get_device()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NEURONLIB_CACHE", str(tmp_path))
    assert config.cache_dir() == tmp_path
    monkeypatch.delenv("NEURONLIB_CACHE")
    assert config.cache_dir().parts[-2:] == (".cache", "neuronlib")
