"""Split a staged model into N frozen blocks, and profile them.

CoDE divides each service's model into blocks whose parameters never change, so the owner keeps its
model's integrity while other services route samples through it. A block is a contiguous slice of a
``StagedModel`` that reuses the model's own modules (no copies); composing the blocks reproduces the model.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from coderay.models import StagedModel, _check_input_shape

__all__ = ["Block", "BlockInfo", "split_model", "profile_blocks", "format_block_table"]

logger = logging.getLogger(__name__)


class Block(nn.Sequential):
    """Consecutive stages of one frozen model: parameters never train, BN/dropout stay in eval mode."""

    index: int  # 1-based position in the model
    stages: tuple[str, ...]  # stage names, in order; also the names of this block's children
    arch: str  # architecture the stages come from

    def __init__(self, stages: Sequence[tuple[str, nn.Module]], *, index: int, arch: str = "") -> None:
        if not stages:
            raise ValueError("a block needs at least one stage")
        super().__init__(OrderedDict(stages))
        self.index = index
        self.stages = tuple(name for name, _ in stages)
        self.arch = arch
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Block:
        """Stay in eval mode whatever is asked: a frozen block's BN statistics and dropout never change."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The modules are shared with the source model, whose .train() would reach them: undo that here.
        if any(m.training for m in self.modules()):
            super().train(False)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"index={self.index}, arch={self.arch!r}"


@dataclass
class BlockInfo:
    """What the search and the throughput model need to know about one block, per sample."""

    index: int  # 1-based position in the model
    stages: tuple[str, ...]  # stage names in the block
    in_shape: tuple[int, ...]  # input of one sample, e.g. (C, H, W)
    out_shape: tuple[int, ...]  # output of one sample
    params: int  # parameter count
    macs: int  # multiply-accumulates of conv/linear/matmul for one sample (elementwise ops not counted)
    latency_ms: dict[int, float] = field(default_factory=dict)  # batch size -> median ms per batch, 1 thread

    def to_dict(self) -> dict:
        """JSON-ready: tuples become lists."""
        d = asdict(self)
        for key in ("stages", "in_shape", "out_shape"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BlockInfo:
        """Inverse of ``to_dict``, also after a JSON round trip (batch-size keys come back as strings)."""
        return cls(
            index=int(d["index"]),
            stages=tuple(d["stages"]),
            in_shape=tuple(d["in_shape"]),
            out_shape=tuple(d["out_shape"]),
            params=int(d["params"]),
            macs=int(d["macs"]),
            latency_ms={int(b): float(ms) for b, ms in d.get("latency_ms", {}).items()},
        )


def split_model(model: StagedModel, *, blocks: int | None = None, cuts: Sequence[str] | None = None) -> list[Block]:
    """Split ``model`` into frozen blocks: by count (``blocks=N``), by cut points, or one block per stage.

    ``cuts`` names the stages after which blocks 1..N-1 end. ``blocks=N`` uses ``model.default_cuts[N]``
    where the architecture defines one, else N contiguous groups balanced by MACs. Freezes ``model`` in
    place (its modules are the blocks' modules).
    """
    if not isinstance(model, StagedModel):
        raise TypeError(f"split_model needs a StagedModel (from coderay.models.get_model), got {type(model).__name__}")
    names = model.stage_names
    if blocks is not None and cuts is not None:
        raise ValueError("pass either blocks=N or cuts=[...], not both")
    if cuts is not None:
        indices = model.cut_indices([cuts] if isinstance(cuts, str) else list(cuts))
    elif blocks is not None:
        if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= len(names):
            raise ValueError(
                f"blocks must be an int in 1..{len(names)} for {model.arch} ({len(names)} stages); got {blocks!r}"
                f" (defaults defined for N in {sorted(model.default_cuts)})"
            )
        if blocks in model.default_cuts:
            indices = model.cut_indices(model.default_cuts[blocks])
        else:
            indices = _balanced_cuts([model.stage_macs[n] for n in names], blocks)
            logger.info(
                "%s: no default cuts for N=%d, balanced by MACs: %s", model.arch, blocks, [names[i] for i in indices]
            )
    else:
        indices = list(range(len(names) - 1))
    model.requires_grad_(False)
    model.eval()
    bounds = [0, *(i + 1 for i in indices), len(names)]
    stages = list(model.named_children())
    return [
        Block(stages[start:end], index=k + 1, arch=model.arch)
        for k, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]))
    ]


