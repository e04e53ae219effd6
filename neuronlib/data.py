"""Data sets as tensors on the device: look-up, verification, splits, batches.

MNIST, Fashion-MNIST and CIFAR-10 are loaded once into float32 tensors on the
device, normalised with the standard statistics, split into train / validation /
test, and served in batches by :class:`Loader`, a shuffling iterator over those
tensors (no per-sample transforms, no worker processes). Every batch carries the
dataset indices of its samples, so probes can record per-sample quantities.

Where the raw files come from, in this order:

1. A local mirror: ``root=`` or the environment variable ``NEURONLIB_DATA``, a
   folder laid out like ``MNIST/raw/*-ubyte.gz``, ``FashionMNIST/raw/*-ubyte.gz``
   and ``cifar-10-python.tar.xz`` (or ``.tar.gz``). For Fashion-MNIST, Debian's
   ``/usr/share/datasets/fashion-mnist/`` (package ``dataset-fashion-mnist``) too.
   A mirror that has a ``SHA256SUMS`` file is verified against it on every load.
   Its files are decompressed once into ``config.cache_dir() / "data"``; nothing
   is ever written into the mirror.
2. torchvision's cache folder, ``$TORCH_HOME/datasets`` (else
   ``~/.cache/torch/datasets``), where ``torchvision.datasets.*(download=True)``
   put them before.
3. A download through torchvision into that folder, with torchvision's own checks.
   When a mirror is named (``root=`` or ``NEURONLIB_DATA``) nothing is downloaded:
   a mirror without the data set is an error that says what to put where.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import logging
import lzma
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from urllib.error import URLError

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from neuronlib import config

__all__ = [
    "DATASETS",
    "STATS",
    "Batch",
    "Loader",
    "Splits",
    "TensorData",
    "canonical_name",
    "cifar_augment",
    "denormalise",
    "load",
]

logger = logging.getLogger(__name__)

DATASETS = ("mnist", "fashion-mnist", "cifar10")

#: Per-channel mean and standard deviation on the [0, 1] scale (training sets).
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

_ALIASES = {
    "mnist": "mnist",
    "fashion-mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "cifar10": "cifar10",
    "cifar-10": "cifar10",
}

#: Where Debian's package ``dataset-fashion-mnist`` puts the four ``.gz`` files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_TV_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_CIFAR_ARCHIVES = ("cifar-10-python.tar.xz", "cifar-10-python.tar.gz")
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{k}" for k in range(1, 6))
_CIFAR_TEST = ("test_batch",)
_CIFAR_META = "batches.meta"
_ENTRY_FORMAT = 1
_MANIFEST = "manifest.json"
_HASH_CHUNK = 1 << 20


# --------------------------------------------------------------------- tensors
class Batch(NamedTuple):
    """One batch of samples.

    Attributes:
        x: Inputs ``[B, C, H, W]``, float32, normalised.
        y: Labels ``[B]``, int64.
        index: Dataset indices ``[B]``, int64: the position of each sample in the
            original training set (for the train and val splits) or test set.
    """

    x: Tensor
    y: Tensor
    index: Tensor


@dataclass(frozen=True, eq=False)
class TensorData:
    """A split of a data set held as tensors.

    Attributes:
        x: Inputs ``[N, C, H, W]``, float32, normalised.
        y: Labels ``[N]``, int64.
        index: Dataset indices ``[N]``, int64 (see :class:`Batch`).
        classes: Class names, position = label.
        name: Data set name, one of :data:`DATASETS`.
        split: ``"train"``, ``"val"`` or ``"test"``.
    """

    x: Tensor
    y: Tensor
    index: Tensor
    classes: tuple[str, ...]
    name: str
    split: str

    def __post_init__(self) -> None:
        n = self.x.shape[0] if self.x.dim() > 0 else -1
        if self.y.shape != (n,) or self.index.shape != (n,):
            raise ValueError(
                "TensorData needs x [N, ...], y [N] and index [N] with one N; got x "
                f"{list(self.x.shape)}, y {list(self.y.shape)}, index "
                f"{list(self.index.shape)}: pass tensors with matching first "
                "dimensions."
            )

    def __len__(self) -> int:
        return self.x.shape[0]

    def __repr__(self) -> str:
        return (
            f"TensorData(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"x={list(self.x.shape)} {self.x.dtype} on {self.x.device}, "
            f"classes={len(self.classes)})"
        )

    def to(self, device: torch.device | str) -> TensorData:
        """Return a copy with every tensor on ``device``.

        Args:
            device: The target device.

        Returns:
            A new :class:`TensorData` (this one is unchanged).
        """
        return dataclasses.replace(
            self,
            x=self.x.to(device),
            y=self.y.to(device),
            index=self.index.to(device),
        )

    def subset(
        self, size: int | None = None, *, per_class: int | None = None, seed: int = 0
    ) -> TensorData:
        """Pick a class-balanced random subset.

        Give either ``size`` or ``per_class``. With ``size``, every class gets
        ``size // num_classes`` samples and the first ``size % num_classes``
        classes (in label order) one more. Which samples are taken depends only on
        ``seed`` (and on this data); the subset keeps the order of this data and
        the samples' dataset indices.

        Args:
            size: Total number of samples.
            per_class: Number of samples of every class.
            seed: Non-negative seed of the random choice.

        Returns:
            A new :class:`TensorData` on the same device.

        Raises:
            ValueError: If neither or both of ``size`` and ``per_class`` are given,
                if one is not a positive integer, or if the subset is larger than
                what the data holds (overall or in some class).
        """
        _check_seed(seed)
        num_classes = len(self.classes)
        if (size is None) == (per_class is None):
            raise ValueError(
                "subset() needs exactly one of size or per_class; got "
                f"size={size!r}, per_class={per_class!r}."
            )
        if size is not None:
            _check_positive_int("size", size)
            if size > len(self):
                raise ValueError(
                    f"Subset of {size} samples requested, but {self.name} {self.split} "
                    f"has only {len(self)}: pass size <= {len(self)}."
                )
            quota = [
                size // num_classes + (c < size % num_classes)
                for c in range(num_classes)
            ]
        else:
            _check_positive_int("per_class", per_class)
            quota = [per_class] * num_classes

        counts = torch.bincount(self.y.cpu(), minlength=num_classes).tolist()
        short = [c for c in range(num_classes) if quota[c] > counts[c]]
        if short:
            c = short[0]
            fewest = min(counts)
            raise ValueError(
                f"A balanced subset needs {quota[c]} samples of class {c} "
                f"({self.classes[c]!r}), but {self.name} {self.split} has only "
                f"{counts[c]}: pass per_class <= {fewest} or size <= "
                f"{fewest * num_classes}."
            )

        chosen = _take_per_class(self.y.cpu(), quota, _derived_seed(seed, 1))
        chosen = chosen.to(self.x.device)
        return dataclasses.replace(
            self,
            x=self.x.index_select(0, chosen),
            y=self.y.index_select(0, chosen),
            index=self.index.index_select(0, chosen),
        )

    def loader(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    ) -> Loader:
        """Return a :class:`Loader` over this data (see there for the arguments)."""
        return Loader(
            self,
            batch_size,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            augment=augment,
        )


@dataclass(frozen=True, eq=False)
class Splits:
    """The three splits of a data set, as returned by :func:`load`."""

    train: TensorData
    val: TensorData
    test: TensorData


class Loader:
    """A fast shuffling iterator over a :class:`TensorData`.

    Every ``iter(loader)`` runs one epoch and then moves on to the next one: the
    first pass is epoch 0, the second epoch 1, and so on. :attr:`epoch` says which
    comes next; it moves on when a pass starts (a pass cut short still counts), and
    can be set to resume. Epoch ``e`` is the same for every loader with the
    same data and ``seed``: its permutation and its augmentation draws come from a
    generator seeded with ``(seed, e)`` only. :meth:`iter_epoch` runs a given epoch
    without touching the counter.

    Per epoch there is one ``torch.randperm`` on the CPU, moved once to the data's
    device; per batch, three ``index_select`` calls. Nothing is done per sample in
    Python.

    Args:
        data: The samples.
        batch_size: Samples per batch.
        shuffle: Shuffle every epoch; otherwise batches follow the data's order.
        seed: Non-negative seed of the permutations and augmentation.
        drop_last: Drop the last batch when it is smaller than ``batch_size``.
        augment: A function ``(x [B, C, H, W], generator) -> x`` applied to every
            batch, for example :func:`cifar_augment`.

    Raises:
        ValueError: If ``batch_size`` is not a positive integer or ``seed`` is not
            a non-negative integer.
    """

    def __init__(
        self,
        data: TensorData,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    ) -> None:
        _check_positive_int("batch_size", batch_size)
        _check_seed(seed)

        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.augment = augment
        self.epoch = 0

    def __len__(self) -> int:
        """Number of batches per epoch."""
        if self.drop_last:
            return len(self.data) // self.batch_size
        return math.ceil(len(self.data) / self.batch_size)

    def __repr__(self) -> str:
        return (
            f"Loader({self.data!r}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, seed={self.seed}, epoch={self.epoch})"
        )

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        self.epoch += 1
        return self.iter_epoch(epoch)

    def generator(self, epoch: int) -> torch.Generator:
        """Return a fresh CPU generator seeded with ``(seed, epoch)``."""
        _check_seed(epoch, what="epoch")
        return torch.Generator().manual_seed(_derived_seed(self.seed, 2, epoch))

    def permutation(self, epoch: int) -> Tensor:
        """Return the row order ``[N]`` (int64, CPU) of epoch ``epoch``."""
        return self._order(self.generator(epoch))

    def iter_epoch(self, epoch: int) -> Iterator[Batch]:
        """Iterate over the batches of epoch ``epoch`` (the counter is unchanged).

        Args:
            epoch: A non-negative epoch number.

        Returns:
            An iterator of :class:`Batch` tuples on the data's device.

        Raises:
            ValueError: If ``epoch`` is not a non-negative integer.
        """
        return self._batches(self.generator(epoch))

    def _batches(self, generator: torch.Generator) -> Iterator[Batch]:
        order = self._order(generator).to(self.data.x.device)
        x, y, index = self.data.x, self.data.y, self.data.index

        for b in range(len(self)):
            rows = order[b * self.batch_size : (b + 1) * self.batch_size]
            xb = x.index_select(0, rows)
            if self.augment is not None:
                xb = self.augment(xb, generator)
            yield Batch(xb, y.index_select(0, rows), index.index_select(0, rows))

    def _order(self, generator: torch.Generator) -> Tensor:
        n = len(self.data)
        if self.shuffle:
            return torch.randperm(n, generator=generator)
        return torch.arange(n)


# ------------------------------------------------------------ augmentation
def cifar_augment(x: Tensor, generator: torch.Generator, *, padding: int = 4) -> Tensor:
    """Random crop of the zero-padded image and random horizontal flip, per sample.

    Every sample is padded by ``padding`` pixels on each side, cropped back to its
    size at a random offset in ``[0, 2 * padding]`` along each axis, and flipped
    left-right with probability 1/2. The batch is handled with one ``gather`` (no
    Python loop over samples).

    Note:
        The padding value is 0 in the normalised space, that is the data set's mean
        colour, not black: the tensors are already normalised.

    Args:
        x: Images ``[B, C, H, W]``.
        generator: CPU generator for the random offsets and flips (the
            :class:`Loader` passes its epoch generator).
        padding: Pixels of padding on each side, non-negative.

    Returns:
        The augmented images ``[B, C, H, W]``, a new tensor on ``x``'s device.

    Raises:
        ValueError: If ``x`` is not 4-D or ``padding`` is negative.
    """
    if x.dim() != 4:
        raise ValueError(
            f"cifar_augment needs images [B, C, H, W]; got shape {list(x.shape)}: "
            "pass a batch, e.g. x.unsqueeze(0) for one image."
        )
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"Invalid padding {padding!r}: pass a non-negative integer.")

    batch = x.shape[0]
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator)
    flip = torch.randint(0, 2, (batch,), generator=generator).bool()

    return _crop_flip(
        x,
        offsets[0].to(x.device),
        offsets[1].to(x.device),
        flip.to(x.device),
        padding,
    )


def _crop_flip(
    x: Tensor, top: Tensor, left: Tensor, flip: Tensor, padding: int
) -> Tensor:
    """Crop the padded ``x`` at ``(top, left)`` ``[B]``; flip where ``flip`` ``[B]``."""
    batch, channels, height, width = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    padded_width = padded.shape[3]

    rows = top[:, None] + torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device).expand(batch, width)
    # A flipped crop reads the crop window's columns right to left.
    cols = torch.where(flip[:, None], width - 1 - cols, cols) + left[:, None]
    # One gather over the flattened image plane, the same positions for every channel.
    where = rows[:, :, None] * padded_width + cols[:, None, :]
    where = where.reshape(batch, 1, height * width).expand(-1, channels, -1)
    out = padded.reshape(batch, channels, -1).gather(2, where)

    return out.reshape(batch, channels, height, width)


def denormalise(x: Tensor, name: str) -> Tensor:
    """Undo the normalisation of data set ``name``, for showing images.

    Args:
        x: Normalised images ``[N, C, H, W]`` or ``[C, H, W]``.
        name: Data set name (see :func:`canonical_name`).

    Returns:
        Images on the [0, 1] scale (clamped), same shape as ``x``.

    Raises:
        ValueError: If ``name`` is unknown.
    """
    mean, std = STATS[canonical_name(name)]
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device)[:, None, None]

    return (x * std_t + mean_t).clamp(0.0, 1.0)


# ------------------------------------------------------------------- loading
def canonical_name(name: str) -> str:
    """Return the canonical spelling of a data set name.

    Names are case-insensitive; ``_`` counts as ``-``; ``"cifar-10"`` and
    ``"fashionmnist"`` are accepted too.

    Args:
        name: A data set name.

    Returns:
        One of :data:`DATASETS`.

    Raises:
        ValueError: If the name is not one of those.
    """
    key = str(name).strip().lower().replace("_", "-")
    if key not in _ALIASES:
        raise ValueError(
            f"Unknown data set {name!r}: use one of {', '.join(DATASETS)}."
        )
    return _ALIASES[key]


def load(
    name: str,
    *,
    val_size: int = 5000,
    seed: int = 0,
    device: torch.device | str | None = None,
    root: str | os.PathLike | None = None,
) -> Splits:
    """Load a data set into normalised tensors and split it.

    The validation set is drawn from the training set, stratified by class: every
    class gives ``val_size * n_class / n`` samples (rounded by largest remainder),
    chosen by a permutation that depends only on ``seed``. Train and val keep the
    order of the original training set; ``index`` is the position there (and in
    the test set for test).

    Args:
        name: ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"`` (see
            :func:`canonical_name`).
        val_size: Number of validation samples, in ``[0, n_train)``.
        seed: Non-negative seed of the split.
        device: Where the tensors go; default :func:`neuronlib.config.get_device`.
        root: A local mirror to use instead of ``NEURONLIB_DATA`` (see the module
            docstring for the look-up order).

    Returns:
        :class:`Splits` with x ``[N, 1, 28, 28]`` (MNIST, Fashion-MNIST) or
        ``[N, 3, 32, 32]`` (CIFAR-10), float32, on ``device``.

    Raises:
        ValueError: Unknown name, bad ``val_size`` or ``seed``, a mirror file whose
            checksum does not match or that ``SHA256SUMS`` does not list.
        FileNotFoundError: The named mirror does not exist or lacks the data set,
            or nothing was found locally and the download failed.
    """
    name = canonical_name(name)
    _check_seed(seed)
    device = config.get_device() if device is None else torch.device(device)

    if isinstance(val_size, bool) or not isinstance(val_size, int):
        raise ValueError(f"Invalid val_size {val_size!r}: pass an integer.")

    raw = _load_raw(name, root)
    n_train = raw.train_y.shape[0]
    if not 0 <= val_size < n_train:
        raise ValueError(
            f"Invalid val_size {val_size}: {name} has {n_train} training samples, so "
            f"pass 0 <= val_size < {n_train} (0 for no validation set)."
        )

    classes = raw.classes
    val_rows = _stratified_val(raw.train_y, len(classes), val_size, seed)
    in_val = torch.zeros(n_train, dtype=torch.bool)
    in_val[val_rows] = True
    train_rows = torch.nonzero(~in_val).squeeze(1)
    test_rows = torch.arange(raw.test_y.shape[0])

    def split(x: Tensor, y: Tensor, rows: Tensor, split_name: str) -> TensorData:
        return TensorData(
            x=_normalise(x.index_select(0, rows).to(device), name),
            y=y.index_select(0, rows).to(device),
            index=rows.to(device),
            classes=classes,
            name=name,
            split=split_name,
        )

    return Splits(
        train=split(raw.train_x, raw.train_y, train_rows, "train"),
        val=split(raw.train_x, raw.train_y, val_rows, "val"),
        test=split(raw.test_x, raw.test_y, test_rows, "test"),
    )


class _Raw(NamedTuple):
    """Unnormalised data: x uint8 ``[N, C, H, W]``, y int64 ``[N]`` (CPU)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: tuple[str, ...]


