"""Loading weights from disk: torchvision or coderay state_dicts, fitted where tensor shapes allow.

coderay never downloads; a torchvision weights name is looked up in torch's hub cache only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from coderay.models.by_name import _torchvision_names
from coderay.models.staged import StagedModel

logger = logging.getLogger(__package__)  # "coderay.models", the name log lines carried before the split


def _resolve_weights(name: str, weights: str | os.PathLike[str] | None) -> str | os.PathLike[str] | None:
    """A torchvision weights name ('IMAGENET1K_V1', 'DEFAULT') becomes its file in torch's hub cache when that
    file is on disk, else None (logged: coderay never downloads); anything else is a path, kept as given."""
    if not isinstance(weights, str) or Path(weights).expanduser().is_file() or name not in _torchvision_names():
        return weights
    try:
        import torchvision

        enum = torchvision.models.get_model_weights(name)
        entry = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    except (KeyError, ValueError):
        return weights  # not a weights name: load_weights reports the missing file
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(entry.url).name
    if path.is_file():
        logger.info("%s: using torchvision weights %s from %s", name, entry, path)
        return path
    logger.warning(
        "%s: torchvision weights %s are not on disk (%s) and coderay never downloads: starting from "
        "a fresh init. Put the file there to use them.",
        name,
        entry,
        path,
    )
    return None


def load_weights(model: StagedModel, path: str | os.PathLike[str]) -> None:
    """Load a torchvision or coderay state_dict (told apart by its keys) where tensor shapes match."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {str(path)!r} not found. coderay cannot download pretrained weights: "
            "save a torchvision or coderay state_dict there first (torch.save(model.state_dict(), path))"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    own = model.state_dict()
    staged_hits = len(own.keys() & state.keys())
    source_hits = len(model.source_keys.keys() & state.keys())
    if staged_hits == 0 and source_hits == 0:
        raise ValueError(
            f"no tensor name in {path} matches {model.arch} (staged names look like {next(iter(own))!r}); "
            "is it a state_dict of another architecture?"
        )
    kind, rename = ("coderay", {}) if staged_hits >= source_hits else ("torchvision", model.source_keys)
    loaded: dict[str, torch.Tensor] = {}
    skipped, adapted = [], []
    for key, tensor in state.items():
        target = rename.get(key, key)
        if target not in own:
            skipped.append(f"{key} (not in model)")
            continue
        fitted = tensor if tensor.shape == own[target].shape else _adapt_in_channels(tensor, own[target].shape)
        if fitted is None:
            skipped.append(f"{key} {tuple(tensor.shape)} -> {tuple(own[target].shape)}")
            continue
        loaded[target] = fitted
        if fitted is not tensor:
            adapted.append(key)
    model.load_state_dict(loaded, strict=False)
    missing = sorted(own.keys() - loaded.keys())
    logger.info("%s: loaded %d/%d tensors from %s state_dict %s", model.arch, len(loaded), len(own), kind, path)
    if adapted:
        logger.info("%s: summed/repeated input channels of %s", model.arch, adapted)
    if skipped or missing:
        logger.warning("%s: kept fresh init for %s; skipped from file: %s", model.arch, missing, skipped)


def _adapt_in_channels(weight: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """Fit a first conv's weight to another number of input channels (timm's trick), else None."""
    if weight.dim() != 4 or len(shape) != 4 or weight.shape[0] != shape[0] or weight.shape[2:] != shape[2:]:
        return None
    src, dst = weight.shape[1], shape[1]
    if dst == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-dst // src)
    return weight.repeat(1, repeats, 1, 1)[:, :dst] * (src / dst)
