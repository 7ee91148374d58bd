"""Architectures as *staged* models: hand-staged builders, any torchvision classifier, any user model.

A staged model is an ``nn.Sequential`` of named stages whose forward is exactly the composition of its
stages, so a stage name is a valid cut point and blocks (``coderay.blocks``) are slices of it. Three sources:

* Registered builders (``register_model``): ``small_cnn`` and the hand-staged ``alexnet``, ``mobilenet_v2``,
  ``resnet18``, re-wrapped from the very module objects of a torchvision model, so the staged forward
  reproduces torchvision's bit for bit (eval mode); their default cuts per N are kept.
* Any torchvision classification model by name (``list_torchvision_models()``), and any
  ``'package.module:function'`` returning an ``nn.Module``: traced with torch.fx (``trace_model``) into stages
  that end at every graph node where exactly one tensor crosses (residual-safe); N blocks are balanced by MACs.

Small inputs (``adapt_input``, before tracing):

* channels, any model: the first convolution takes the input's C channels (pretrained kernels are summed or
  repeated into it by ``load_weights``);
* resolution, torchvision models when min(H, W) < 64 (``small_input`` overrides; user models only with
  ``small_input=True``): the earliest strided convolutions and pooling layers on the main chain (no parallel
  branch beside them) lose their stride, convolutions keeping their kernels and pools becoming Identity,
  until the remaining downsampling is at most 8x (28/32 px end as a 4x4 map); strides inside residual or
  Inception blocks and a first patch-embedding conv (kernel = stride) are kept. ViT is built for the image
  size (a multiple of its patch size). The hand-staged models keep their own per-family stems.

``list_models()`` lists the registered names; ``is_known_model(name)`` accepts every name ``get_model`` builds
(the config checks names with it).
"""
from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
import operator
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import torch
import torch.fx
import torchvision
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "StagedModel",
    "register_model",
    "list_models",
    "list_torchvision_models",
    "is_known_model",
    "get_model",
    "trace_model",
    "adapt_input",
    "load_weights",
]

logger = logging.getLogger(__name__)

Builder = TypeVar("Builder", bound=Callable[..., "StagedModel"])

_REGISTRY: dict[str, Callable[..., StagedModel]] = {}