def _normalise(x: Tensor, name: str) -> Tensor:
    """uint8 ``[N, C, H, W]`` -> float32 ``(x / 255 - mean) / std``, per channel."""
    mean, std = STATS[name]
    # One multiply and one add (division is several times slower on the CPU).
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=x.device)
    shift = torch.tensor(
        [-m / s for m, s in zip(mean, std, strict=True)], device=x.device
    )

    return x.float().mul_(scale[:, None, None]).add_(shift[:, None, None])


def _load_raw(name: str, root: str | os.PathLike | None) -> _Raw:
    """Find the raw data of ``name`` in the look-up order and load it."""
    mirror, label = _named_mirror(root)
    looked: list[str] = []

    sources = []
    if mirror is not None:
        sources.append((mirror, f"{label}={mirror}"))
    if name == "fashion-mnist":
        debian = "Debian's package (apt-get install dataset-fashion-mnist)"
        sources.append((DEBIAN_FASHION_MNIST, debian))
    for folder, what in sources:
        files = _mirror_files(name, folder, debian=folder == DEBIAN_FASHION_MNIST)
        if files is not None:
            logger.info("Loading %s from %s (%s)", name, folder, what)
            return _load_from_mirror(name, folder, files)
        looked.append(
            f"{what}: {_expected_files(name, folder, folder == DEBIAN_FASHION_MNIST)}"
        )

    tv_root = _torchvision_root()
    raw, reason = _load_torchvision(name, tv_root, download=False)
    if raw is not None:
        logger.info("Loading %s from torchvision's cache %s", name, tv_root)
        return raw
    looked.append(f"torchvision's cache {tv_root}: {reason}")

    if mirror is not None:
        raise FileNotFoundError(
            f"{label} points at {mirror}, which has no {name}. Looked in:\n  "
            + "\n  ".join(looked)
            + f"\nPut the files named above into {mirror} (and list them in its "
            f"SHA256SUMS if it has one), or unset {label} to download {name} "
            "through torchvision."
        )

    logger.info("Downloading %s through torchvision into %s", name, tv_root)
    raw, reason = _load_torchvision(name, tv_root, download=True)
    if raw is not None:
        return raw
    raise FileNotFoundError(
        f"{name} was not found locally and could not be downloaded ({reason}). "
        "Looked in:\n  "
        + "\n  ".join(looked)
        + f"\nSet NEURONLIB_DATA to a folder with {_mirror_layout(name)} (for example "
        "a copy of the offline mirror), or connect to the network and retry."
    )