def _balanced_cuts(costs: Sequence[int], n: int) -> list[int]:
    """Cut indices splitting ``costs`` into ``n`` contiguous non-empty groups with the smallest largest sum."""
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    m = len(costs)
    inf = float("inf")
    # best[k][j]: smallest largest-group cost putting the first j stages into k groups; arg[k][j]: start of group k
    best = [[inf] * (m + 1) for _ in range(n + 1)]
    arg = [[0] * (m + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for k in range(1, n + 1):
        for j in range(k, m - (n - k) + 1):
            for i in range(k - 1, j):
                cost = max(best[k - 1][i], prefix[j] - prefix[i])
                if cost <= best[k][j]:  # ties: the later start, so zero-cost ops (ReLU, pool) end a block
                    best[k][j], arg[k][j] = cost, i
    starts, j = [], m
    for k in range(n, 0, -1):
        j = arg[k][j]
        starts.append(j)
    return [s - 1 for s in sorted(starts)[1:]]  # a group starting at s means a cut after stage s-1


def profile_blocks(
    blocks: Sequence[Block],
    input_shape: tuple[int, int, int],
    *,
    batch_sizes: Sequence[int] = (1, 8, 32),
    repeats: int = 5,
    measure_latency: bool = True,
) -> list[BlockInfo]:
    """Shapes, params and MACs of each block, and its median latency per batch size on this machine.

    Latency is measured with one torch thread (as in a Ray worker), restored afterwards, under
    ``torch.inference_mode``: one warm-up run, then the median of ``repeats`` timed runs.
    """
    shape = _check_input_shape(input_shape)
    if not batch_sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive ints, e.g. (1, 8, 32); got {batch_sizes!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    infos = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))  # (1, C, H, W)
            for block in blocks:
                with FlopCounterMode(display=False) as counter:
                    y = block(x)
                info = BlockInfo(
                    index=block.index,
                    stages=block.stages,
                    in_shape=tuple(x.shape[1:]),
                    out_shape=tuple(y.shape[1:]),
                    params=sum(p.numel() for p in block.parameters()),
                    macs=counter.get_total_flops() // 2,
                )
                if measure_latency:
                    info.latency_ms = {
                        b: _median_ms(block, x.expand(b, *x.shape[1:]).clone(), repeats) for b in batch_sizes
                    }
                infos.append(info)
                x = y
    finally:
        torch.set_num_threads(threads)
    return infos


def _median_ms(block: nn.Module, x: torch.Tensor, repeats: int) -> float:
    block(x)  # warm-up: allocator, kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def format_block_table(infos: Sequence[BlockInfo]) -> str:
    """An aligned text table: one row per block, one latency column per batch size."""
    batch_sizes = sorted({b for info in infos for b in info.latency_ms})
    header = ["block", "stages", "in", "out", "params", "MACs", *(f"ms@{b}" for b in batch_sizes)]
    rows = [header]
    for info in infos:
        stages = info.stages[0] if len(info.stages) == 1 else f"{info.stages[0]}..{info.stages[-1]}"
        rows.append(
            [
                str(info.index),
                stages,
                "x".join(map(str, info.in_shape)),
                "x".join(map(str, info.out_shape)),
                _human(info.params),
                _human(info.macs),
                *(f"{info.latency_ms[b]:.2f}" if b in info.latency_ms else "-" for b in batch_sizes),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    left = {1, 2, 3}  # text columns; numbers align right
    lines = [
        "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _human(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