class StagedModel(nn.Sequential):
    """A model whose forward is exactly the composition of its named stages; stage names are the valid cut points.

    Built once with a dry run on ``input_shape`` (eval mode, batch of 1), which checks that the input
    size works and records what links are later sized from: each stage's output shape and MACs.
    """

    arch: str
    input_shape: tuple[int, int, int]  # (C, H, W) of one sample
    num_classes: int
    default_cuts: dict[int, tuple[str, ...]]  # N -> stages after which blocks 1..N-1 end
    stage_shapes: dict[str, tuple[int, ...]]  # stage -> output shape of one sample, e.g. (C, H, W) or (F,)
    stage_macs: dict[str, int]  # stage -> multiply-accumulates for one sample (conv/linear/matmul only)
    source_keys: dict[str, str]  # torchvision state_dict key -> staged key ({} when not torchvision-derived)
    blocked_cuts: dict[str, tuple[str, ...]]  # traced models: graph node -> the values crossing there (not a cut)

    def __init__(
        self,
        stages: Mapping[str, nn.Module],
        *,
        arch: str,
        input_shape: tuple[int, int, int],
        num_classes: int,
        default_cuts: Mapping[int, Sequence[str]] | None = None,
        source: nn.Module | None = None,
    ) -> None:
        super().__init__(OrderedDict(stages))
        self.arch = arch
        self.input_shape = _check_input_shape(input_shape)
        self.num_classes = num_classes
        self.default_cuts = {}
        self.blocked_cuts = {}
        for n, cuts in (default_cuts or {}).items():
            self.cut_indices(cuts)  # validate at build time, not at first split
            self.default_cuts[n] = tuple(cuts)
        self.source_keys = _source_keys(source, self, arch) if source is not None else {}
        self._trace()

    @property
    def stage_names(self) -> list[str]:
        return list(self._modules)

    def cut_indices(self, cuts: Sequence[str]) -> list[int]:
        """Positions of the stages after which blocks end; errors name the valid cut points."""
        names = self.stage_names
        valid = names[:-1]  # cutting after the last stage would leave an empty block
        indices = []
        for cut in cuts:
            if isinstance(cut, str) and cut not in names and cut.replace(".", "_") in names:
                cut = cut.replace(".", "_")  # torchvision's qualified name (get_graph_node_names) of an fx node
            if cut not in valid:
                if cut == names[-1]:
                    why = "is the last stage"
                elif cut in self.blocked_cuts or cut.replace(".", "_") in self.blocked_cuts:
                    crossing = self.blocked_cuts.get(cut) or self.blocked_cuts[cut.replace(".", "_")]
                    why = (f"is not a valid cut: {len(crossing)} values cross it ({', '.join(crossing[:6])}"
                           f"{', ...' if len(crossing) > 6 else ''}; a residual or a branch) where a cut "
                           "passes exactly one tensor")
                else:
                    why = "is not a stage"
                shown = valid if len(valid) <= 60 else [*valid[:30], "...", *valid[-10:]]
                raise ValueError(
                    f"cut {cut!r} of {self.arch} {why}; valid cut points are {shown} "
                    f"(run `coderay blocks {self.arch} --cuts` to list them all, with shapes and costs)"
                )
            indices.append(names.index(cut))
        if indices != sorted(set(indices)):
            raise ValueError(f"cuts {list(cuts)} must be distinct and in model order: {valid}")
        return indices

    def _trace(self) -> None:
        """Dry run one sample through each stage: checks the input size, records shapes and MACs."""
        was_training = [m.training for m in self.modules()]
        self.eval()
        x = torch.zeros(1, *self.input_shape)
        self.stage_shapes, self.stage_macs = {}, {}
        try:
            with torch.no_grad():
                for name, stage in self.named_children():
                    with FlopCounterMode(display=False) as counter:
                        x = stage(x)
                    self.stage_shapes[name] = tuple(x.shape[1:])
                    self.stage_macs[name] = counter.get_total_flops() // 2
        except RuntimeError as err:
            raise ValueError(
                f"{self.arch} cannot take input_shape {self.input_shape}: {err}. "
                "Use a larger input (or small_input=True where the architecture offers it)."
            ) from err
        finally:
            for m, mode in zip(self.modules(), was_training):
                m.training = mode


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
        model = _traced_model(name, num_classes=num_classes, input_shape=_check_input_shape(input_shape),
                              kwargs=dict(kwargs))
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


def _resolve_weights(name: str, weights: str | os.PathLike[str] | None) -> str | os.PathLike[str] | None:
    """A torchvision weights name ('IMAGENET1K_V1', 'DEFAULT') becomes its file in torch's hub cache when that
    file is on disk, else None (logged: coderay never downloads); anything else is a path, kept as given."""
    if not isinstance(weights, str) or Path(weights).expanduser().is_file() or name not in _torchvision_names():
        return weights
    try:
        enum = torchvision.models.get_model_weights(name)
        entry = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    except (KeyError, ValueError):
        return weights  # not a weights name: load_weights reports the missing file
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(entry.url).name
    if path.is_file():
        logger.info("%s: using torchvision weights %s from %s", name, entry, path)
        return path
    logger.warning("%s: torchvision weights %s are not on disk (%s) and coderay never downloads: starting from "
                   "a fresh init. Put the file there to use them.", name, entry, path)
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


# --- helpers -------------------------------------------------------------------------------------------


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(f"input_shape must be (C, H, W) of positive ints, e.g. (1, 28, 28); got {input_shape!r}")
    return shape  # type: ignore[return-value]


