"""The run cache: keys, invalidation, atomic writes, corrupt entries, round trips."""

import json
import logging
import math
import shutil

import numpy as np
import pytest
import torch

from neuronlib import cache, train

CONFIG = {"lr": 0.1, "widths": [16, 16], "dataset": "mnist", "seed": 0}


@pytest.fixture
def root(tmp_path):
    return tmp_path / "cache"


def _entries(root):
    runs = root / "runs"
    return sorted(p.name for p in runs.iterdir()) if runs.exists() else []


class _Counter:
    """A compute function that counts its calls."""

    def __init__(self, result=None):
        self.calls = 0
        self.result = result if result is not None else {"value": 1.0}

    def __call__(self):
        self.calls += 1
        return self.result


# --- keys ---------------------------------------------------------------------


def test_the_same_config_gives_the_same_key():
    reordered = {"seed": 0, "dataset": "mnist", "widths": (16, 16), "lr": 0.1}

    assert cache.run_key(CONFIG, scale="quick") == cache.run_key(
        reordered, scale="quick"
    )
    assert len(cache.run_key(CONFIG, scale="quick")) == 64


def test_numpy_scalars_key_like_python_numbers():
    config = {**CONFIG, "seed": np.int64(0), "lr": np.float64(0.1)}

    assert cache.run_key(config, scale="quick") == cache.run_key(CONFIG, scale="quick")


@pytest.mark.parametrize(
    "change",
    [{"lr": 0.2}, {"widths": [16, 8]}, {"extra": None}, {"seed": 1.0}],
    ids=["value", "list", "new-key", "int-vs-float"],
)
def test_a_different_config_gives_a_different_key(change):
    assert cache.run_key({**CONFIG, **change}, scale="quick") != cache.run_key(
        CONFIG, scale="quick"
    )


def test_a_different_scale_gives_a_different_key(monkeypatch):
    keys = {cache.run_key(CONFIG, scale=s) for s in ("quick", "default", "paper")}
    monkeypatch.setenv("NEURONLIB_SCALE", "paper")

    assert len(keys) == 3
    assert cache.run_key(CONFIG) == cache.run_key(CONFIG, scale="paper")


def test_the_key_is_the_hash_of_canonical_json(monkeypatch):
    monkeypatch.setattr(cache, "library_hash", lambda: "abc")
    import hashlib

    text = json.dumps(
        {
            "config": CONFIG,
            "library_hash": "abc",
            "scale": "quick",
            "torch": torch.__version__,
        },
        sort_keys=True,
        separators=(",", ":"),
    )

    assert (
        cache.run_key(CONFIG, scale="quick")
        == hashlib.sha256(text.encode()).hexdigest()
    )


@pytest.mark.parametrize(
    ("config", "where"),
    [
        ({"lr": torch.tensor(0.1)}, "config['lr']"),
        ({"lr": math.nan}, "config['lr']"),
        ({"lr": math.inf}, "config['lr']"),
        ({"path": __import__("pathlib").Path("/x")}, "str(path)"),
        ({"nested": {1: "a"}}, "string keys"),
        ({"layers": [1, {2, 3}]}, "config['layers'][1]"),
        ([("lr", 0.1)], "dict of JSON"),
    ],
    ids=["tensor", "nan", "inf", "path", "int-key", "set", "not-a-dict"],
)
def test_non_json_configs_are_refused_naming_the_value(config, where):
    with pytest.raises(ValueError) as error:
        cache.run_key(config, scale="quick")

    assert where in str(error.value)


