"""The StagedModel type: a model whose forward is the composition of named stages, each a cut point.

Every source of models (the hand-staged builders, torch.fx tracing) builds one, so it sits below them all.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

logger = logging.getLogger(__package__)  # "coderay.models", the name log lines carried before the split


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
                    why = (
                        f"is not a valid cut: {len(crossing)} values cross it ({', '.join(crossing[:6])}"
                        f"{', ...' if len(crossing) > 6 else ''}; a residual or a branch) where a cut "
                        "passes exactly one tensor"
                    )
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


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(f"input_shape must be (C, H, W) of positive ints, e.g. (1, 28, 28); got {input_shape!r}")
    c, h, w = shape
    return c, h, w


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
