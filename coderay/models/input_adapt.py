"""Small-input adaptation: fit a classifier's first convolution and downsampling to the input (C, H, W).

* channels, any model: the first convolution takes the input's C channels (pretrained kernels are summed or
  repeated into it by ``load_weights``);
* resolution, torchvision models when min(H, W) < 64 (``small_input`` overrides; user models only with
  ``small_input=True``): the earliest strided convolutions and pooling layers on the main chain (no parallel
  branch beside them) lose their stride, convolutions keeping their kernels and pools becoming Identity,
  until the remaining downsampling is at most 8x (28/32 px end as a 4x4 map); strides inside residual or
  Inception blocks and a first patch-embedding conv (kernel = stride) are kept. ViT is built for the image
  size (a multiple of its patch size). The hand-staged models keep their own per-family stems.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.fx
from torch import nn

from coderay.models.fx_split import _live_after, _symbolic_trace

logger = logging.getLogger(__package__)  # "coderay.models", the name log lines carried before the split

_MAX_SMALL_DOWNSAMPLING = 8  # small inputs keep a 4x4 map at the end (28/32 px): the CIFAR convention


def _is_small(input_shape: tuple[int, int, int], small_input: bool | None) -> bool:
    """Small inputs (MNIST/CIFAR sized) get a stem that does not downsample them away."""
    return min(input_shape[1:]) < 64 if small_input is None else bool(small_input)


def _set_submodule(root: nn.Module, target: str, new: nn.Module) -> None:
    parent, _, child = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _pair(value: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d's geometry (torch types it as a tuple of any length; a 2-d conv's is a pair)."""
    h, w = value
    return h, w


def _target(node: torch.fx.Node) -> str:
    """The submodule path a ``call_module`` node calls (fx gives call_function nodes a callable instead)."""
    assert isinstance(node.target, str), node
    return node.target


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
        first = module.get_submodule(_target(convs[0]))
        assert isinstance(first, nn.Conv2d)  # convs holds Conv2d nodes only
        if first.in_channels != input_shape[0]:
            padding = first.padding if isinstance(first.padding, str) else _pair(first.padding)
            new = nn.Conv2d(
                input_shape[0],
                first.out_channels,
                _pair(first.kernel_size),
                stride=_pair(first.stride),
                padding=padding,
                dilation=_pair(first.dilation),
                bias=first.bias is not None,
                padding_mode=first.padding_mode,
            )
            nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
            _set_submodule(module, _target(convs[0]), new)
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
        total = 1
        largest: dict[int, int] = {}  # segment -> its largest stride
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
            m = module.get_submodule(_target(n))
            if isinstance(m, nn.Conv2d):
                m.stride = (1, 1)
                changes.append(f"{n.target}: stride {stride} -> 1")
            else:
                _set_submodule(module, _target(n), nn.Identity())
                changes.append(f"{n.target}: {type(m).__name__} (stride {stride}) -> Identity")
            total //= stride
    if changes:
        logger.info("%s adapted to input %s: %s", arch, input_shape, "; ".join(changes))
    return changes