def _named_mirror(root: str | os.PathLike | None) -> tuple[Path | None, str]:
    if root is not None:
        path, label = Path(root), "root"
    elif os.environ.get("NEURONLIB_DATA"):
        path, label = Path(os.environ["NEURONLIB_DATA"]), "NEURONLIB_DATA"
    else:
        return None, ""

    path = path.expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{label} points at {path}, which does not exist or is not a folder; set "
            "it to a data mirror (a folder with MNIST/raw/*-ubyte.gz, "
            "FashionMNIST/raw/*-ubyte.gz and/or cifar-10-python.tar.xz) or unset it to "
            "use torchvision's cache and downloads."
        )
    return path, label


def _torchvision_root() -> Path:
    """Return torchvision's usual data folder.

    ``$TORCH_HOME/datasets``, else ``$XDG_CACHE_HOME/torch/datasets``, else
    ``~/.cache/torch/datasets``.

    Returns:
        The folder (it may not exist).
    """
    if os.environ.get("TORCH_HOME"):
        return Path(os.environ["TORCH_HOME"]).expanduser() / "datasets"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "torch" / "datasets"


def _mirror_layout(name: str) -> str:
    if name == "cifar10":
        return "cifar-10-python.tar.xz (or .tar.gz)"
    return ", ".join(f"{_TV_FOLDER[name]}/raw/{f}.gz" for f in _IDX_FILES)


