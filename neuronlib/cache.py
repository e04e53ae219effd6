"""Cached runs: a run is computed once per configuration and read back after.

A run is identified by its *key*, the SHA-256 of the canonical JSON of its
configuration, the scale, the hash of the library's own source code and the torch
version. Changing any of them gives a new key and so a fresh run: editing any
module of ``neuronlib`` invalidates every entry (Jupyter Book's execution cache,
which only sees the notebooks, would miss that).

An entry is a folder ``<root>/runs/<name>-<key[:16]>/`` with two files:

- ``meta.json``: the name, the full key, the scale, the library hash, the torch
  version, the configuration (human-readable) and the result, in which tensors,
  arrays and histories are replaced by small markers;
- ``arrays.npz``: the tensors and arrays of the result, as NumPy arrays.

Nothing is ever pickled: the arrays are read with ``np.load(allow_pickle=False)``
and everything else is JSON. An entry is written into a temporary folder next to
it, with every file synced to disk, and then renamed to its final name in one
step, so a reader sees either no entry or a complete one, also after an interrupt
or a crash. An entry that cannot be read (bad JSON, a truncated or missing file)
is reported with a warning, deleted and computed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
import zipfile
import zlib
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuronlib import config as _config
from neuronlib.train import History

logger = logging.getLogger(__name__)

FORMAT = 1
"""Version of the entry layout; entries of another version are recomputed."""

_MARKER = "__neuronlib__"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}")
# Temporary folders older than this were left by a process that was killed
# mid-write (writing takes seconds), so they can be removed.
_STALE_SECONDS = 3600.0
# Dtypes that NumPy lacks, stored as a wider dtype that holds every value exactly.
_WIDER = {
    torch.bfloat16: torch.float32,
    torch.complex32: torch.complex64,
    **{
        getattr(torch, name): torch.float32
        for name in (
            "float8_e4m3fn",
            "float8_e4m3fnuz",
            "float8_e5m2",
            "float8_e5m2fnuz",
        )
        if hasattr(torch, name)
    },
}
# What reading a damaged entry can raise (JSONDecodeError is a ValueError).
_UNREADABLE = (
    OSError,
    ValueError,
    KeyError,
    TypeError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
)


def library_hash(*, package_dir: str | os.PathLike | None = None) -> str:
    """Hash the library's source code.

    Every ``.py`` file under the package folder counts, subpackages included:
    the sorted relative paths and the bytes of each file.

    Args:
        package_dir: The package folder; defaults to the folder of the installed
            ``neuronlib``.

    Returns:
        The SHA-256 hex digest.
    """
    root = Path(package_dir) if package_dir is not None else Path(__file__).parent
    files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*.py"))

    digest = hashlib.sha256()
    for relative, path in files:
        data = path.read_bytes()
        digest.update(f"{relative}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def run_key(config: Mapping[str, Any], *, scale: str | None = None) -> str:
    """Compute the key of a run.

    The key is the SHA-256 of the canonical JSON (sorted keys, no spaces, no NaN)
    of ``{"config", "scale", "library_hash", "torch"}``. Tuples count as lists
    and NumPy scalars as the Python numbers they hold.

    Note:
        The device is not part of the key: a run cached on a GPU is read back on a
        CPU. Put the device in the configuration if results must be kept apart.

    Args:
        config: The run's configuration: a dict of JSON values (numbers,
            strings, booleans, ``None``, lists and dicts with string keys).
        scale: The scale; defaults to the one in force (``NEURONLIB_SCALE``).

    Returns:
        The key, 64 hex digits.

    Raises:
        ValueError: If ``config`` is not a dict of JSON values (a tensor, a path,
            a NaN, a non-string dict key, ...), or the scale is unknown.
    """
    return hashlib.sha256(_canonical(_identity(config, scale)).encode()).hexdigest()


def cached(
    name: str,
    config: Mapping[str, Any],
    compute: Callable[[], Mapping[str, Any]],
    *,
    scale: str | None = None,
    root: str | os.PathLike | None = None,
    refresh: bool = False,
) -> dict[str, Any]:
    """Return the result of a run, computing it only when no entry holds it.

    ``compute()`` returns a dict. Its values, also inside nested dicts and
    lists, may be ``torch.Tensor`` (stored in ``arrays.npz``, read back as a CPU
    tensor of the same dtype and shape), ``np.ndarray`` (read back as an array),
    :class:`~neuronlib.train.History` (read back as a History) or JSON values
    (tuples come back as lists, NumPy scalars as Python numbers; NaN and
    infinities are kept). The value returned is always the one read back from the
    entry, so a fresh run and a cached one look the same.

    Args:
        name: A short name for the run, used in the folder name (letters, digits,
            ``_``, ``.`` and ``-``).
        config: The run's configuration (see :func:`run_key`); also kept in
            ``meta.json`` for people reading the cache.
        compute: Computes the result when it is not cached.
        scale: The scale; defaults to the one in force.
        root: The cache folder; defaults to ``neuronlib.config.cache_dir()``.
        refresh: Whether to compute again and replace an existing entry.

    Returns:
        The result.

    Raises:
        ValueError: If ``name`` or ``config`` is invalid, or the result holds a
            value that cannot be stored without pickle.
        TypeError: If ``compute`` is not callable or does not return a dict.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"Invalid run name {name!r}; use 1 to 100 letters, digits, '_', '.' or "
            "'-', starting with a letter or digit, for example 'mlp-mnist'."
        )
    if not callable(compute):
        raise TypeError(f"compute={compute!r} is not callable; pass a function.")
    identity = _identity(config, scale)
    key = hashlib.sha256(_canonical(identity).encode()).hexdigest()
    runs = Path(root if root is not None else _config.cache_dir()) / "runs"
    folder = runs / f"{name}-{key[:16]}"

    if not refresh and folder.exists():
        try:
            result = _read(folder, key)
        except _UNREADABLE as error:
            logger.warning(
                "Cached run %s cannot be read (%s: %s); deleting it and computing "
                "the run again.",
                folder,
                type(error).__name__,
                error,
            )
            _delete(folder)
        else:
            logger.debug("Read cached run %s.", folder)
            return result

    result = compute()
    if not isinstance(result, Mapping):
        raise TypeError(
            f"compute() returned a {type(result).__name__}; it must return a dict."
        )
    arrays: dict[str, np.ndarray] = {}
    encoded = _encode(result, "result", arrays)
    meta = {
        "format": FORMAT,
        "name": name,
        "key": key,
        **identity,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "result": encoded,
    }
    _write(runs, folder, meta, arrays, replace=refresh)
    logger.debug("Wrote cached run %s.", folder)
    return _read(folder, key)