def test_library_hash_covers_every_module(tmp_path):
    package = tmp_path / "neuronlib"
    shutil.copytree(
        cache.Path(cache.__file__).parent,
        package,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    original = cache.library_hash(package_dir=package)

    assert original == cache.library_hash()
    (package / "probes" / "__init__.py").write_text("# changed\n", encoding="utf-8")
    changed = cache.library_hash(package_dir=package)
    assert changed != original
    (package / "probes" / "new.py").write_text("", encoding="utf-8")
    assert cache.library_hash(package_dir=package) not in (original, changed)


def test_a_library_change_invalidates_entries(root, monkeypatch):
    compute = _Counter()
    monkeypatch.setattr(cache, "library_hash", lambda: "version one")
    cache.cached("run", CONFIG, compute, scale="quick", root=root)
    cache.cached("run", CONFIG, compute, scale="quick", root=root)
    assert compute.calls == 1

    monkeypatch.setattr(cache, "library_hash", lambda: "version two")
    cache.cached("run", CONFIG, compute, scale="quick", root=root)

    assert compute.calls == 2
    assert len(_entries(root)) == 2


# --- cached -------------------------------------------------------------------


def test_cached_computes_once_then_reads(root):
    compute = _Counter({"acc": 0.9, "curve": [1, 2, 3]})

    first = cache.cached("run", CONFIG, compute, scale="quick", root=root)
    second = cache.cached("run", CONFIG, compute, scale="quick", root=root)

    assert compute.calls == 1
    assert first == second == {"acc": 0.9, "curve": [1, 2, 3]}
    key = cache.run_key(CONFIG, scale="quick")
    assert _entries(root) == [f"run-{key[:16]}"]
    meta = json.loads((root / "runs" / f"run-{key[:16]}" / "meta.json").read_text())
    assert meta["config"] == CONFIG and meta["scale"] == "quick" and meta["key"] == key


def test_cached_uses_the_cache_dir_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURONLIB_CACHE", str(tmp_path))

    cache.cached("run", CONFIG, _Counter(), scale="quick")

    assert len(_entries(tmp_path)) == 1


def test_refresh_recomputes_and_replaces(root):
    cache.cached("run", CONFIG, _Counter({"v": 1}), scale="quick", root=root)

    again = cache.cached(
        "run", CONFIG, _Counter({"v": 2}), scale="quick", root=root, refresh=True
    )

    assert again == {"v": 2}
    assert cache.cached("run", CONFIG, _Counter(), scale="quick", root=root) == {"v": 2}
    assert len(_entries(root)) == 1


def test_tensors_arrays_histories_and_json_round_trip(root):
    history = train.History(
        epochs=[{"epoch": 1, "train_loss": 0.5, "wall_time": 1.25}],
        diverged=False,
        diverged_at=None,
    )
    result = {
        "weights": torch.randn(3, 4),
        "signs": torch.tensor([[1, -1], [0, 1]], dtype=torch.int8),
        "mask": torch.tensor([True, False]),
        "half": torch.randn(5, dtype=torch.bfloat16),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "packed": np.arange(10, dtype=np.uint8),
        "history": history,
        "layers": {"fc1": torch.ones(2), "fc2": [np.zeros(3), 4]},
        "numbers": (1, 2.5, None, True, "text", math.nan),
        "count": np.int64(7),
    }

    for read in range(2):  # fresh, then from the entry
        got = cache.cached("run", CONFIG, lambda: result, scale="quick", root=root)

        for key in ("weights", "signs", "mask", "half", "scalar"):
            assert isinstance(got[key], torch.Tensor), (read, key)
            assert got[key].dtype == result[key].dtype, (read, key)
            assert torch.equal(got[key], result[key]), (read, key)
        assert isinstance(got["packed"], np.ndarray)
        np.testing.assert_array_equal(got["packed"], result["packed"])
        assert got["history"] == history
        assert torch.equal(got["layers"]["fc1"], torch.ones(2))
        np.testing.assert_array_equal(got["layers"]["fc2"][0], np.zeros(3))
        assert got["layers"]["fc2"][1] == 4
        assert got["numbers"][:5] == [1, 2.5, None, True, "text"]
        assert math.isnan(got["numbers"][5])
        assert got["count"] == 7 and type(got["count"]) is int


@pytest.mark.parametrize(
    ("result", "error", "match"),
    [
        ([1, 2], TypeError, "dict"),
        ({"obj": object()}, ValueError, "result\\['obj'\\]"),
        ({"arr": np.array([{}, 1], dtype=object)}, ValueError, "pickle"),
        ({"d": {1: 2}}, ValueError, "string keys"),
        ({"__neuronlib__": 1}, ValueError, "string keys"),
    ],
    ids=["list", "object", "object-array", "int-key", "marker-key"],
)
def test_results_that_need_pickle_are_refused_and_nothing_is_written(
    root, result, error, match
):
    with pytest.raises(error, match=match):
        cache.cached("run", CONFIG, lambda: result, scale="quick", root=root)

    assert _entries(root) == []


def test_bad_names_are_refused(root):
    for name in ("", "../escape", "a/b", ".hidden", "x" * 101):
        with pytest.raises(ValueError, match="run name"):
            cache.cached(name, CONFIG, _Counter(), scale="quick", root=root)


# --- atomic writes and interrupts ---------------------------------------------


def test_an_interrupt_inside_compute_leaves_nothing(root):
    def compute():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.cached("run", CONFIG, compute, scale="quick", root=root)

    assert _entries(root) == []


@pytest.mark.parametrize("during", ["arrays", "meta", "rename"])
def test_an_interrupt_while_writing_leaves_no_half_written_entry(
    root, monkeypatch, during
):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if during == "arrays":
        monkeypatch.setattr(cache.np, "savez", interrupt)
    elif during == "meta":
        monkeypatch.setattr(cache.json, "dump", interrupt)
    else:
        monkeypatch.setattr(cache.os, "rename", interrupt)

    with pytest.raises(KeyboardInterrupt):
        cache.cached(
            "run", CONFIG, lambda: {"x": torch.ones(3)}, scale="quick", root=root
        )

    assert _entries(root) == []
    monkeypatch.undo()
    compute = _Counter()
    cache.cached("run", CONFIG, compute, scale="quick", root=root)
    assert compute.calls == 1


def test_an_interrupted_refresh_keeps_the_old_entry(root, monkeypatch):
    cache.cached("run", CONFIG, _Counter({"v": 1}), scale="quick", root=root)
    real_rename = cache.os.rename

    def rename(source, target):
        if str(source).endswith(".tmp"):
            raise KeyboardInterrupt
        real_rename(source, target)

    monkeypatch.setattr(cache.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        cache.cached(
            "run", CONFIG, _Counter({"v": 2}), scale="quick", root=root, refresh=True
        )
    monkeypatch.undo()

    assert len(_entries(root)) == 1
    assert cache.cached("run", CONFIG, _Counter(), scale="quick", root=root) == {"v": 1}


def test_a_concurrent_writer_keeps_its_entry(root):
    def compute():
        # Another process finishes the same run while this one computes.
        cache.cached("run", CONFIG, lambda: {"who": "other"}, scale="quick", root=root)
        return {"who": "me"}

    got = cache.cached("run", CONFIG, compute, scale="quick", root=root)

    assert got == {"who": "other"}
    assert len(_entries(root)) == 1


def test_stale_temporary_folders_are_cleaned_up(root):
    stale = root / "runs" / ".run-0123.abc.tmp"
    stale.mkdir(parents=True)
    (stale / "arrays.npz").write_bytes(b"half")
    old = cache.time.time() - 2 * 3600
    cache.os.utime(stale, (old, old))
    fresh = root / "runs" / ".run-4567.def.tmp"  # maybe a live writer: kept
    fresh.mkdir()

    cache.cached("run", CONFIG, _Counter(), scale="quick", root=root)

    assert not stale.exists() and fresh.exists()


# --- corrupt entries ----------------------------------------------------------


def _corrupt_bad_json(folder):
    (folder / "meta.json").write_text("{not json", encoding="utf-8")


def _corrupt_truncated_npz(folder):
    data = (folder / "arrays.npz").read_bytes()
    (folder / "arrays.npz").write_bytes(data[: len(data) // 2])


def _corrupt_missing_npz(folder):
    (folder / "arrays.npz").unlink()


def _corrupt_missing_meta(folder):
    (folder / "meta.json").unlink()


def _corrupt_wrong_format(folder):
    meta = json.loads((folder / "meta.json").read_text())
    meta["format"] = 999
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "corrupt",
    [
        _corrupt_bad_json,
        _corrupt_truncated_npz,
        _corrupt_missing_npz,
        _corrupt_missing_meta,
        _corrupt_wrong_format,
    ],
    ids=["bad-json", "truncated-npz", "missing-npz", "missing-meta", "old-format"],
)
def test_a_corrupt_entry_is_reported_and_recomputed(root, caplog, corrupt):
    result = {"w": torch.arange(1000.0)}
    cache.cached("run", CONFIG, lambda: result, scale="quick", root=root)
    folder = root / "runs" / _entries(root)[0]
    corrupt(folder)
    compute = _Counter(result)

    with caplog.at_level(logging.WARNING, logger="neuronlib.cache"):
        got = cache.cached("run", CONFIG, compute, scale="quick", root=root)

    assert compute.calls == 1
    assert torch.equal(got["w"], result["w"])
    assert str(folder) in caplog.text
    assert _entries(root) == [folder.name]