def _expected_files(name: str, folder: Path, debian: bool) -> str:
    if debian:
        return f"no {', '.join(f + '.gz' for f in _IDX_FILES)} in {folder}"
    return f"no {_mirror_layout(name)} in {folder}"


def _mirror_files(name: str, folder: Path, *, debian: bool) -> list[Path] | None:
    """The files of ``name`` in ``folder``, None when it has none of them.

    Raises:
        FileNotFoundError: If some of the files are there but not all.
    """
    if name == "cifar10":
        for archive in _CIFAR_ARCHIVES:
            if (folder / archive).is_file():
                return [folder / archive]
        return None

    raw = folder if debian else folder / _TV_FOLDER[name] / "raw"
    files = [raw / f"{f}.gz" for f in _IDX_FILES]
    present = [f.is_file() for f in files]
    if not any(present):
        return None
    if not all(present):
        missing = [str(f) for f, ok in zip(files, present, strict=True) if not ok]
        raise FileNotFoundError(
            f"The {name} files in {raw} are incomplete: {', '.join(missing)} "
            "missing; copy all four files there."
        )
    return files


# ----------------------------------------------------------- verification
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_sums(path: Path) -> dict[str, str]:
    """Parse a ``sha256sum`` file into {relative posix path: hex digest}."""
    sums = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise ValueError(
                f"Line {number} of {path} is not '<sha256>  <path>': {line!r}; fix it "
                "(write it with `sha256sum FILE >> SHA256SUMS` in that folder)."
            )
        digest, rel = parts
        rel = rel.lstrip("*")
        rel = rel[2:] if rel.startswith("./") else rel
        sums[rel] = digest.lower()
    return sums


