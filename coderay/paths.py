"""Paths: inference routes through frozen blocks, joined by links.

A cooperative path of local service L through host H is
    L[1..lout] → link_in → H[hin..hout] → link_out → L[lin..N]      (0 ≤ lout < lin ≤ N, 1 ≤ hin ≤ hout ≤ N_H)
a skip path is L[1..lout] → link → L[lin..N] with lin > lout + 1, and local-only is L[1..N].
The local tail always keeps L's classifier, so every path answers L's task. Only links train.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from coderay.links import Link, link_kind
from coderay.plan import TO_END, crossings, plan_hops

__all__ = ["PathSpec", "PathModule", "WIRE_DTYPES", "to_wire", "enumerate_paths", "path_budget"]

Shape = tuple[int, ...]


@dataclass(frozen=True, order=True)
class PathSpec:
    local: str
    lout: int = 0  # local blocks 1..lout run before the sample leaves (0: the raw input leaves)
    lin: int = 1  # local blocks lin..N run after it comes back
    host: str | None = None
    hin: int | None = None  # host blocks hin..hout carry the sample
    hout: int | None = None

    @classmethod
    def local_only(cls, local: str) -> PathSpec:
        return cls(local)

    @property
    def kind(self) -> str:
        if self.host is not None:
            return "coop"
        return "local" if self.lin == self.lout + 1 else "skip"

    @property
    def id(self) -> str:
        """Stable and URL-safe: `digits:local`, `digits:skip:0:3`, `digits:mnist:0:1:3:4` (lout:hin:hout:lin)."""
        if self.kind == "local":
            return f"{self.local}:local"
        if self.kind == "skip":
            return f"{self.local}:skip:{self.lout}:{self.lin}"
        return f"{self.local}:{self.host}:{self.lout}:{self.hin}:{self.hout}:{self.lin}"

    @classmethod
    def parse(cls, path_id: str) -> PathSpec:
        parts = path_id.split(":")
        try:
            if len(parts) == 2 and parts[1] == "local":
                return cls.local_only(parts[0])
            if len(parts) == 4 and parts[1] == "skip":
                return cls(parts[0], lout=int(parts[2]), lin=int(parts[3]))
            if len(parts) == 6:
                lout, hin, hout, lin = map(int, parts[2:])
                return cls(parts[0], lout=lout, lin=lin, host=parts[1], hin=hin, hout=hout)
        except ValueError:
            pass
        raise ValueError(
            f"not a path id: {path_id!r}; expected 'SVC:local', 'SVC:skip:LOUT:LIN' or 'SVC:HOST:LOUT:HIN:HOUT:LIN'"
        )

    def validate(self, n_local: int, n_host: int | None = None) -> None:
        if not 0 <= self.lout < self.lin <= n_local:
            raise ValueError(f"{self.id}: need 0 ≤ lout < lin ≤ {n_local}")
        if self.host is not None and (n_host is None or not 1 <= (self.hin or 0) <= (self.hout or 0) <= n_host):
            raise ValueError(f"{self.id}: need 1 ≤ hin ≤ hout ≤ {n_host}")

    def __str__(self) -> str:
        if self.kind == "local":
            return f"{self.local}[1..N]"
        head = f"{self.local}[1..{self.lout}] → " if self.lout else "input → "
        mid = f"link → {self.host}[{self.hin}..{self.hout}] → link" if self.host else "link"
        return f"{head}{mid} → {self.local}[{self.lin}..N]"


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
    added = sum(host_params[spec.hin - 1 : spec.hout]) if spec.host else 0
    return {"link_params": link_params, "local_skipped_params": skipped, "host_added_params": added}
