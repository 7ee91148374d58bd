"""torch.fx tracing and splitting: any traceable classifier becomes stages ending at each single-tensor node.

A stage name is the torch.fx graph node name where it ends; nodes where a residual or a branch crosses are
recorded as blocked cuts, with the values that cross them.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Sequence

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from coderay.models.staged import StagedModel, _check_input_shape

logger = logging.getLogger(__package__)  # "coderay.models", the name log lines carried before the split


class _Tracer(torch.fx.Tracer):
    """torch.fx tracer that wraps math and torchvision.ops functions (as torchvision's feature extraction
    does), so e.g. ``stochastic_depth`` is one node. Modules are traced through down to torch.nn layers,
    so a cut can fall inside torchvision's composite blocks (``Conv2dNormActivation``, ...)."""

    def __init__(self) -> None:
        # torch annotates autowrap_modules as a 1-tuple; it takes any number of modules
        import torchvision

        super().__init__(autowrap_modules=(math, torchvision.ops))  # type: ignore[arg-type]


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


def _stage_module(
    root: nn.Module, nodes: Sequence[torch.fx.Node], start: torch.fx.Node | None, end: torch.fx.Node, name: str
) -> torch.fx.GraphModule:
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
            # torch types a module's undeclared attributes as Tensor | Module
            m.inplace = False  # type: ignore[assignment]
    swaps = {
        operator.iadd: operator.add,
        operator.isub: operator.sub,
        operator.imul: operator.mul,
        operator.itruediv: operator.truediv,
    }
    for n in graph.nodes:
        if n.op == "call_function" and n.target in swaps:
            n.target = swaps[n.target]
        if n.kwargs.get("inplace") is True:
            n.kwargs = {**n.kwargs, "inplace": False}
        if (
            n.op == "call_method"
            and isinstance(n.target, str)
            and n.target.endswith("_")
            and not n.target.startswith("_")
            and hasattr(torch.Tensor, n.target[:-1])
        ):
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
        raise ValueError(
            f"{arch}: output shape {tuple(out_node.meta['tensor_meta'].shape[1:])} is not "
            f"(num_classes,) = ({num_classes},)"
        )
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
        stage_nodes = nodes[first : end + 1]  # the first stage starts with the model's placeholder
        stages[nodes[end].name] = _stage_module(module, stage_nodes, start, nodes[end], nodes[end].name)
        start, first = nodes[end], end + 1
    trailing = [n.name for n in nodes[last + 1 :] if n.op not in ("get_attr",)]
    if trailing:
        logger.info("%s: nodes after the output are dropped: %s", arch, trailing)
    if num_classes is None:
        num_classes = int(out_node.meta["tensor_meta"].shape[-1])
    staged = StagedModel(stages, arch=arch, input_shape=input_shape, num_classes=num_classes, source=module)
    staged.blocked_cuts = blocked
    return staged