def _source_keys(source: nn.Module, staged: StagedModel, arch: str) -> dict[str, str]:
    """Map the source model's state_dict keys to the staged ones by tensor identity (same objects).

    A hand-wrapped model must reuse every source tensor; a traced one may leave out tensors its eval
    graph never reads (e.g. auxiliary heads), which are logged.
    """
    by_id: dict[int, str] = {}
    for k, t in staged.state_dict(keep_vars=True).items():
        by_id.setdefault(id(t), k)  # a tensor read by two traced stages: its first stage owns the key
    mapping = {k: by_id.get(id(t)) for k, t in source.state_dict(keep_vars=True).items()}
    lost = [k for k, v in mapping.items() if v is None]
    if lost and not any(isinstance(m, torch.fx.GraphModule) for m in staged.children()):
        raise RuntimeError(f"staged model does not reuse source tensors {lost}: the re-wrap is incomplete")
    if lost:
        logger.info("%s: %d tensors unused by the traced (eval) graph: %s", arch, len(lost), lost[:8])
    return {k: v for k, v in mapping.items() if v is not None}


def _adapt_in_channels(weight: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """Fit a first conv's weight to another number of input channels (timm's trick), else None."""
    if weight.dim() != 4 or len(shape) != 4 or weight.shape[0] != shape[0] or weight.shape[2:] != shape[2:]:
        return None
    src, dst = weight.shape[1], shape[1]
    if dst == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-dst // src)
    return weight.repeat(1, repeats, 1, 1)[:, :dst] * (src / dst)


def _is_small(input_shape: tuple[int, int, int], small_input: bool | None) -> bool:
    """Small inputs (MNIST/CIFAR sized) get a stem that does not downsample them away."""
    return min(input_shape[1:]) < 64 if small_input is None else bool(small_input)


def _all_cuts(names: Sequence[str]) -> tuple[str, ...]:
    return tuple(names[:-1])


def _flatten_pool(pool: nn.Module) -> nn.Sequential:
    return nn.Sequential(pool, nn.Flatten(1))


# --- architectures -------------------------------------------------------------------------------------


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


@register_model("small_cnn")
def small_cnn(
    *, num_classes: int, input_shape: tuple[int, int, int], widths: Sequence[int] = (32, 64, 128, 128)
) -> StagedModel:
    """Four conv stages and a head: cheap enough to train on 2 cores, deep enough to cut in five."""
    widths = tuple(widths)
    if len(widths) != 4 or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ValueError(f"widths must be 4 positive ints, e.g. (32, 64, 128, 128); got {widths!r}")
    c0, (c1, c2, c3, c4) = input_shape[0], widths
    stages = {
        "conv1": nn.Sequential(*_conv_bn_relu(c0, c1)),  # (c1, H, W)
        "conv2": nn.Sequential(*_conv_bn_relu(c1, c2), nn.MaxPool2d(2)),  # (c2, H/2, W/2)
        "conv3": nn.Sequential(*_conv_bn_relu(c2, c3), nn.MaxPool2d(2)),  # (c3, H/4, W/4)
        "conv4": nn.Sequential(*_conv_bn_relu(c3, c4)),  # (c4, H/4, W/4)
        "head": nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(c4, num_classes)),
    }
    cuts = {
        2: ("conv3",),
        3: ("conv2", "conv3"),
        4: ("conv1", "conv2", "conv3"),
        5: _all_cuts(list(stages)),
    }
    return StagedModel(stages, arch="small_cnn", input_shape=input_shape, num_classes=num_classes, default_cuts=cuts)