def _verify(folder: Path, files: list[Path]) -> dict[str, str]:
    """Hash ``files``; check them against ``folder/SHA256SUMS`` when it exists.

    Returns:
        {file name: sha256 hex digest}.

    Raises:
        ValueError: If a file is not listed or its digest differs.
    """
    sums_path = folder / "SHA256SUMS"
    sums = _read_sums(sums_path) if sums_path.is_file() else None
    if sums is None:
        logger.info("%s has no SHA256SUMS; its files are not verified", folder)

    digests = {}
    for path in files:
        rel = path.relative_to(folder).as_posix()
        if sums is not None and rel not in sums:
            raise ValueError(
                f"{path} is not listed in {sums_path}, so it cannot be verified; add "
                f"its line (`sha256sum {rel} >> SHA256SUMS` in {folder}) or use a "
                "mirror that lists it."
            )
        got = _sha256(path)
        if sums is not None and got != sums[rel]:
            raise ValueError(
                f"Checksum mismatch for {path}: {sums_path} expects sha256 "
                f"{sums[rel]}, the file has {got}; replace the file with a good copy "
                "or fix SHA256SUMS."
            )
        digests[path.name] = got
    return digests


# ------------------------------------------------------------ extraction
def _data_cache(mirror: Path) -> Path:
    cache = (config.cache_dir() / "data").expanduser().resolve()
    if cache.is_relative_to(mirror.resolve()):
        raise ValueError(
            f"The data cache {cache} lies inside the data mirror {mirror}, which must "
            "never be written to; set NEURONLIB_CACHE to a folder outside it."
        )
    return cache


