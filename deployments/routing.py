"""What the ingress decides per request, kept free of Ray so it is tested in-process.

- `plan_hops`: the chain of replica calls that runs a path (block groups and links, each on its node);
- `Activation`: what travels between replicas (the tensor plus where it was produced, for the emulated network);
- `Router`: the active path and cooperative traffic share of every service, validated against the reward
  table, switchable at run time (`PUT /route`, or `reconfigure(user_config)` from a config deploy / controller).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from coderay.config import CoderayConfig
from coderay.paths import PathSpec
from coderay.table import PATH_KINDS, RewardTable

from deployments.schemas import ApiError

__all__ = ["Activation", "Hop", "plan_hops", "hop_delay_s", "link_owner", "link_files", "servable", "Route",
           "Router", "initial_routes", "TO_END"]

log = logging.getLogger(__name__)
TO_END = -1  # `last` of a hop that runs a service's blocks to its last one


@dataclass(frozen=True)
class Activation:
    """A batch between two replicas: `x` (B, ...) and the node that produced it."""

    x: torch.Tensor
    node: str                   # where `x` was produced (the receiver emulates the hop from here)
    hops: int = 0               # cross-node hops so far
    delay_ms: float = 0.0       # emulated network delay so far

    def moved(self, x: torch.Tensor, node: str, *, delay_s: float, crossed: bool) -> Activation:
        return replace(self, x=x, node=node, hops=self.hops + int(crossed), delay_ms=self.delay_ms + delay_s * 1e3)


@dataclass(frozen=True)
class Hop:
    """One replica call of a path: a service's blocks first..last, or one of its links."""

    kind: str                   # 'blocks' or 'links'
    service: str                # whose deployment (blocks-<service> / links-<service>)
    first: int = 0
    last: int = 0               # TO_END: to the service's last block
    guest: bool = False         # the samples belong to another service (counted against the guest quota)
    path_id: str = ""
    link: str = ""              # 'in', 'out' or 'skip'


def link_owner(spec: PathSpec) -> str:
    """The service whose node runs a path's links: the host for cooperative paths, the local for skip paths."""
    return spec.host if spec.kind == "coop" else spec.local


def plan_hops(spec: PathSpec) -> list[Hop]:
    """local: L[1..N]; skip: L[1..lout] → link → L[lin..N]; coop: L[1..lout] → link_in → H[hin..hout] →
    link_out → L[lin..N] (an empty head, lout = 0, is no hop)."""
    if spec.kind == "local":
        return [Hop("blocks", spec.local, 1, TO_END)]
    head = [Hop("blocks", spec.local, 1, spec.lout)] if spec.lout > 0 else []
    tail = [Hop("blocks", spec.local, spec.lin, TO_END)]
    if spec.kind == "skip":
        return [*head, Hop("links", spec.local, path_id=spec.id, link="skip"), *tail]
    return [*head, Hop("links", spec.host, path_id=spec.id, link="in"),
            Hop("blocks", spec.host, spec.hin, spec.hout, guest=True),
            Hop("links", spec.host, path_id=spec.id, link="out"), *tail]


def hop_delay_s(cfg: CoderayConfig, src: str, dst: str, nbytes: int) -> float:
    """Emulated one-way delay of `nbytes` from node `src` to `dst`: RTT/2 + bytes / bandwidth (0 on one node)."""
    if src == dst or not cfg.serving.emulate_network:
        return 0.0
    bandwidth_mbps, rtt_ms = cfg.network.between(src, dst)
    return rtt_ms / 2e3 + (nbytes * 8 / (bandwidth_mbps * 1e6) if math.isfinite(bandwidth_mbps) else 0.0)


def servable(rows: list[dict]) -> list[dict]:
    """The rows that are paths (local-only, skip, coop); baselines such as edge-early are for comparison only."""
    return [r for r in rows if r.get("kind") in PATH_KINDS]


def link_files(rows: list[dict]) -> dict[str, dict[str, str]]:
    """{owner service: {path id: links file}} for every path of the table with trained links."""
    out: dict[str, dict[str, str]] = {}
    for r in servable(rows):
        if r.get("links_file") and r["kind"] != "local":
            spec = PathSpec.parse(r["path_id"])
            out.setdefault(link_owner(spec), {})[spec.id] = r["links_file"]
    return out


@dataclass(frozen=True)
class Route:
    path: PathSpec
    coop_fraction: float

    def to_dict(self) -> dict:
        return {"path": self.path.id, "coop_fraction": self.coop_fraction}