def _alexnet_pair(
    *, num_classes: int, input_shape: tuple[int, int, int], hidden: int = 4096, small_input: bool | None = None
) -> tuple[nn.Module, StagedModel]:
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"hidden must be a positive int (4096 in the original), got {hidden!r}")
    tv = torchvision.models.alexnet(num_classes=num_classes)
    if _is_small(input_shape, small_input):
        # 11x11 stride 4 would shrink 28 px to 6 px before the first pool; keep the resolution instead.
        tv.features[0] = nn.Conv2d(input_shape[0], 64, kernel_size=5, stride=1, padding=2)
    elif input_shape[0] != 3:
        tv.features[0] = nn.Conv2d(input_shape[0], 64, kernel_size=11, stride=4, padding=2)
    if hidden != 4096:
        tv.classifier[1] = nn.Linear(256 * 6 * 6, hidden)
        tv.classifier[4] = nn.Linear(hidden, hidden)
        tv.classifier[6] = nn.Linear(hidden, num_classes)
    f, c = tv.features, tv.classifier
    stages = {
        "conv1": f[0:3],  # conv, relu, maxpool
        "conv2": f[3:6],  # conv, relu, maxpool
        "conv3": f[6:8],
        "conv4": f[8:10],
        "conv5": f[10:13],  # conv, relu, maxpool
        "pool": _flatten_pool(tv.avgpool),  # (9216,)
        "fc6": c[0:3],  # dropout, linear, relu
        "fc7": c[3:6],
        "fc8": c[6:7],
    }
    cuts = {
        2: ("pool",),  # features | classifier
        3: ("conv2", "pool"),
        4: ("conv1", "conv2", "pool"),
        # The paper's N = 6: one block per conv layer, pooling kept with conv5, the classifier as one block
        # (its three FC layers are ~90% of the parameters but few MACs, and a cut inside it is rarely useful).
        6: ("conv1", "conv2", "conv3", "conv4", "pool"),
        9: _all_cuts(list(stages)),
    }
    staged = StagedModel(
        stages, arch="alexnet", input_shape=input_shape, num_classes=num_classes, default_cuts=cuts, source=tv
    )
    return tv, staged


@register_model("alexnet")
def alexnet(
    *, num_classes: int, input_shape: tuple[int, int, int], hidden: int = 4096, small_input: bool | None = None
) -> StagedModel:
    """torchvision AlexNet in 9 stages (the paper's model); ``hidden`` shrinks fc6/fc7 for demos."""
    return _alexnet_pair(num_classes=num_classes, input_shape=input_shape, hidden=hidden, small_input=small_input)[1]


def _mobilenet_v2_pair(
    *,
    num_classes: int,
    input_shape: tuple[int, int, int],
    width_mult: float = 1.0,
    small_input: bool | None = None,
) -> tuple[nn.Module, StagedModel]:
    if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or width_mult <= 0:
        raise ValueError(f"width_mult must be a positive number, e.g. 1.0 or 0.5; got {width_mult!r}")
    tv = torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=float(width_mult))
    small = _is_small(input_shape, small_input)
    stem = tv.features[0][0]
    if small or input_shape[0] != 3:
        # CIFAR-style: stride 1 in the stem (and in f2 below) so 28/32 px keep a 4x4 map at the end.
        tv.features[0][0] = nn.Conv2d(
            input_shape[0], stem.out_channels, 3, stride=1 if small else 2, padding=1, bias=False
        )
        nn.init.kaiming_normal_(tv.features[0][0].weight, mode="fan_out")
    if small:
        block = tv.features[2]  # first InvertedResidual with stride 2; its depthwise conv holds the stride
        block.conv[1][0].stride = (1, 1)
        block.stride = 1  # 16 -> 24 channels: no residual either way, so the forward is unchanged otherwise
    stages: dict[str, nn.Module] = {f"f{i}": m for i, m in enumerate(tv.features)}
    stages["pool"] = _flatten_pool(nn.AdaptiveAvgPool2d(1))  # torchvision does this functionally
    stages["classifier"] = tv.classifier  # dropout, linear
    # Cut where the resolution changes (after f1, f3, f6, f13, f17); the last block is f18 + pool + classifier.
    cuts = {
        2: ("f13",),
        3: ("f6", "f13"),
        4: ("f6", "f13", "f17"),
        5: ("f3", "f6", "f13", "f17"),
        6: ("f1", "f3", "f6", "f13", "f17"),
        7: ("f1", "f3", "f6", "f13", "f17", "f18"),
        len(stages): _all_cuts(list(stages)),
    }
    staged = StagedModel(
        stages, arch="mobilenet_v2", input_shape=input_shape, num_classes=num_classes, default_cuts=cuts, source=tv
    )
    return tv, staged


