"""The model registry: register hand-staged builders, list them, and get any known model by name.

Names resolve in order: a registered builder, a torchvision classifier, a 'package.module:function' (the last
two through ``by_name``); ``weights`` then come from disk (``weights``).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import TypeVar

from coderay.models.by_name import _is_import_path, _torchvision_names, _traced_model
from coderay.models.staged import StagedModel, _check_input_shape
from coderay.models.weights import _resolve_weights, load_weights

Builder = TypeVar("Builder", bound=Callable[..., "StagedModel"])

_REGISTRY: dict[str, Callable[..., StagedModel]] = {}
_NAME_HINT = "`coderay blocks --list` lists the torchvision names; a user model is given as 'package.module:function'"


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator adding a keyword-only builder ``fn(*, num_classes, input_shape, **options)`` to the registry."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered; pick another name (taken: {list_models()})")

    def wrap(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered; pick another name (taken: {list_models()})")
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    """The registered (hand-staged) architectures, sorted; torchvision classification names
    (``list_torchvision_models()``) and 'package.module:function' also build (``is_known_model``)."""
    return sorted(_REGISTRY)


def get_model(
    name: str,
    *,
    num_classes: int,
    input_shape: tuple[int, int, int] = (1, 28, 28),
    weights: str | os.PathLike[str] | None = None,
    **kwargs: object,
) -> StagedModel:
    """Build a registered architecture; ``weights`` is a torchvision or coderay state_dict file on disk.

    Pretrained weights cannot be downloaded here: save them (``torch.save(model.state_dict(), path)``)
    and pass the path. Tensors whose shapes do not match (an adapted stem, a classifier for other
    classes) keep their fresh initialisation and are logged.
    """
    if not is_known_model(name):
        raise ValueError(
            f"unknown model {name!r}; choose one of {sorted(_REGISTRY)}, a torchvision classification model "
            f"(e.g. 'vgg11', 'efficientnet_b0'), or 'package.module:function' returning an nn.Module. {_NAME_HINT}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    weights = _resolve_weights(name, weights)
    if name not in _REGISTRY:
        model = _traced_model(
            name, num_classes=num_classes, input_shape=_check_input_shape(input_shape), kwargs=dict(kwargs)
        )
        if weights is not None:
            load_weights(model, weights)
        return model
    builder = _REGISTRY[name]
    options = [p for p in inspect.signature(builder).parameters if p not in ("num_classes", "input_shape")]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise TypeError(f"{name} got unknown option(s) {unknown}; it accepts {options}")
    model = builder(num_classes=num_classes, input_shape=_check_input_shape(input_shape), **kwargs)
    if weights is not None:
        load_weights(model, weights)
    return model


def is_known_model(name: object) -> bool:
    """True for a registered name, a torchvision classification name, or a 'package.module:function' string.

    The function itself is imported only when the model is built (``get_model``), so a config naming a user
    model validates without importing it.
    """
    if not isinstance(name, str):
        return False
    return name in _REGISTRY or name in _torchvision_names() or _is_import_path(name)
