"""The edge-early baseline (Edgent-style), on the same blocks, data and profiles as CoDE's paths.

The local model is partitioned after block k: blocks 1..k run on the local node, blocks k+1..e on a host
node that must hold a *copy* of the local model's tail (the mirroring CoDE avoids). Right-sizing picks an
early exit e: the model truncated after block e with a small trained exit head (pool + linear); e = N is
the whole model. Each (k, e) is a row of kind 'edge-early' beside the paths, scored by the same throughput
model (the host lends the same s slots per batch) and the same reward.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from coderay.candidate import SearchContext
from coderay.emulation import node_rate
from coderay.rows import BaselineRow, score
from coderay.throughput import BYTES_PER_VALUE, PathCosts
from coderay.train import evaluate, fit

__all__ = ["ExitHead", "edge_early_rows"]


class ExitHead(nn.Module):
    """An early-exit classifier after a block: global pool (for feature maps) + linear."""

    def __init__(self, shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()) if len(shape) == 3 else nn.Identity()
        self.fc = nn.Linear(shape[0], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x))


def _branch(ctx: SearchContext, local: str, exit_after: int) -> tuple[nn.Module, float, float, int]:
    """The local model right-sized to exit after block `exit_after`: (module, val acc, test acc, head params)."""
    svc = ctx.service_model(local)
    if exit_after == svc.num_blocks:
        module = nn.Sequential(*svc.blocks)
        return module, svc.metrics["val_acc"], svc.metrics["test_acc"], 0
    torch.manual_seed(ctx.cfg.seed)  # the head starts the same whatever ran before it
    head = ExitHead(svc.boundaries[exit_after], svc.task.num_classes)
    module = nn.Sequential(*svc.blocks[:exit_after], head)
    s = ctx.cfg.search
    fit(
        module,
        head.parameters(),
        svc.task.train,
        svc.task.val,
        epochs=s.link_epochs,
        lr=s.link_lr,
        batch_size=s.link_batch_size,
        seed=ctx.cfg.seed,
        progress=False,
    )
    return (
        module,
        evaluate(module, svc.task.val),
        evaluate(module, svc.task.test),
        sum(p.numel() for p in head.parameters()),
    )


def edge_early_rows(ctx: SearchContext, local: str, *, exits: list[int] | None = None) -> list[BaselineRow]:
    """Every (partition k, exit e) of `local` offloading to each other service's node, as reward-table rows."""
    svc = ctx.service_model(local)
    n = svc.num_blocks
    exits = exits or list(range(1, n + 1))
    full = svc.block_seconds(1, n)
    wire = BYTES_PER_VALUE[ctx.cfg.network.encoding]  # the same wire as the paths (accuracy not re-measured)
    rows = []
    for e in exits:
        _, val_acc, test_acc, head_params = _branch(ctx, local, e)
        for host in (h for name, h in ctx.services.items() if name != local and h.spec.grant(local) > 0):
            for k in range(0, e):
                host_speed_ratio = node_rate(ctx.cfg, svc.node.name) / node_rate(ctx.cfg, host.node.name)
                costs = PathCosts(
                    local_full=full,
                    local_part=svc.block_seconds(1, k),
                    host_full=host.block_seconds(1, host.num_blocks),
                    host_part=svc.block_seconds(k + 1, e) * host_speed_ratio,
                    batch=host.spec.batch_size,
                    guest_quota=host.spec.grant(local),
                    bytes_out=wire * math.prod(svc.boundaries[k]),
                    bytes_back=wire * svc.task.num_classes,
                )
                row = BaselineRow(
                    path_id=f"{local}:edge-early:{host.name}:{k}:{e}",
                    local=local,
                    kind="edge-early",
                    host=host.name,
                    lout=k,
                    hin=k + 1,
                    hout=e,
                    lin=None,
                    exit_after=e,
                    local_node=svc.node.name,
                    host_node=host.node.name,
                    acc_local_val=svc.metrics["val_acc"],
                    acc_local_test=svc.metrics["test_acc"],
                    val_acc=val_acc,
                    test_acc=test_acc,
                    trained=e < n,
                    costs=costs,
                    link_params=head_params,
                    mirrored_params=sum(svc.block_params[k:e]),
                )
                rows.append(score(row, ctx.cfg.reward, ctx.cfg.network))
    return rows