@register_model("mobilenet_v2")
def mobilenet_v2(
    *,
    num_classes: int,
    input_shape: tuple[int, int, int],
    width_mult: float = 1.0,
    small_input: bool | None = None,
) -> StagedModel:
    """torchvision MobileNetV2 with stages ``f0``..``f18`` (= ``features[i]``), ``pool``, ``classifier``."""
    return _mobilenet_v2_pair(
        num_classes=num_classes, input_shape=input_shape, width_mult=width_mult, small_input=small_input
    )[1]


def _resnet18_pair(
    *, num_classes: int, input_shape: tuple[int, int, int], small_input: bool | None = None
) -> tuple[nn.Module, StagedModel]:
    tv = torchvision.models.resnet18(num_classes=num_classes)
    small = _is_small(input_shape, small_input)
    if small or input_shape[0] != 3:
        tv.conv1 = (
            nn.Conv2d(input_shape[0], 64, 3, stride=1, padding=1, bias=False)  # CIFAR-style stem
            if small
            else nn.Conv2d(input_shape[0], 64, 7, stride=2, padding=3, bias=False)
        )
        nn.init.kaiming_normal_(tv.conv1.weight, mode="fan_out", nonlinearity="relu")
    if small:
        tv.maxpool = nn.Identity()
    stages = {
        "stem": nn.Sequential(tv.conv1, tv.bn1, tv.relu, tv.maxpool),
        "layer1": tv.layer1,
        "layer2": tv.layer2,
        "layer3": tv.layer3,
        "layer4": tv.layer4,
        "pool": _flatten_pool(tv.avgpool),
        "fc": tv.fc,
    }
    cuts = {
        2: ("layer3",),
        3: ("layer2", "layer3"),
        4: ("layer1", "layer2", "layer3"),
        5: ("layer1", "layer2", "layer3", "layer4"),
        6: ("stem", "layer1", "layer2", "layer3", "layer4"),
        7: _all_cuts(list(stages)),
    }
    staged = StagedModel(
        stages, arch="resnet18", input_shape=input_shape, num_classes=num_classes, default_cuts=cuts, source=tv
    )
    return tv, staged


@register_model("resnet18")
def resnet18(*, num_classes: int, input_shape: tuple[int, int, int], small_input: bool | None = None) -> StagedModel:
    """torchvision ResNet-18 in 7 stages: ``stem``, ``layer1``..``layer4``, ``pool``, ``fc``."""
    return _resnet18_pair(num_classes=num_classes, input_shape=input_shape, small_input=small_input)[1]


# --- any torchvision or user model, cut with torch.fx ----------------------------------------------------

_MAX_SMALL_DOWNSAMPLING = 8  # small inputs keep a 4x4 map at the end (28/32 px): the CIFAR convention
_NAME_HINT = "`coderay blocks --list` lists the torchvision names; a user model is given as 'package.module:function'"


class _Tracer(torch.fx.Tracer):
    """torch.fx tracer that wraps math and torchvision.ops functions (as torchvision's feature extraction
    does), so e.g. ``stochastic_depth`` is one node. Modules are traced through down to torch.nn layers,
    so a cut can fall inside torchvision's composite blocks (``Conv2dNormActivation``, ...)."""

    def __init__(self) -> None:
        super().__init__(autowrap_modules=(math, torchvision.ops))


