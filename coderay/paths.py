"""Paths on torch: a service's candidate paths, their parameter budgets, and `PathModule`, which runs one.

A path's identity (`coderay.pathspec.PathSpec`) needs no torch; what here does (link shapes, the wire encoding,
running blocks and links in-process) is kept apart from it, so routing and the controller stay torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from coderay.links import Link, link_kind
from coderay.pathspec import PathSpec
from coderay.plan import TO_END, crossings, host_span, plan_hops

__all__ = ["PathModule", "WIRE_DTYPES", "to_wire", "enumerate_paths", "path_budget"]

Shape = tuple[int, ...]


def _joinable(src: Shape, dst: Shape) -> bool:
    try:
        link_kind(src, dst)
        return True
    except ValueError:
        return False


def enumerate_paths(
    local: str,
    boundaries: Mapping[str, Sequence[Shape]],
    *,
    lout: Sequence[int] | None = None,
    hin: Sequence[int] | None = None,
    include_skip: bool = True,
) -> list[PathSpec]:
    """Every valid candidate for `local`: local-only, skip paths, and cooperative paths through each other
    service. `boundaries[svc][k]` is the per-sample shape after block k (k = 0: the input), so a model of N
    blocks has N + 1 boundaries. `lout`/`hin` restrict where paths leave the local and enter the host."""
    n = len(boundaries[local]) - 1
    shapes = boundaries[local]
    outs = [k for k in range(n) if lout is None or k in lout]
    paths = [PathSpec.local_only(local)]
    if include_skip:
        paths += [
            PathSpec(local, lout=o, lin=i)
            for o in outs
            for i in range(o + 2, n + 1)
            if _joinable(shapes[o], shapes[i - 1])
        ]
    for host, hshapes in boundaries.items():
        if host == local:
            continue
        nh = len(hshapes) - 1
        for o in outs:
            for i in range(o + 1, n + 1):
                for a in range(1, nh + 1):
                    if hin is not None and a not in hin:
                        continue
                    if not _joinable(shapes[o], hshapes[a - 1]):
                        continue
                    paths += [
                        PathSpec(local, lout=o, lin=i, host=host, hin=a, hout=b)
                        for b in range(a, nh + 1)
                        if _joinable(hshapes[b], shapes[i - 1])
                    ]
    return paths


WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def to_wire(x: torch.Tensor, encoding: str) -> torch.Tensor:
    """An activation as it crosses between nodes (the receiver computes on `x.float()`)."""
    return x if encoding == "float32" else x.to(WIRE_DTYPES[encoding])


class PathModule(nn.Module):
    """Runs one path's plan (`coderay.plan.plan_hops`) in this process, activations rounded to the wire
    encoding wherever the plan crosses nodes, exactly as serving sends them.

    Blocks are shared (not copied) from their services; `links` holds the only trainable parameters. A
    service's blocks may be a stand-in whose slices run elsewhere (split learning in `tuning.split`).
    """

    def __init__(
        self,
        spec: PathSpec,
        local_blocks: Sequence[nn.Module],
        host_blocks: Sequence[nn.Module] = (),
        links: Mapping[str, Link] | None = None,
        *,
        link_out: str = "host",
        encoding: str = "float32",
    ):
        super().__init__()
        self.spec, self.link_out, self.encoding = spec, link_out, encoding
        self.links = nn.ModuleDict(links or {})
        blocks = {spec.local: local_blocks, spec.host: host_blocks}
        self.hops = plan_hops(spec, link_out=link_out)
        self.cross = {i for i, _, _ in crossings(spec, link_out=link_out)}
        steps = []
        for hop in self.hops:
            if hop.kind == "links":
                steps.append(self.links[hop.link])
            else:
                last = None if hop.last == TO_END else hop.last
                steps.append(nn.Sequential(*blocks[hop.service][hop.first - 1 : last]))
        self.steps = nn.ModuleList(steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, step in enumerate(self.steps):
            if i in self.cross:
                x = to_wire(x, self.encoding).float()
            x = step(x)
        return x

    def link_parameters(self):
        return self.links.parameters()


def path_budget(
    spec: PathSpec, local_params: Sequence[int], host_params: Sequence[int] = (), link_params: int = 0
) -> dict[str, int]:
    """The paper's parameter budget of a path: links, local blocks skipped, host blocks added."""
    skipped = sum(local_params[spec.lout : spec.lin - 1])
    added = 0
    if spec.host:
        _, hin, hout = host_span(spec)
        added = sum(host_params[hin - 1 : hout])
    return {"link_params": link_params, "local_skipped_params": skipped, "host_added_params": added}
