"""The one plan of a path: its ordered hops, each a run of one service's blocks or one link, on a node.

Every executor runs this plan and nothing else: the in-process `PathModule` (search), the chain of replica
calls (serving) and the split-learning trial (Tune). Where links run is decided here, once.

    local:  L[1..N]
    skip:   L[1..lout] → link 'skip' (local node) → L[lin..N]
    coop:   L[1..lout] → link 'in' (host node) → H[hin..hout] → link 'out' (host or local node) → L[lin..N]

An empty head (lout = 0) is no hop. link_out runs on the host by default (the host creates the links, as in
the paper); on the local node it ships the host block's output instead of the link's, where that is smaller.
"""

from __future__ import annotations

from dataclasses import dataclass

from coderay.pathspec import PathSpec

__all__ = [
    "TO_END",
    "LINK_OUT_PLACES",
    "Hop",
    "host_span",
    "plan_hops",
    "stages",
    "link_owner",
    "link_services",
    "crossings",
]

TO_END = -1  # `last` of a hop that runs a service's blocks to its last one
LINK_OUT_PLACES = ("host", "local")


@dataclass(frozen=True)
class Hop:
    """One step of a path: a service's blocks first..last, or one of the path's links on a service's node."""

    kind: str  # 'blocks' or 'links'
    service: str  # whose node runs it (in serving: the replica blocks-<service>)
    first: int = 0
    last: int = 0  # TO_END: to the service's last block
    guest: bool = False  # the samples belong to another service (counted against its guest quota)
    path_id: str = ""
    link: str = ""  # 'in', 'out' or 'skip'


def host_span(spec: PathSpec) -> tuple[str, int, int]:
    """(host, hin, hout) of a cooperative path; ValueError for a path without a host or a spec missing a bound."""
    if spec.host is None or spec.hin is None or spec.hout is None:
        raise ValueError(f"{spec.id}: not a cooperative path with host blocks hin..hout")
    return spec.host, spec.hin, spec.hout


def link_owner(spec: PathSpec) -> str:
    """The service whose node trains a path's links (and runs link_in): the host for cooperative paths, the
    local service for skip paths."""
    return spec.host if spec.host is not None else spec.local  # a host is what makes a path cooperative


def plan_hops(spec: PathSpec, *, link_out: str = "host") -> list[Hop]:
    if link_out not in LINK_OUT_PLACES:
        raise ValueError(f"link_out must be one of {LINK_OUT_PLACES}, got {link_out!r}")
    if spec.kind == "local":
        return [Hop("blocks", spec.local, 1, TO_END)]
    head = [Hop("blocks", spec.local, 1, spec.lout)] if spec.lout > 0 else []
    tail = [Hop("blocks", spec.local, spec.lin, TO_END)]
    owner = link_owner(spec)
    if spec.kind == "skip":
        return [*head, Hop("links", owner, path_id=spec.id, link="skip"), *tail]
    host, hin, hout = host_span(spec)
    out_on = host if link_out == "host" else spec.local
    return [
        *head,
        Hop("links", owner, path_id=spec.id, link="in"),
        Hop("blocks", host, hin, hout, guest=True, path_id=spec.id),
        Hop("links", out_on, path_id=spec.id, link="out"),
        *tail,
    ]


def stages(hops: list[Hop]) -> list[tuple[Hop, ...]]:
    """The hops grouped into runs of one service's: serving makes one replica call per run (the service's block
    group holds its links too), so a request pays the per-call cost once per node it visits, not once per hop."""
    out: list[list[Hop]] = []
    for hop in hops:
        if out and out[-1][-1].service == hop.service:
            out[-1].append(hop)
        else:
            out.append([hop])
    return [tuple(run) for run in out]


def link_services(spec: PathSpec, *, link_out: str = "host") -> list[str]:
    """The services whose nodes run at least one of the path's links."""
    return sorted({h.service for h in plan_hops(spec, link_out=link_out) if h.kind == "links"})


def crossings(spec: PathSpec, *, link_out: str = "host") -> list[tuple[int, str, str]]:
    """(index of the hop that receives, from service, to service) for every hop whose input arrives from
    another service's node: where activations cross the network (the model counts their bytes, the wire
    encoding applies). Index len(hops): the answer going back to the local service."""
    hops = plan_hops(spec, link_out=link_out)
    out, where = [], spec.local  # the request enters on the local node
    for i, hop in enumerate(hops):
        if hop.service != where:
            out.append((i, where, hop.service))
        where = hop.service
    if where != spec.local:
        out.append((len(hops), where, spec.local))
    return out