def _symbolic_trace(module: nn.Module, arch: str) -> torch.fx.Graph:
    """The eval-mode graph of ``module``; TypeError naming the model when it does not trace."""
    module.eval()
    try:
        return _Tracer().trace(module)
    except Exception as err:  # noqa: BLE001 — fx raises many kinds (TraceError, TypeError, ...) on dynamic code
        raise TypeError(
            f"{arch} does not trace with torch.fx ({type(err).__name__}: {err}); coderay can only split models "
            "whose forward has no data-dependent control flow. Register a StagedModel builder for it instead "
            "(coderay.models.register_model)."
        ) from err


def _live_after(nodes: Sequence[torch.fx.Node]) -> list[frozenset[torch.fx.Node]]:
    """For each position i, the values computed at or before i that a node after i still uses.

    ``get_attr`` nodes (parameters, buffers, constants) are not values that cross: every block re-reads them.
    """
    pos = {n: i for i, n in enumerate(nodes)}
    dies: dict[int, list[torch.fx.Node]] = {}
    for n in nodes:
        if n.op in ("get_attr", "output"):
            continue
        last = max((pos.get(u, len(nodes)) for u in n.users), default=pos[n])  # the output: past the end
        dies.setdefault(last, []).append(n)
    live: set[torch.fx.Node] = set()
    out = []
    for i, n in enumerate(nodes):
        if n.op not in ("get_attr", "output"):
            live.add(n)
        live.difference_update(dies.get(i, ()))
        out.append(frozenset(live))
    return out


def _stage_module(root: nn.Module, nodes: Sequence[torch.fx.Node], start: torch.fx.Node | None,
                  end: torch.fx.Node, name: str) -> torch.fx.GraphModule:
    """A GraphModule computing ``end`` from ``start`` (or from the model input) with the given nodes.

    Its submodules and parameters are the very objects of ``root`` (shared, not copied).
    """
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    if start is not None:
        env[start] = graph.placeholder(start.name)
    needed_attrs = set()
    for n in nodes:
        for arg in n.all_input_nodes:
            if arg.op == "get_attr" and arg not in env:
                needed_attrs.add(arg)
    for attr in sorted(needed_attrs, key=lambda a: a.name):
        env[attr] = graph.node_copy(attr, lambda a: env[a])
    for n in nodes:
        if n.op != "get_attr":  # attributes were read above, only where this stage uses them
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[end])
    graph.lint()
    gm = torch.fx.GraphModule(root, graph, class_name=f"Stage_{name}")
    return gm


def _no_inplace(module: nn.Module, graph: torch.fx.Graph) -> None:
    """Make every in-place op out-of-place (same values): a block must never overwrite its input, which
    the search caches and feeds to several blocks."""
    for m in module.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
    swaps = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
             operator.itruediv: operator.truediv}
    for n in graph.nodes:
        if n.op == "call_function" and n.target in swaps:
            n.target = swaps[n.target]
        if n.kwargs.get("inplace") is True:
            n.kwargs = {**n.kwargs, "inplace": False}
        if n.op == "call_method" and isinstance(n.target, str) and n.target.endswith("_") \
                and not n.target.startswith("_") and hasattr(torch.Tensor, n.target[:-1]):
            n.target = n.target[:-1]  # x.relu_() -> x.relu()