def _load_from_mirror(name: str, folder: Path, files: list[Path]) -> _Raw:
    """Verify, extract once into the cache, and load."""
    digests = _verify(folder, files)
    key_text = json.dumps(
        {"dataset": name, "format": _ENTRY_FORMAT, "sources": digests}, sort_keys=True
    )
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    entry = _data_cache(folder) / f"{name}-{key}"

    if not _entry_complete(entry, digests):
        build = _extract_cifar if name == "cifar10" else _decompress_idx
        _build_entry(entry, digests, lambda tmp: build(name, files, tmp))

    try:
        return _check_raw(_read_entry(name, entry), entry)
    except Exception as error:  # noqa: BLE001 - any damage: rebuild once, then report
        logger.warning("Cache entry %s is unreadable (%s); rebuilding it", entry, error)
    shutil.rmtree(entry, ignore_errors=True)
    build = _extract_cifar if name == "cifar10" else _decompress_idx
    _build_entry(entry, digests, lambda tmp: build(name, files, tmp))
    try:
        return _check_raw(_read_entry(name, entry), entry)
    except Exception as error:  # noqa: BLE001 - torchvision asserts on bad idx files
        raise ValueError(
            f"The {name} files from {folder} cannot be read ({error!r}); replace them "
            "with good copies."
        ) from error


