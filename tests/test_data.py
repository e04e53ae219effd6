"""Tests for neuronlib.data: look-up, verification, extraction, splits, batches.

Everything runs on tiny fake mirrors written into ``tmp_path`` (idx ``.gz`` files, a
CIFAR-10 ``tar.xz`` of protocol-2 pickles, a ``SHA256SUMS``), except one test that
loads the real MNIST mirror when it is on this machine.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import stat
import struct
import tarfile
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets

from neuronlib import data
from neuronlib.data import Batch, Loader, TensorData

N_TRAIN = 240  # fake MNIST training samples; the rarest class has 5
IDX = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


# ------------------------------------------------------------------ fakes
def fake_images(n: int, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
    """uint8 images whose first two pixels spell their own index (+ offset)."""
    rng = np.random.default_rng(n + offset)
    x = rng.integers(0, 256, size=(n, int(np.prod(shape))), dtype=np.uint8)
    i = np.arange(n) + offset
    x[:, 0], x[:, 1] = i % 256, i // 256
    return x.reshape(n, *shape)


def imbalanced_labels(n: int) -> np.ndarray:
    """Labels 0..9 with class c about (c + 1) times as frequent as class 0."""
    weights = np.arange(1, 11)
    labels = np.repeat(np.arange(10), weights)
    return np.resize(labels, n).astype(np.uint8)


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x0800 | array.ndim
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def fake_mnist(n_train: int = N_TRAIN, n_test: int = 30, label_offset: int = 0) -> dict:
    return {
        "train-images-idx3-ubyte": fake_images(n_train, (28, 28)),
        "train-labels-idx1-ubyte": (imbalanced_labels(n_train) + label_offset) % 10,
        "t10k-images-idx3-ubyte": fake_images(n_test, (28, 28), offset=1000),
        "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 10,
    }


def write_idx(folder: Path, arrays: dict, *, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
        else:
            (folder / name).write_bytes(idx_bytes(array))


def write_sums(folder: Path) -> None:
    lines = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != "SHA256SUMS":
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            lines.append(f"{digest}  {path.relative_to(folder).as_posix()}\n")
    (folder / "SHA256SUMS").write_text("".join(lines))


def cifar_batches(per_batch: int = 4, n_test: int = 6) -> dict[str, bytes]:
    """Protocol-2 pickles like the CIFAR-10 python release, tiny."""
    x = fake_images(5 * per_batch, (3, 32, 32))
    y = np.arange(5 * per_batch) % 10
    members = {}
    for k in range(5):
        rows = slice(k * per_batch, (k + 1) * per_batch)
        batch = {
            "batch_label": f"training batch {k + 1} of 5",
            "labels": [int(v) for v in y[rows]],
            "data": x[rows].reshape(per_batch, -1),
            "filenames": [f"{i}.png".encode() for i in range(per_batch)],
        }
        members[f"data_batch_{k + 1}"] = pickle.dumps(batch, protocol=2)
    test = {
        "batch_label": "testing batch 1 of 1",
        "labels": [int(v) for v in (np.arange(n_test) * 3) % 10],
        "data": fake_images(n_test, (3, 32, 32), offset=500).reshape(n_test, -1),
        "filenames": [b"t.png"] * n_test,
    }
    members["test_batch"] = pickle.dumps(test, protocol=2)
    meta = {"num_cases_per_batch": per_batch, "label_names": CIFAR_CLASSES}
    members["batches.meta"] = pickle.dumps(meta, protocol=2)
    return members


def write_cifar_archive(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "w:xz" if path.name.endswith(".xz") else "w:gz"
    with tarfile.open(path, mode) as tar:
        folder = tarfile.TarInfo("cifar-10-batches-py")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, payload in sorted(members.items()):
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def snapshot(folder: Path) -> dict[str, tuple]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in [folder, *folder.rglob("*")]
    }


def set_read_only(folder: Path, read_only: bool) -> None:
    for path in [*folder.rglob("*"), folder]:
        mode = path.stat().st_mode
        write = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
        path.chmod(mode & ~write if read_only else mode | stat.S_IWUSR)


def cache_entries(env: SimpleNamespace) -> list[str]:
    folder = env.cache / "data"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------- fixtures
@pytest.fixture
def data_env(tmp_path, monkeypatch):
    """Isolated cache, torchvision home and Debian folder; no network."""
    env = SimpleNamespace(
        tmp=tmp_path,
        cache=tmp_path / "cache",
        torch_home=tmp_path / "torch",
        tv_root=tmp_path / "torch" / "datasets",
        mirror=tmp_path / "mirror",
        debian=tmp_path / "debian-fashion-mnist",
        urls=[],
    )
    monkeypatch.setenv("NEURONLIB_CACHE", str(env.cache))
    monkeypatch.setenv("TORCH_HOME", str(env.torch_home))
    monkeypatch.delenv("NEURONLIB_DATA", raising=False)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", env.debian)

    def no_network(request, *args, **kwargs):
        env.urls.append(getattr(request, "full_url", request))
        raise URLError("no network (test)")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return env


@pytest.fixture
def data_mnist_mirror(data_env, monkeypatch):
    """A verified fake MNIST mirror, named by NEURONLIB_DATA."""
    arrays = fake_mnist()
    write_idx(data_env.mirror / "MNIST" / "raw", arrays)
    write_sums(data_env.mirror)
    monkeypatch.setenv("NEURONLIB_DATA", str(data_env.mirror))
    data_env.arrays = arrays
    return data_env


@pytest.fixture
def data_splits(data_mnist_mirror):
    return data.load("mnist", val_size=30, seed=0, device="cpu")


def tensor_data(n: int = 50, num_classes: int = 5) -> TensorData:
    """Synthetic data whose x rows spell their dataset index."""
    index = torch.arange(100, 100 + n)
    x = index.float()[:, None, None, None].expand(n, 2, 3, 3).clone()
    return TensorData(
        x=x,
        y=index % num_classes,
        index=index,
        classes=tuple(str(c) for c in range(num_classes)),
        name="mnist",
        split="train",
    )


# ---------------------------------------------------------------- names
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("MNIST", "mnist"),
        ("fashion_mnist", "fashion-mnist"),
        ("Fashion-MNIST", "fashion-mnist"),
        ("cifar-10", "cifar10"),
        ("CIFAR10", "cifar10"),
    ],
)
def test_canonical_name_accepts_spellings(name, expected):
    assert data.canonical_name(name) == expected


def test_unknown_dataset_lists_valid_names(data_env):
    with pytest.raises(
        ValueError, match="Unknown data set 'svhn'.*mnist, fashion-mnist"
    ):
        data.load("svhn", device="cpu")


# ----------------------------------------------------- mirror look-up
def test_mirror_is_loaded_and_matches_the_files(data_mnist_mirror):
    splits = data.load("mnist", val_size=0, device="cpu")
    arrays = data_mnist_mirror.arrays

    assert (
        len(splits.train) == N_TRAIN and len(splits.val) == 0 and len(splits.test) == 30
    )
    assert (
        splits.train.x.shape == (N_TRAIN, 1, 28, 28)
        and splits.train.x.dtype == torch.float32
    )
    assert splits.train.classes[0] == torchvision.datasets.MNIST.classes[0]
    pixels = data.denormalise(splits.train.x, "mnist").mul(255).round().to(torch.uint8)
    np.testing.assert_array_equal(
        pixels[:, 0].numpy(), arrays["train-images-idx3-ubyte"]
    )
    np.testing.assert_array_equal(
        splits.train.y.numpy(), arrays["train-labels-idx1-ubyte"]
    )
    np.testing.assert_array_equal(splits.test.index.numpy(), np.arange(30))


def test_missing_mirror_folder_names_the_fix(data_env, monkeypatch):
    monkeypatch.setenv("NEURONLIB_DATA", str(data_env.tmp / "nowhere"))

    with pytest.raises(
        FileNotFoundError, match="NEURONLIB_DATA points at .*nowhere.*unset"
    ):
        data.load("mnist", device="cpu")


def test_mirror_without_the_dataset_names_expected_files(data_env, monkeypatch):
    data_env.mirror.mkdir()
    monkeypatch.setenv("NEURONLIB_DATA", str(data_env.mirror))

    with pytest.raises(FileNotFoundError) as info:
        data.load("cifar10", device="cpu")
    message = str(info.value)
    assert "has no cifar10" in message
    assert f"cifar-10-python.tar.xz (or .tar.gz) in {data_env.mirror}" in message
    assert "unset NEURONLIB_DATA" in message
    assert data_env.urls == []  # a named mirror never falls back to downloading

    with pytest.raises(
        FileNotFoundError, match=r"MNIST/raw/train-images-idx3-ubyte\.gz"
    ):
        data.load("mnist", device="cpu")


def test_root_argument_overrides_the_environment(data_mnist_mirror, monkeypatch):
    monkeypatch.setenv("NEURONLIB_DATA", str(data_mnist_mirror.tmp / "nowhere"))

    splits = data.load("mnist", val_size=0, device="cpu", root=data_mnist_mirror.mirror)
    assert len(splits.train) == N_TRAIN


def test_incomplete_mirror_names_the_missing_file(data_mnist_mirror):
    (data_mnist_mirror.mirror / "MNIST/raw/t10k-labels-idx1-ubyte.gz").unlink()

    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz missing"):
        data.load("mnist", device="cpu")


def test_checksum_mismatch_names_file_expected_got_and_fix(data_mnist_mirror):
    path = data_mnist_mirror.mirror / "MNIST/raw/train-labels-idx1-ubyte.gz"
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_bytes(gzip.compress(b"corrupt"))
    got = hashlib.sha256(path.read_bytes()).hexdigest()

    with pytest.raises(ValueError) as info:
        data.load("mnist", device="cpu")
    message = str(info.value)
    assert "Checksum mismatch" in message and str(path) in message
    assert expected in message and got in message
    assert "replace the file with a good copy or fix SHA256SUMS" in message
    assert cache_entries(data_mnist_mirror) == []


def test_file_missing_from_sha256sums_is_refused(data_mnist_mirror):
    sums = data_mnist_mirror.mirror / "SHA256SUMS"
    lines = sums.read_text().splitlines(keepends=True)
    sums.write_text("".join(line for line in lines if "t10k-images" not in line))

    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz is not listed in"):
        data.load("mnist", device="cpu")


def test_mirror_without_sha256sums_loads_unverified(data_mnist_mirror):
    (data_mnist_mirror.mirror / "SHA256SUMS").unlink()

    assert len(data.load("mnist", val_size=0, device="cpu").train) == N_TRAIN


def test_changed_mirror_file_gets_a_new_cache_entry(data_mnist_mirror):
    data.load("mnist", val_size=0, device="cpu")
    write_idx(data_mnist_mirror.mirror / "MNIST" / "raw", fake_mnist(label_offset=1))
    write_sums(data_mnist_mirror.mirror)

    splits = data.load("mnist", val_size=0, device="cpu")
    expected = (data_mnist_mirror.arrays["train-labels-idx1-ubyte"] + 1) % 10
    np.testing.assert_array_equal(splits.train.y.numpy(), expected)
    assert len(cache_entries(data_mnist_mirror)) == 2


def test_read_only_mirror_is_never_written_and_entry_is_complete(data_mnist_mirror):
    mirror = data_mnist_mirror.mirror
    before = snapshot(mirror)
    set_read_only(mirror, True)
    try:
        data.load("mnist", val_size=10, device="cpu")
        data.load("mnist", val_size=10, device="cpu")
    finally:
        set_read_only(mirror, False)

    assert snapshot(mirror) == before
    (entry,) = cache_entries(data_mnist_mirror)
    raw = data_mnist_mirror.cache / "data" / entry / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(IDX)
    assert (data_mnist_mirror.cache / "data" / entry / "manifest.json").is_file()


def test_cache_inside_the_mirror_is_refused(data_mnist_mirror, monkeypatch):
    monkeypatch.setenv("NEURONLIB_CACHE", str(data_mnist_mirror.mirror / "cache"))

    with pytest.raises(ValueError, match="inside the data mirror.*NEURONLIB_CACHE"):
        data.load("mnist", device="cpu")
    assert not (data_mnist_mirror.mirror / "cache").exists()


def test_interrupted_decompression_leaves_no_entry_and_retry_works(
    data_mnist_mirror, monkeypatch
):
    real_copy = data.shutil.copyfileobj
    calls = []

    def interrupted_copy(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(data.shutil, "copyfileobj", interrupted_copy)
    with pytest.raises(KeyboardInterrupt):
        data.load("mnist", device="cpu")
    assert cache_entries(data_mnist_mirror) == []

    monkeypatch.setattr(data.shutil, "copyfileobj", real_copy)
    assert len(data.load("mnist", val_size=0, device="cpu").train) == N_TRAIN
    assert len(cache_entries(data_mnist_mirror)) == 1


def test_entry_without_manifest_is_rebuilt(data_mnist_mirror):
    data.load("mnist", val_size=0, device="cpu")
    (entry,) = cache_entries(data_mnist_mirror)
    manifest = data_mnist_mirror.cache / "data" / entry / "manifest.json"
    manifest.unlink()

    assert len(data.load("mnist", val_size=0, device="cpu").train) == N_TRAIN
    assert manifest.is_file()


# ------------------------------------------------------- other sources
def test_mirror_beats_torchvision_cache_which_beats_download(data_env, monkeypatch):
    write_idx(data_env.mirror / "MNIST" / "raw", fake_mnist())
    write_idx(data_env.tv_root / "MNIST" / "raw", fake_mnist(label_offset=3), gz=False)
    labels = fake_mnist()["train-labels-idx1-ubyte"]

    def no_download(self):
        raise AssertionError("download must not be tried when a local copy exists")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_download)
    monkeypatch.setenv("NEURONLIB_DATA", str(data_env.mirror))
    from_mirror = data.load("mnist", val_size=0, device="cpu").train.y
    monkeypatch.delenv("NEURONLIB_DATA")
    from_cache = data.load("mnist", val_size=0, device="cpu").train.y

    np.testing.assert_array_equal(from_mirror.numpy(), labels)
    np.testing.assert_array_equal(from_cache.numpy(), (labels + 3) % 10)
    assert data_env.urls == []


def test_mirror_lacking_dataset_falls_back_to_torchvision_cache(data_env, monkeypatch):
    data_env.mirror.mkdir()
    write_idx(data_env.tv_root / "MNIST" / "raw", fake_mnist(), gz=False)
    monkeypatch.setenv("NEURONLIB_DATA", str(data_env.mirror))

    assert len(data.load("mnist", val_size=0, device="cpu").train) == N_TRAIN


def test_download_goes_through_torchvision_into_its_cache(data_env, monkeypatch):
    def fake_download(self):
        write_idx(Path(self.raw_folder), fake_mnist(), gz=False)

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", fake_download)

    assert len(data.load("mnist", val_size=0, device="cpu").train) == N_TRAIN
    assert (data_env.tv_root / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()


def test_no_network_and_nothing_local_says_how_to_set_neuronlib_data(data_env):
    with pytest.raises(FileNotFoundError) as info:
        data.load("fashion-mnist", device="cpu")
    message = str(info.value)

    assert "not found locally and could not be downloaded" in message
    assert "no network (test)" in message
    assert str(data_env.tv_root) in message and str(data_env.debian) in message
    assert "Set NEURONLIB_DATA to a folder with FashionMNIST/raw/" in message
    assert data_env.urls  # torchvision really tried to download


def test_fashion_mnist_from_the_debian_folder(data_env, monkeypatch):
    write_idx(data_env.debian, fake_mnist())
    data_env.mirror.mkdir()  # a mirror without Fashion-MNIST, like the shared one
    monkeypatch.setenv("NEURONLIB_DATA", str(data_env.mirror))

    splits = data.load("fashion_mnist", val_size=10, device="cpu")
    assert splits.train.name == "fashion-mnist"
    assert splits.train.classes == tuple(torchvision.datasets.FashionMNIST.classes)
    assert len(splits.train) + len(splits.val) == N_TRAIN


# -------------------------------------------------------------- CIFAR-10
@pytest.mark.parametrize(
    "archive", ["cifar-10-python.tar.xz", "cifar-10-python.tar.gz"]
)
def test_cifar10_from_a_mirror_archive(data_env, monkeypatch, archive):
    members = cifar_batches()
    write_cifar_archive(data_env.mirror / archive, members)
    write_sums(data_env.mirror)
    monkeypatch.setenv("NEURONLIB_DATA", str(data_env.mirror))

    splits = data.load("cifar10", val_size=0, device="cpu")
    again = data.load("cifar10", val_size=0, device="cpu")

    assert splits.train.x.shape == (20, 3, 32, 32) and splits.test.x.shape == (
        6,
        3,
        32,
        32,
    )
    assert splits.train.classes == tuple(CIFAR_CLASSES)
    np.testing.assert_array_equal(splits.train.y.numpy(), np.arange(20) % 10)
    pixels = (
        data.denormalise(splits.train.x, "cifar10").mul(255).round().to(torch.uint8)
    )
    np.testing.assert_array_equal(pixels.numpy(), fake_images(20, (3, 32, 32)))
    assert torch.equal(again.train.x, splits.train.x)
    (entry,) = cache_entries(data_env)
    assert sorted(os.listdir(data_env.cache / "data" / entry)) == [
        "arrays.npz",
        "manifest.json",
    ]


def test_interrupted_cifar_extraction_leaves_no_entry(data_env, monkeypatch):
    write_cifar_archive(data_env.mirror / "cifar-10-python.tar.xz", cifar_batches())
    monkeypatch.setenv("NEURONLIB_DATA", str(data_env.mirror))
    real_unpickle = data._restricted_unpickle
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_unpickle(*args)

    monkeypatch.setattr(data, "_restricted_unpickle", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.load("cifar10", device="cpu", val_size=0)
    assert cache_entries(data_env) == []

    monkeypatch.setattr(data, "_restricted_unpickle", real_unpickle)
    assert len(data.load("cifar10", device="cpu", val_size=0).train) == 20


def test_cifar_archive_with_a_code_pickle_is_refused(data_env, monkeypatch):
    members = cifar_batches()
    members["test_batch"] = pickle.dumps(os.getcwd, protocol=2)
    write_cifar_archive(data_env.mirror / "cifar-10-python.tar.xz", members)
    monkeypatch.setenv("NEURONLIB_DATA", str(data_env.mirror))

    with pytest.raises(
        ValueError, match="Refusing to unpickle .*test_batch.*posix.getcwd"
    ):
        data.load("cifar10", device="cpu")
    assert cache_entries(data_env) == []


def test_cifar_archive_missing_a_batch_is_refused(data_env, monkeypatch):
    members = cifar_batches()
    del members["data_batch_3"]
    write_cifar_archive(data_env.mirror / "cifar-10-python.tar.xz", members)
    monkeypatch.setenv("NEURONLIB_DATA", str(data_env.mirror))

    with pytest.raises(ValueError, match="lacks cifar-10-batches-py/data_batch_3"):
        data.load("cifar10", device="cpu")


def test_damaged_cifar_archive_names_the_fix(data_env, monkeypatch):
    data_env.mirror.mkdir()
    (data_env.mirror / "cifar-10-python.tar.xz").write_bytes(b"\xfd7zXZ\x00 broken")
    monkeypatch.setenv("NEURONLIB_DATA", str(data_env.mirror))

    with pytest.raises(ValueError, match="not a readable tar archive.*replace it"):
        data.load("cifar10", device="cpu")
    assert cache_entries(data_env) == []


def test_malformed_sha256sums_line_is_reported(data_mnist_mirror):
    sums = data_mnist_mirror.mirror / "SHA256SUMS"
    sums.write_text(sums.read_text() + "not-a-digest file\n")

    with pytest.raises(ValueError, match="Line 5 of .*SHA256SUMS.*fix it"):
        data.load("mnist", device="cpu")


def test_cifar10_from_the_torchvision_cache_uses_torchvision(data_env, monkeypatch):
    folder = data_env.tv_root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    md5 = {}
    for name, payload in cifar_batches().items():
        (folder / name).write_bytes(payload)
        md5[name] = hashlib.md5(payload).hexdigest()
    cifar = torchvision.datasets.CIFAR10
    monkeypatch.setattr(
        cifar,
        "train_list",
        [[f"data_batch_{k}", md5[f"data_batch_{k}"]] for k in range(1, 6)],
    )
    monkeypatch.setattr(cifar, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(cifar, "meta", {**cifar.meta, "md5": md5["batches.meta"]})

    splits = data.load("cifar10", val_size=0, device="cpu")
    assert splits.train.x.shape == (20, 3, 32, 32)
    pixels = data.denormalise(splits.test.x, "cifar10").mul(255).round().to(torch.uint8)
    np.testing.assert_array_equal(
        pixels.numpy(), fake_images(6, (3, 32, 32), offset=500)
    )


# ---------------------------------------------------------------- splits
def test_split_is_deterministic_disjoint_and_complete(data_mnist_mirror):
    first = data.load("mnist", val_size=30, seed=7, device="cpu")
    second = data.load("mnist", val_size=30, seed=7, device="cpu")
    other = data.load("mnist", val_size=30, seed=8, device="cpu")

    assert torch.equal(first.val.index, second.val.index)
    assert not torch.equal(first.val.index, other.val.index)
    train, val = set(first.train.index.tolist()), set(first.val.index.tolist())
    assert not train & val and train | val == set(range(N_TRAIN))
    assert len(first.val) == 30 and len(first.train) == N_TRAIN - 30


def test_split_keeps_the_index_to_sample_correspondence(data_splits, data_mnist_mirror):
    images = data_mnist_mirror.arrays["train-images-idx3-ubyte"]
    labels = data_mnist_mirror.arrays["train-labels-idx1-ubyte"]
    for part in (data_splits.train, data_splits.val):
        rows = part.index.numpy()
        pixels = data.denormalise(part.x, "mnist").mul(255).round().to(torch.uint8)
        np.testing.assert_array_equal(pixels[:, 0].numpy(), images[rows])
        np.testing.assert_array_equal(part.y.numpy(), labels[rows])
        assert torch.equal(part.index, part.index.sort().values)


def test_split_is_stratified_by_class(data_splits, data_mnist_mirror):
    labels = torch.as_tensor(data_mnist_mirror.arrays["train-labels-idx1-ubyte"])
    counts = torch.bincount(labels.long(), minlength=10).double()
    expected = 30 * counts / counts.sum()

    got = torch.bincount(data_splits.val.y, minlength=10).double()
    assert (got - expected).abs().max() < 1
    assert got.sum() == 30


@pytest.mark.parametrize("val_size", [-1, N_TRAIN, 500, 2.5, True])
def test_bad_val_size_names_the_valid_range(data_mnist_mirror, val_size):
    with pytest.raises(ValueError, match="Invalid val_size"):
        data.load("mnist", val_size=val_size, device="cpu")


# --------------------------------------------------------------- subsets
def test_subset_per_class_is_balanced_and_deterministic(data_splits):
    train = data_splits.train
    first = train.subset(per_class=3, seed=1)
    again = train.subset(per_class=3, seed=1)
    other = train.subset(per_class=3, seed=2)

    assert torch.bincount(first.y, minlength=10).tolist() == [3] * 10
    assert torch.equal(first.index, again.index)
    assert not torch.equal(first.index, other.index)
    rows = torch.searchsorted(train.index, first.index)
    assert torch.equal(train.x[rows], first.x) and torch.equal(train.y[rows], first.y)


def test_subset_size_spreads_the_remainder_over_the_first_classes(data_splits):
    subset = data_splits.train.subset(23, seed=0)

    assert len(subset) == 23
    assert torch.bincount(subset.y, minlength=10).tolist() == [3, 3, 3] + [2] * 7


def test_subset_larger_than_the_data_names_the_numbers(data_splits):
    train = data_splits.train
    with pytest.raises(ValueError, match=f"Subset of 1000 samples.*only {len(train)}"):
        train.subset(1000)

    fewest = int(torch.bincount(train.y, minlength=10).min())
    with pytest.raises(
        ValueError, match=f"has only {fewest}: pass per_class <= {fewest}"
    ):
        train.subset(per_class=fewest + 1)


@pytest.mark.parametrize(
    "kwargs", [{}, {"size": 10, "per_class": 1}, {"size": 0}, {"per_class": -1}]
)
def test_subset_needs_one_positive_count(kwargs):
    with pytest.raises(ValueError, match="subset|Invalid"):
        tensor_data().subset(**kwargs)


# ---------------------------------------------------------------- Loader
def test_loader_visits_every_sample_once_per_epoch_with_its_label():
    dataset = tensor_data(n=50)
    loader = dataset.loader(8, seed=3)

    for _ in range(2):
        batches = list(loader)
        assert len(batches) == len(loader) == 7
        assert all(isinstance(b, Batch) for b in batches)
        index = torch.cat([b.index for b in batches])
        assert torch.equal(index.sort().values, dataset.index)
        for batch in batches:
            assert torch.equal(batch.x[:, 0, 0, 0], batch.index.float())
            assert torch.equal(batch.y, batch.index % 5)


def test_loader_epochs_depend_only_on_seed_and_epoch():
    dataset = tensor_data(n=50)
    loader = dataset.loader(16, seed=5)
    epoch0 = torch.cat([b.index for b in loader])
    epoch1 = torch.cat([b.index for b in loader])

    assert loader.epoch == 2
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(epoch0, dataset.index[loader.permutation(0)])
    assert torch.equal(epoch1, dataset.index[loader.permutation(1)])
    twin = Loader(dataset, 16, seed=5)
    assert torch.equal(torch.cat([b.index for b in twin.iter_epoch(1)]), epoch1)
    assert twin.epoch == 0
    other = Loader(dataset, 16, seed=6)
    assert not torch.equal(torch.cat([b.index for b in other]), epoch0)


def test_loader_without_shuffle_keeps_order_and_drop_last_drops():
    dataset = tensor_data(n=50)
    plain = dataset.loader(16, shuffle=False)
    dropped = dataset.loader(16, drop_last=True)

    assert torch.equal(torch.cat([b.index for b in plain]), dataset.index)
    assert len(dropped) == 3 and [len(b.y) for b in dropped] == [16, 16, 16]


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"batch_size": 8, "seed": -1}])
def test_loader_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="Invalid"):
        Loader(tensor_data(), **kwargs)


def test_tensor_data_to_repr_and_shape_check():
    dataset = tensor_data(n=10)

    moved = dataset.to("cpu")
    assert moved is not dataset and torch.equal(moved.x, dataset.x)
    assert "n=10" in repr(dataset) and "[10, 2, 3, 3]" in repr(dataset)
    with pytest.raises(ValueError, match="matching first dimensions"):
        TensorData(dataset.x, dataset.y[:5], dataset.index, ("a",), "mnist", "train")


# ---------------------------------------------------------- augmentation
def crop_flip_reference(x, top, left, flip, padding):
    """Per-sample loop: pad, slice, flip."""
    height, width = x.shape[2:]
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    out = []
    for i in range(x.shape[0]):
        crop = padded[i, :, top[i] : top[i] + height, left[i] : left[i] + width]
        out.append(crop.flip(-1) if flip[i] else crop)
    return torch.stack(out)


def test_crop_flip_matches_a_per_sample_loop():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 8, 10, generator=generator)
    top = torch.randint(0, 7, (32,), generator=generator)
    left = torch.randint(0, 7, (32,), generator=generator)
    flip = torch.rand(32, generator=generator) < 0.5

    got = data._crop_flip(x, top, left, flip, 3)
    torch.testing.assert_close(got, crop_flip_reference(x, top, left, flip, 3))


def test_cifar_augment_is_deterministic_and_really_crops_and_flips():
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    first = data.cifar_augment(x, torch.Generator().manual_seed(2))
    again = data.cifar_augment(x, torch.Generator().manual_seed(2))

    assert first.shape == x.shape and torch.equal(first, again)
    offsets, flips = set(), set()
    for i in range(64):
        matches = [
            (top, left, flip)
            for top in range(9)
            for left in range(9)
            for flip in (False, True)
            if torch.equal(
                crop_flip_reference(x[i : i + 1], [top], [left], [flip], 4)[0], first[i]
            )
        ]
        assert len(matches) == 1
        offsets.add(matches[0][:2])
        flips.add(matches[0][2])
    assert flips == {False, True} and len(offsets) > 20


def test_loader_augmentation_is_deterministic_per_epoch():
    dataset = tensor_data(n=40)
    dataset = TensorData(
        torch.randn(40, 3, 8, 8),
        dataset.y,
        dataset.index,
        dataset.classes,
        "cifar10",
        "train",
    )
    loader = dataset.loader(10, seed=4, augment=data.cifar_augment)
    plain = dataset.loader(10, seed=4)

    batch = next(iter(loader.iter_epoch(0)))
    assert torch.equal(batch.x, next(iter(loader.iter_epoch(0))).x)
    assert not torch.equal(batch.x, next(iter(plain.iter_epoch(0))).x)
    assert torch.equal(batch.index, next(iter(plain.iter_epoch(0))).index)


def test_denormalise_inverts_the_normalisation():
    pixels = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)

    back = data.denormalise(data._normalise(pixels, "cifar10"), "cifar-10")
    torch.testing.assert_close(back, pixels.float() / 255, atol=1e-6, rtol=0)


# ------------------------------------------------------------ real MNIST
def real_mirror() -> Path | None:
    env = os.environ.get("NEURONLIB_DATA")
    if env:
        return Path(env)
    candidate = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
    return candidate if candidate.is_dir() else None


def test_real_mnist_from_the_mirror(tmp_path, monkeypatch):
    mirror = real_mirror()
    if mirror is None:
        pytest.skip(
            "no MNIST mirror: NEURONLIB_DATA unset and ../shared/datasets absent"
        )
    monkeypatch.setenv("NEURONLIB_DATA", str(mirror))
    monkeypatch.setenv("NEURONLIB_CACHE", str(tmp_path / "cache"))

    splits = data.load("mnist", device="cpu")

    assert (len(splits.train), len(splits.val), len(splits.test)) == (
        55000,
        5000,
        10000,
    )
    index = torch.cat([splits.train.index, splits.val.index])
    labels = torch.cat([splits.train.y, splits.val.y])[index.argsort()]
    assert labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert splits.test.y[:5].tolist() == [7, 2, 1, 0, 4]
    x = torch.cat([splits.train.x, splits.val.x])
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3