def trace_model(
    module: nn.Module,
    *,
    arch: str,
    input_shape: tuple[int, int, int],
    num_classes: int | None = None,
) -> StagedModel:
    """Wrap any traceable classifier as a :class:`StagedModel` whose stages end at every valid cut point.

    A valid cut point is a graph node (torch.fx name, e.g. ``layer2_1_relu_1``) where exactly one tensor
    crosses: no other value computed before it is used after it, so residual branches and concatenations
    are never cut. The stages share ``module``'s parameters; their composition is ``module``'s forward
    (eval mode; Python-level ``self.training`` branches such as auxiliary heads are fixed at eval).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"{arch}: expected an nn.Module, got {type(module).__name__}")
    input_shape = _check_input_shape(input_shape)
    graph = _symbolic_trace(module, arch)
    _no_inplace(module, graph)
    gm = torch.fx.GraphModule(module, graph)
    x = torch.zeros(1, *input_shape)  # (1, C, H, W)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(x)
    except Exception as err:  # noqa: BLE001 — any failure here means this input does not fit
        raise ValueError(
            f"{arch} cannot take input_shape {input_shape}: {type(err).__name__}: {err}. "
            "Use a larger input (or small_input=True where the architecture offers it)."
        ) from err
    nodes = [n for n in graph.nodes if n.op != "output"]
    out_node = next(n for n in graph.nodes if n.op == "output").args[0]
    if not isinstance(out_node, torch.fx.Node) or not isinstance(out_node.meta.get("tensor_meta"), TensorMetadata):
        raise TypeError(f"{arch}: the forward must return one tensor (logits); it returns {out_node!r}")
    if num_classes is not None and tuple(out_node.meta["tensor_meta"].shape[1:]) != (num_classes,):
        raise ValueError(f"{arch}: output shape {tuple(out_node.meta['tensor_meta'].shape[1:])} is not "
                         f"(num_classes,) = ({num_classes},)")
    live = _live_after(nodes)
    cuts, blocked = [], {}
    for i, n in enumerate(nodes):
        if n.op in ("placeholder", "get_attr") or n is out_node:
            continue
        if live[i] == {n} and isinstance(n.meta.get("tensor_meta"), TensorMetadata):
            cuts.append(i)
        else:
            blocked[n.name] = tuple(sorted(v.name for v in live[i]))
    last = nodes.index(out_node)
    stages: dict[str, nn.Module] = {}
    start, first = None, 0
    for end in [c for c in cuts if c < last] + [last]:
        stage_nodes = nodes[first:end + 1]  # the first stage starts with the model's placeholder
        stages[nodes[end].name] = _stage_module(module, stage_nodes, start, nodes[end], nodes[end].name)
        start, first = nodes[end], end + 1
    trailing = [n.name for n in nodes[last + 1:] if n.op not in ("get_attr",)]
    if trailing:
        logger.info("%s: nodes after the output are dropped: %s", arch, trailing)
    if num_classes is None:
        num_classes = int(out_node.meta["tensor_meta"].shape[-1])
    staged = StagedModel(stages, arch=arch, input_shape=input_shape, num_classes=num_classes, source=module)
    staged.blocked_cuts = blocked
    return staged


def list_torchvision_models() -> list[str]:
    """Every torchvision classification model name (``torchvision.models.list_models(module=torchvision.models)``)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def is_known_model(name: object) -> bool:
    """True for a registered name, a torchvision classification name, or a 'package.module:function' string.

    The function itself is imported only when the model is built (``get_model``), so a config naming a user
    model validates without importing it.
    """
    if not isinstance(name, str):
        return False
    return name in _REGISTRY or name in _torchvision_names() or _is_import_path(name)


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


def _build_module(fn: Callable[..., nn.Module], name: str, num_classes: int, kwargs: dict,
                  input_shape: tuple[int, int, int]) -> nn.Module:
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
        raise ValueError(f"{name} cannot take input_shape {input_shape} with options {call}: the builder "
                         f"refused ({type(err).__name__}: {err}). Try another input size or options.") from err
    if not isinstance(module, nn.Module):
        raise TypeError(f"{name}: the builder must return an nn.Module, got {type(module).__name__}")
    return module