def _identity(config: Mapping[str, Any], scale: str | None) -> dict[str, Any]:
    """What the key is computed from, as plain JSON values."""
    if not isinstance(config, Mapping):
        raise ValueError(
            f"config of type {type(config).__name__} must be a dict of JSON values, "
            "for example {'lr': 0.1, 'widths': [1024, 1024]}."
        )
    return {
        "config": _plain(config, "config"),
        "scale": _config.get_scale(scale),
        "library_hash": library_hash(),
        "torch": torch.__version__,
    }


def _canonical(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def _plain(value: Any, where: str) -> Any:
    """Check that a configuration value is JSON; return it with tuples as lists."""
    if isinstance(value, np.generic) and not isinstance(value, (np.void, np.object_)):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(
                f"{where} is {value}, which has no canonical JSON form; use a finite "
                "number or a string such as 'inf'."
            )
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise ValueError(
                    f"{where} has the key {key!r} of type {type(key).__name__}; "
                    "use string keys."
                )
        return {key: _plain(item, f"{where}[{key!r}]") for key, item in value.items()}
    raise ValueError(
        f"{where} is a {type(value).__name__}, which is not a JSON value; use a "
        "number, string, boolean, None, list or dict (for example str(path) or "
        "tensor.tolist())."
    )


def _encode(value: Any, where: str, arrays: dict[str, np.ndarray]) -> Any:
    """Turn a result into JSON, moving tensors and arrays into ``arrays``."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        wider = _WIDER.get(tensor.dtype)
        try:
            array = (tensor.to(wider) if wider else tensor).numpy()
        except (TypeError, RuntimeError) as error:
            raise ValueError(
                f"{where} is a tensor that cannot become a NumPy array ({error}); "
                "convert it first, for example with .to_dense()."
            ) from error
        key = f"a{len(arrays)}"
        arrays[key] = array
        dtype = str(tensor.dtype).removeprefix("torch.")
        return {_MARKER: "tensor", "key": key, "dtype": dtype}
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise ValueError(
                f"{where} is an array of Python objects, which only pickle could "
                "store; convert it to a numeric array or to lists."
            )
        key = f"a{len(arrays)}"
        arrays[key] = value
        return {_MARKER: "array", "key": key}
    if isinstance(value, History):
        return {_MARKER: "history", "value": _encode(value.to_dict(), where, arrays)}
    if isinstance(value, np.generic) and not isinstance(value, (np.void, np.object_)):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_encode(item, f"{where}[{i}]", arrays) for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        encoded = {}
        for key, item in value.items():
            if not isinstance(key, str) or key == _MARKER:
                raise ValueError(
                    f"{where} has the key {key!r}; use string keys other than "
                    f"{_MARKER!r}."
                )
            encoded[key] = _encode(item, f"{where}[{key!r}]", arrays)
        return encoded
    raise ValueError(
        f"{where} is a {type(value).__name__}, which cannot be stored without "
        "pickle; return tensors, arrays, a History, numbers, strings, lists or dicts."
    )


def _decode(value: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    if isinstance(value, list):
        return [_decode(item, arrays) for item in value]
    if not isinstance(value, dict):
        return value
    kind = value.get(_MARKER)
    if kind is None:
        return {key: _decode(item, arrays) for key, item in value.items()}
    if kind == "array":
        return arrays[value["key"]]
    if kind == "tensor":
        dtype = getattr(torch, value["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown tensor dtype {value['dtype']!r}")
        return torch.from_numpy(arrays[value["key"]]).to(dtype)
    if kind == "history":
        return History.from_dict(_decode(value["value"], arrays))
    raise ValueError(f"unknown marker {kind!r}")


def _read(folder: Path, key: str) -> dict[str, Any]:
    """Read an entry; raises one of ``_UNREADABLE`` when it is damaged."""
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"meta.json is not of format {FORMAT}")
    if meta.get("key") != key:
        raise ValueError("meta.json holds another key")
    with np.load(folder / "arrays.npz", allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    result = _decode(meta["result"], arrays)
    if not isinstance(result, dict):
        raise ValueError("the stored result is not a dict")
    return result


def _write(
    runs: Path,
    folder: Path,
    meta: dict[str, Any],
    arrays: dict[str, np.ndarray],
    *,
    replace: bool,
) -> None:
    """Write an entry atomically: a temporary folder, synced, then renamed."""
    runs.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(runs)
    temporary = Path(
        tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=runs)
    )
    old = None
    try:
        with open(temporary / "arrays.npz", "wb") as file:
            # Object arrays were refused by _encode, so nothing here is pickled.
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        with open(temporary / "meta.json", "w", encoding="utf-8") as file:
            json.dump(meta, file, indent=2, sort_keys=True)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        _fsync_folder(temporary)

        if replace and folder.exists():
            old = runs / f".{folder.name}.{uuid.uuid4().hex}.old"
            os.rename(folder, old)
        try:
            os.rename(temporary, folder)
        except OSError:
            if not folder.is_dir():
                raise
            # Another process wrote the same run meanwhile: keep its entry.
            logger.debug("Cached run %s appeared while writing; keeping it.", folder)
            shutil.rmtree(temporary, ignore_errors=True)
        _fsync_folder(runs)
    except BaseException:
        # Also on KeyboardInterrupt: never leave a half-written folder behind,
        # and put back an entry that was being replaced.
        shutil.rmtree(temporary, ignore_errors=True)
        if old is not None and not folder.exists():
            os.rename(old, folder)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temporaries(runs: Path) -> None:
    now = time.time()
    for path in list(runs.glob(".*.tmp")) + list(runs.glob(".*.old")):
        try:
            if now - path.stat().st_mtime > _STALE_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _delete(folder: Path) -> None:
    if folder.is_dir() and not folder.is_symlink():
        shutil.rmtree(folder)
    else:
        folder.unlink()


def _fsync_folder(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (a no-op where unsupported)."""
    if os.name == "nt":
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