def initial_routes(cfg: CoderayConfig, rows: list[dict]) -> dict[str, dict]:
    """Each service's reward-table best path (coop_fraction 1.0 unless local-only); local-only without rows."""
    table = RewardTable(rows)
    routes = {}
    for svc in cfg.services:
        try:
            best = table.best(svc.name)["path_id"]
        except ValueError:
            best = PathSpec.local_only(svc.name).id
        local = PathSpec.parse(best).kind == "local"
        routes[svc.name] = {"path": best, "coop_fraction": 0.0 if local else 1.0}
    return routes


class Router:
    """Active path and cooperative share per service; a switch validates first, then flips atomically."""

    def __init__(self, cfg: CoderayConfig, rows: list[dict]):
        self.cfg = cfg
        self.rows = {r["path_id"]: r for r in servable(rows)}
        self.routes: dict[str, Route] = {}
        self._credit: dict[str, float] = {}
        for svc, route in initial_routes(cfg, rows).items():
            try:
                self.apply({svc: route})
            except ApiError as e:  # e.g. the host's guest quota was set to 0 after the search
                log.warning("%s: cannot start on %s (%s); starting local-only", svc, route["path"], e.reason)
                self.apply({svc: {"path": PathSpec.local_only(svc).id}})

    @property
    def services(self) -> list[str]:
        return [s.name for s in self.cfg.services]

    def check_service(self, svc: str) -> None:
        if svc not in self.services:
            raise ApiError(404, f"unknown service {svc!r}; expected one of {self.services}")

    def validate(self, svc: str, path_id: str, coop_fraction: float | None = None) -> Route:
        """The route `svc` → `path_id`, or ApiError (404 unknown service, 422 a path it cannot run)."""
        self.check_service(svc)
        try:
            spec = PathSpec.parse(path_id)
        except ValueError as e:
            raise ApiError(422, f"path: {e}") from None
        if spec.local != svc:
            raise ApiError(422, f"path: {path_id!r} answers service {spec.local!r}, not {svc!r}")
        if spec.kind != "local":
            row = self.rows.get(spec.id)
            if row is None:
                raise ApiError(422, f"path: {path_id!r} is not in the reward table of {svc!r}; "
                                    f"GET /v1/services/{svc}/paths lists them")
            if not row.get("links_file"):
                raise ApiError(422, f"path: {path_id!r} has no trained links (stage 1 only predicted it); "
                                    "choose a row with trained: true")
            if spec.kind == "coop":
                if spec.host not in self.services:
                    raise ApiError(422, f"path: host {spec.host!r} is not a service of this config")
                quota = self.cfg.service(spec.host).guest_quota
                if quota < 1:
                    raise ApiError(422, f"path: host {spec.host!r} admits no guests (guest_quota 0)")
        if coop_fraction is None:
            coop_fraction = 0.0 if spec.kind == "local" else 1.0
        if isinstance(coop_fraction, bool) or not isinstance(coop_fraction, (int, float)) \
                or not 0.0 <= coop_fraction <= 1.0:
            raise ApiError(422, f"coop_fraction: must be a number in [0, 1], got {coop_fraction!r}")
        return Route(spec, float(coop_fraction))

    def apply(self, routes: Mapping[str, Mapping]) -> dict[str, Route]:
        """Validate every entry of `{svc: {"path": id, "coop_fraction": f}}`, then switch them all."""
        if not isinstance(routes, Mapping):
            raise ApiError(422, f"routes: expected a mapping service -> {{path, coop_fraction}}, got "
                                f"{type(routes).__name__}")
        new = {}
        for svc, r in routes.items():
            if not isinstance(r, Mapping) or "path" not in r or set(r) - {"path", "coop_fraction"}:
                raise ApiError(422, f"routes.{svc}: expected {{'path': <path id>, 'coop_fraction': 0..1}}, got {r!r}")
            new[svc] = self.validate(svc, r["path"], r.get("coop_fraction"))
        for svc, route in new.items():
            if svc not in self.routes or self.routes[svc] != route:
                self._credit[svc] = 0.0
            self.routes[svc] = route
        return new

    def choose(self, svc: str) -> PathSpec:
        """The path for the next request of `svc`: the active path for a `coop_fraction` share of requests
        (spread evenly, deterministic), local-only for the rest."""
        route = self.routes[svc]
        if route.path.kind == "local":
            return route.path
        credit = self._credit.get(svc, 0.0) + route.coop_fraction
        if credit >= 1.0 - 1e-9:
            self._credit[svc] = credit - 1.0
            return route.path
        self._credit[svc] = credit
        return PathSpec.local_only(svc)

    def snapshot(self) -> dict[str, dict]:
        return {svc: r.to_dict() for svc, r in self.routes.items()}