def _set_submodule(root: nn.Module, target: str, new: nn.Module) -> None:
    parent, _, child = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def adapt_input(module: nn.Module, input_shape: tuple[int, int, int], *, small: bool, arch: str = "model") -> list[str]:
    """Adapt a classifier to ``input_shape`` in place; returns what changed (also logged).

    * Channels: the first convolution takes ``C`` input channels (a fresh conv of the same geometry;
      ``load_weights`` sums or repeats pretrained kernels into it).
    * Small inputs (``small``): the earliest downsampling layers on the model's main chain (strided
      convolutions and pooling layers that no other branch runs beside) lose their stride, convolutions
      keeping their kernels and pretrained weights, pools becoming ``Identity``, until the remaining
      downsampling is at most 8x (28 or 32 px end as a 4x4 map). A first patch-embedding convolution
      (kernel = stride, as in ViT, Swin, ConvNeXt) keeps its stride: its tokens are the model's unit.
    """
    graph = _symbolic_trace(module, arch)
    nodes = [n for n in graph.nodes if n.op != "output"]
    convs = [n for n in nodes if n.op == "call_module" and isinstance(module.get_submodule(n.target), nn.Conv2d)]
    changes = []
    if convs:
        first = module.get_submodule(convs[0].target)
        if first.in_channels != input_shape[0]:
            new = nn.Conv2d(input_shape[0], first.out_channels, first.kernel_size, stride=first.stride,
                            padding=first.padding, dilation=first.dilation, bias=first.bias is not None,
                            padding_mode=first.padding_mode)
            nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
            _set_submodule(module, convs[0].target, new)
            changes.append(f"{convs[0].target}: {first.in_channels} -> {input_shape[0]} input channels")
    if small:
        live = _live_after(nodes)
        pos = {n: i for i, n in enumerate(nodes)}
        strided: list[tuple[torch.fx.Node, int, bool]] = []  # (node, stride, on the main chain)
        for n in nodes:
            if n.op != "call_module":
                continue
            m = module.get_submodule(n.target)
            if not isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
                continue
            stride = m.stride if isinstance(m.stride, int) else m.stride[0]
            if stride is None or stride <= 1:
                continue
            if convs and n is convs[0] and isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == tuple(m.stride):
                strided.append((n, stride, False))  # patch embedding: keep
                continue
            i, inputs = pos[n], n.all_input_nodes
            chain = len(inputs) == 1 and live[i - 1] == {inputs[0]} and live[i] == {n}
            strided.append((n, stride, chain))
        # Downsampling of the whole model: strides on the main chain multiply; strides inside one branchy
        # segment (between two points where one value is live) run in parallel, so a segment counts its largest.
        segment_of, segment = {}, 0
        for i, n in enumerate(nodes):
            segment_of[n] = segment
            if live[i] == {n}:
                segment += 1
        total, largest = 1, {}
        for n, stride, chain in strided:
            if chain:
                total *= stride
            else:
                largest[segment_of[n]] = max(largest.get(segment_of[n], 1), stride)
        total *= math.prod(largest.values())
        for n, stride, chain in strided:
            if total <= _MAX_SMALL_DOWNSAMPLING:
                break
            if not chain:
                continue
            m = module.get_submodule(n.target)
            if isinstance(m, nn.Conv2d):
                m.stride = (1, 1)
                changes.append(f"{n.target}: stride {stride} -> 1")
            else:
                _set_submodule(module, n.target, nn.Identity())
                changes.append(f"{n.target}: {type(m).__name__} (stride {stride}) -> Identity")
            total //= stride
    if changes:
        logger.info("%s adapted to input %s: %s", arch, input_shape, "; ".join(changes))
    return changes


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
        fn = torchvision.models.get_model_builder(name)
        module = _build_module(fn, name, num_classes, _torchvision_kwargs(name, input_shape, kwargs), input_shape)
        small = _is_small(input_shape, small_input)
    else:
        module = _build_module(_import_builder(name), name, num_classes, kwargs, input_shape)
        small = bool(small_input)  # a user's own model is adapted for small inputs only on request
    adapt_input(module, input_shape, small=small, arch=name)
    return trace_model(module, arch=name, input_shape=input_shape, num_classes=num_classes)


# Builders that also return the torchvision model they re-wrap (shared modules): for tests and tools
# that check the staged forward against torchvision's.
_TORCHVISION_PAIRS: dict[str, Callable[..., tuple[nn.Module, StagedModel]]] = {
    "alexnet": _alexnet_pair,
    "mobilenet_v2": _mobilenet_v2_pair,
    "resnet18": _resnet18_pair,
}
