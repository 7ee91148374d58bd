"""A registry of architectures, each built as a *staged* model.

A staged model is an ``nn.Sequential`` of named stages whose forward is exactly the composition of its
stages, so a stage name is a valid cut point and blocks (``coderay.blocks``) are slices of it. The
torchvision architectures are re-wrapped from the very module objects of a torchvision model, so the
staged forward reproduces torchvision's forward bit for bit (eval mode) for the same weights.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["StagedModel", "register_model", "list_models", "get_model", "load_weights"]

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
        for n, cuts in (default_cuts or {}).items():
            self.cut_indices(cuts)  # validate at build time, not at first split
            self.default_cuts[n] = tuple(cuts)
        self.source_keys = _source_keys(source, self) if source is not None else {}
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
            if cut not in valid:
                why = "is the last stage" if cut == names[-1] else "is not a stage"
                raise ValueError(
                    f"cut {cut!r} {why} of {self.arch}; valid cut points are {valid} "
                    f"(run `coderay blocks {self.arch}` to see them with shapes and costs)"
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
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    builder = _REGISTRY[name]
    options = [p for p in inspect.signature(builder).parameters if p not in ("num_classes", "input_shape")]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise TypeError(f"{name} got unknown option(s) {unknown}; it accepts {options}")
    model = builder(num_classes=num_classes, input_shape=_check_input_shape(input_shape), **kwargs)
    if weights is not None:
        load_weights(model, weights)
    return model


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


def _source_keys(source: nn.Module, staged: nn.Module) -> dict[str, str]:
    """Map the source model's state_dict keys to the staged ones by tensor identity (same objects)."""
    by_id = {id(t): k for k, t in staged.state_dict(keep_vars=True).items()}
    mapping = {k: by_id.get(id(t)) for k, t in source.state_dict(keep_vars=True).items()}
    lost = [k for k, v in mapping.items() if v is None]
    if lost:
        raise RuntimeError(f"staged model does not reuse source tensors {lost}: the re-wrap is incomplete")
    return mapping  # type: ignore[return-value]


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


# Builders that also return the torchvision model they re-wrap (shared modules): for tests and tools
# that check the staged forward against torchvision's.
_TORCHVISION_PAIRS: dict[str, Callable[..., tuple[nn.Module, StagedModel]]] = {
    "alexnet": _alexnet_pair,
    "mobilenet_v2": _mobilenet_v2_pair,
    "resnet18": _resnet18_pair,
}