def _check_raw(raw: _Raw, where: Path) -> _Raw:
    """Check shapes and label range of freshly read data."""
    num_classes = len(raw.classes)
    for x, y, split in (
        (raw.train_x, raw.train_y, "train"),
        (raw.test_x, raw.test_y, "test"),
    ):
        if x.dtype != torch.uint8 or x.dim() != 4 or y.shape != (x.shape[0],):
            raise ValueError(
                f"{where}: the {split} split has x {list(x.shape)} {x.dtype} and y "
                f"{list(y.shape)}, not x [N, C, H, W] uint8 and y [N]."
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(
                f"{where}: {split} labels outside [0, {num_classes}); the data is "
                "damaged."
            )
    return raw


def _entry_complete(entry: Path, digests: dict[str, str]) -> bool:
    manifest = entry / _MANIFEST
    if not manifest.is_file():
        if entry.exists():
            logger.warning("Cache entry %s has no manifest; rebuilding it", entry)
            shutil.rmtree(entry, ignore_errors=True)
        return False
    try:
        return json.loads(manifest.read_text()).get("sources") == digests
    except (OSError, ValueError):
        return False


def _build_entry(
    entry: Path, digests: dict[str, str], build: Callable[[Path], None]
) -> None:
    """Build a cache entry in a temporary folder, then rename it into place.

    An interruption (an error, Ctrl-C) removes the temporary folder, so ``entry``
    either exists complete or not at all. A process killed outright may leave a
    ``.<entry>.partial-*`` folder beside it; it is never read and can be deleted.
    """
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.partial-", dir=entry.parent))
    except OSError as error:
        raise PermissionError(
            f"Cannot create the data cache in {entry.parent} ({error}); set "
            "NEURONLIB_CACHE to a writable folder."
        ) from error

    try:
        logger.info("Extracting into %s (once)", entry)
        build(tmp)
        manifest = {"format": _ENTRY_FORMAT, "sources": digests}
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        try:
            os.replace(tmp, entry)
        except OSError:
            # Another process finished the same entry first: keep theirs.
            if not _entry_complete(entry, digests):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _decompress_idx(name: str, files: list[Path], tmp: Path) -> None:
    raw = tmp / _TV_FOLDER[name] / "raw"
    raw.mkdir(parents=True)
    for path in files:
        target = raw / path.name.removesuffix(".gz")
        try:
            with gzip.open(path, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, _HASH_CHUNK)
        except (gzip.BadGzipFile, EOFError, zlib.error) as error:
            raise ValueError(
                f"{path} is not a valid gzip file ({error}); replace it with a good "
                "copy."
            ) from error


def _extract_cifar(name: str, files: list[Path], tmp: Path) -> None:
    """Read the batches out of the archive and save them as ``arrays.npz``."""
    archive = files[0]
    wanted = {*_CIFAR_TRAIN, *_CIFAR_TEST, _CIFAR_META}
    found: dict[str, object] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                folder, _, base = member.name.rpartition("/")
                if (
                    member.isfile()
                    and folder.endswith(_CIFAR_FOLDER)
                    and base in wanted
                ):
                    stream = tar.extractfile(member)
                    found[base] = _restricted_unpickle(
                        stream.read(), f"{archive}:{base}"
                    )
    except (tarfile.TarError, OSError, EOFError, lzma.LZMAError, zlib.error) as error:
        raise ValueError(
            f"{archive} is not a readable tar archive ({_one_line(error)}); "
            "replace it with a good copy."
        ) from error

    missing = sorted(wanted - found.keys())
    if missing:
        raise ValueError(
            f"{archive} lacks {', '.join(f'{_CIFAR_FOLDER}/{m}' for m in missing)}; "
            "replace it with a complete CIFAR-10 python archive."
        )

    train_x, train_y = _cifar_arrays([found[b] for b in _CIFAR_TRAIN], archive)
    test_x, test_y = _cifar_arrays([found[b] for b in _CIFAR_TEST], archive)
    meta = found[_CIFAR_META]
    names = meta.get("label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list):
        raise ValueError(
            f"{archive}: batches.meta has no label_names list; replace the archive."
        )
    classes = np.array([_as_str(n) for n in names])

    # Uncompressed: loading 184 MB back is faster than inflating it.
    np.savez(
        tmp / "arrays.npz",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        classes=classes,
    )


def _cifar_arrays(
    batches: list[object], archive: Path
) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for batch in batches:
        data = batch.get("data") if isinstance(batch, dict) else None
        labels = batch.get("labels") if isinstance(batch, dict) else None
        if (
            not isinstance(data, np.ndarray)
            or data.dtype != np.uint8
            or data.ndim != 2
            or data.shape[1] != 3 * 32 * 32
            or not isinstance(labels, list)
            or len(labels) != data.shape[0]
        ):
            raise ValueError(
                f"{archive}: a batch is not {{'data': uint8 [n, 3072], 'labels': n "
                "ints}; replace the archive with a CIFAR-10 python archive."
            )
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(labels, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _as_str(value: object) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, bytes, numbers and numpy arrays only."""

    def find_class(self, module: str, name: str) -> object:
        allowed = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct(),
            ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct(),
            ("numpy.core.numeric", "_frombuffer"): _np_frombuffer(),
            ("numpy._core.numeric", "_frombuffer"): _np_frombuffer(),
            # Python 3 writes bytes this way under protocol 2.
            ("_codecs", "encode"): _latin1_encode,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return allowed[(module, name)]


def _np_reconstruct() -> Callable:
    core = getattr(np, "_core", None) or np.core
    return core.multiarray._reconstruct


def _np_frombuffer() -> Callable:
    core = getattr(np, "_core", None) or np.core
    return core.numeric._frombuffer


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed")
    return text.encode("latin1")


def _restricted_unpickle(payload: bytes, where: str) -> object:
    try:
        return _RestrictedUnpickler(io.BytesIO(payload), encoding="latin1").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        LookupError,
    ) as error:
        raise ValueError(
            f"Refusing to unpickle {where}: {error}. A CIFAR-10 batch holds only "
            "dicts, lists, strings, ints and numpy arrays; replace the archive with a "
            "good copy."
        ) from error


def _read_entry(name: str, entry: Path) -> _Raw:
    if name == "cifar10":
        with np.load(entry / "arrays.npz", allow_pickle=False) as arrays:
            return _Raw(
                train_x=torch.from_numpy(arrays["train_x"]),
                train_y=torch.from_numpy(arrays["train_y"]),
                test_x=torch.from_numpy(arrays["test_x"]),
                test_y=torch.from_numpy(arrays["test_y"]),
                classes=tuple(str(c) for c in arrays["classes"]),
            )
    return _read_torchvision(name, entry, download=False)


# --------------------------------------------------------------- torchvision
def _read_torchvision(name: str, root: Path, *, download: bool) -> _Raw:
    """Load through ``torchvision.datasets`` (its own checks apply)."""
    from torchvision import datasets

    cls = {
        "mnist": datasets.MNIST,
        "fashion-mnist": datasets.FashionMNIST,
        "cifar10": datasets.CIFAR10,
    }[name]
    train = cls(root=str(root), train=True, download=download)
    test = cls(root=str(root), train=False, download=download)

    def tensors(ds: object) -> tuple[Tensor, Tensor]:
        if name == "cifar10":
            x = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
            return x, torch.as_tensor(ds.targets, dtype=torch.int64)
        return ds.data.unsqueeze(1).contiguous(), ds.targets.to(torch.int64)

    train_x, train_y = tensors(train)
    test_x, test_y = tensors(test)
    return _Raw(train_x, train_y, test_x, test_y, tuple(str(c) for c in train.classes))


def _load_torchvision(
    name: str, root: Path, *, download: bool
) -> tuple[_Raw | None, str]:
    """Try torchvision; return (data, "") or (None, why not)."""
    if not download and not _torchvision_has(name, root):
        folder = _CIFAR_FOLDER if name == "cifar10" else f"{_TV_FOLDER[name]}/raw"
        return None, f"no {folder}"
    try:
        return _check_raw(_read_torchvision(name, root, download=download), root), ""
    except (URLError, OSError, RuntimeError) as error:
        return None, f"torchvision refused it: {_one_line(error)[:300]}"


def _torchvision_has(name: str, root: Path) -> bool:
    if name == "cifar10":
        return (root / _CIFAR_FOLDER).is_dir()
    folder = root / _TV_FOLDER[name]
    return (folder / "raw").is_dir() or (folder / "processed").is_dir()


# ----------------------------------------------------------------- helpers
def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _check_positive_int(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {what} {value!r}: pass a positive integer.")


def _check_seed(seed: object, *, what: str = "seed") -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Invalid {what} {seed!r}: pass a non-negative integer.")


def _derived_seed(seed: int, purpose: int, *more: int) -> int:
    """A 63-bit seed for one purpose (split, subset, epoch) derived from ``seed``."""
    words = np.random.SeedSequence([seed, purpose, *more]).generate_state(2, np.uint32)
    return ((int(words[0]) << 32) | int(words[1])) & (2**63 - 1)


def _take_per_class(y: Tensor, quota: list[int], seed: int) -> Tensor:
    """Rows (sorted) with ``quota[c]`` random rows of every class ``c``.

    One random permutation, then a stable sort by class: the rows of each class
    come out in random order, and the first ``quota[c]`` of them are taken.
    """
    generator = torch.Generator().manual_seed(seed)
    num_classes = len(quota)
    perm = torch.randperm(y.shape[0], generator=generator)
    labels, order = torch.sort(y[perm], stable=True)
    grouped = perm[order]

    counts = torch.bincount(y, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(y.shape[0]) - starts[labels]
    keep = rank < torch.tensor(quota, dtype=torch.int64)[labels]

    return grouped[keep].sort().values


def _stratified_val(y: Tensor, num_classes: int, val_size: int, seed: int) -> Tensor:
    """Validation rows: per class ``val_size * n_c / n`` by largest remainder."""
    counts = torch.bincount(y, minlength=num_classes).tolist()
    n = sum(counts)
    quota = [val_size * c // n for c in counts]
    left = val_size - sum(quota)
    by_remainder = sorted(
        range(num_classes), key=lambda c: (-(val_size * counts[c] % n), c)
    )
    for c in by_remainder[:left]:
        quota[c] += 1

    return _take_per_class(y, quota, _derived_seed(seed, 0))
