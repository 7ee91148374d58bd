"""Models outside the registry, built by name: any torchvision classifier or 'package.module:function'.

The module is built, adapted to the input (``input_adapt``) and traced into stages (``fx_split``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable

from torch import nn

from coderay.models.fx_split import trace_model
from coderay.models.input_adapt import _is_small, adapt_input
from coderay.models.staged import StagedModel


def list_torchvision_models() -> list[str]:
    """Every torchvision classification model name (``torchvision.models.list_models(module=torchvision.models)``)."""
    import torchvision  # here, not at import: a replica serving a staged model never needs it (1.4 s of CPU)

    return sorted(torchvision.models.list_models(module=torchvision.models))


@functools.cache
def _torchvision_names() -> frozenset[str]:
    return frozenset(list_torchvision_models())


def _is_import_path(name: str) -> bool:
    module, sep, fn = name.partition(":")
    return bool(sep) and all(p.isidentifier() for p in module.split(".")) and fn.isidentifier()


def _import_builder(name: str) -> Callable[..., nn.Module]:
    module_name, _, fn_name = name.partition(":")
    try:
        mod = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model {name!r}: cannot import module {module_name!r} ({err}); is it on sys.path?") from err
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"model {name!r}: module {module_name!r} has no callable {fn_name!r}")
    return fn


def _build_module(
    fn: Callable[..., nn.Module], name: str, num_classes: int, kwargs: dict, input_shape: tuple[int, int, int]
) -> nn.Module:
    """Call a builder with ``num_classes`` where it takes one; TypeError naming the model on bad options,
    ValueError when it refuses them (e.g. ViT: an image size that is not a multiple of the patch size)."""
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    call = dict(kwargs)
    if "num_classes" in params or takes_any:
        call["num_classes"] = num_classes
    try:
        module = fn(**call)
    except TypeError as err:
        raise TypeError(f"{name}: builder rejected options {sorted(kwargs)}: {err}") from err
    except (AssertionError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"{name} cannot take input_shape {input_shape} with options {call}: the builder "
            f"refused ({type(err).__name__}: {err}). Try another input size or options."
        ) from err
    if not isinstance(module, nn.Module):
        raise TypeError(f"{name}: the builder must return an nn.Module, got {type(module).__name__}")
    return module


def _torchvision_kwargs(name: str, input_shape: tuple[int, int, int], kwargs: dict) -> dict:
    """Builder defaults that make a torchvision family take ``input_shape`` (only where the user set none)."""
    kwargs = dict(kwargs)
    if name.startswith("vit_") and input_shape[1] == input_shape[2]:
        kwargs.setdefault("image_size", input_shape[1])  # ViT checks the image size it was built for
    if name.startswith("maxvit_"):
        kwargs.setdefault("input_size", tuple(input_shape[1:]))
    if name in ("googlenet", "inception_v3"):
        kwargs.setdefault("aux_logits", False)  # training-only heads; the traced eval graph never runs them
        kwargs.setdefault("init_weights", True)
    return kwargs


def _traced_model(name: str, *, num_classes: int, input_shape: tuple[int, int, int], kwargs: dict) -> StagedModel:
    small_input = kwargs.pop("small_input", None)
    if small_input is not None and not isinstance(small_input, bool):
        raise TypeError(f"{name}: small_input must be true, false or null (auto), got {small_input!r}")
    if name in _torchvision_names():
        import torchvision

        fn = torchvision.models.get_model_builder(name)
        module = _build_module(fn, name, num_classes, _torchvision_kwargs(name, input_shape, kwargs), input_shape)
        small = _is_small(input_shape, small_input)
    else:
        module = _build_module(_import_builder(name), name, num_classes, kwargs, input_shape)
        small = bool(small_input)  # a user's own model is adapted for small inputs only on request
    adapt_input(module, input_shape, small=small, arch=name)
    return trace_model(module, arch=name, input_shape=input_shape, num_classes=num_classes)
