"""The hand-staged builders: small_cnn and torchvision's AlexNet, MobileNetV2, ResNet-18 re-wrapped as stages.

The torchvision ones reuse the very module objects of a torchvision model, so the staged forward reproduces
torchvision's bit for bit (eval mode); each keeps its default cuts per N. Importing this module registers them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from coderay.models.input_adapt import _is_small
from coderay.models.registry import register_model
from coderay.models.staged import StagedModel


def _all_cuts(names: Sequence[str]) -> tuple[str, ...]:
    return tuple(names[:-1])


def _flatten_pool(pool: nn.Module) -> nn.Sequential:
    return nn.Sequential(pool, nn.Flatten(1))


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
    import torchvision

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
    import torchvision

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
    import torchvision

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
