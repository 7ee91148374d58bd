"""Which path each service answers on: the routing state every ingress replica holds.

A service's route is coderay's own choice (`auto`: the reward table's best path now, a controller's choice
once one runs) unless an operator pinned one (`PUT /route`, a config deploy); a pin holds until it is
released (`DELETE /route`). Every switch is validated against the reward table first and applied whole
or not at all. `choose` spreads a route's cooperative share evenly over requests.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from coderay.config import CoderayConfig
from coderay.errors import InvalidRouteError, UnknownServiceError
from coderay.pathspec import PathSpec
from coderay.plan import link_services
from coderay.rows import Row
from coderay.table import RewardTable

__all__ = ["Route", "Router", "model_share", "initial_routes", "link_files"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    path: PathSpec
    coop_fraction: float

    def to_dict(self) -> dict:
        return {"path": self.path.id, "coop_fraction": self.coop_fraction}


def model_share(row: Row) -> float:
    """The share of requests a path should take for the throughput the model promises: Th^h / (Th^l + Th^h)
    (the local node answers the rest on its own model); 1.0 where the row has no model figures."""
    if row.kind == "local":
        return 0.0
    if row.th_total and row.th_host is not None:
        return round(row.th_host / row.th_total, 4)
    return 1.0


def initial_routes(cfg: CoderayConfig, rows: Sequence[Row]) -> dict[str, dict]:
    """Each service's reward-table best path at the model's share (`model_share`); local-only without rows."""
    table = RewardTable(list(rows))
    routes = {}
    for svc in cfg.services:
        try:
            best = table.best(svc.name)
        except ValueError:
            routes[svc.name] = {"path": PathSpec.local_only(svc.name).id, "coop_fraction": 0.0}
            continue
        routes[svc.name] = {"path": best.path_id, "coop_fraction": model_share(best)}
    return routes


def link_files(rows: Sequence[Row]) -> dict[str, dict[str, str]]:
    """{service whose node runs links: {path id: links file}} for every path of the table with trained links
    (a path whose link_out runs on the local node appears under both services)."""
    out: dict[str, dict[str, str]] = {}
    for r in RewardTable(list(rows)).rows:
        if r.is_path and r.links_file and r.kind != "local":
            spec = PathSpec.parse(r.path_id)
            for svc in link_services(spec, link_out=r.link_out_on or "host"):
                out.setdefault(svc, {})[spec.id] = r.links_file
    return out


class Router:
    """Active route per service: a pin if an operator set one, else coderay's own choice."""

    def __init__(self, cfg: CoderayConfig, rows: Sequence[Row]):
        self.cfg = cfg
        self.rows = {r.path_id: r for r in RewardTable(list(rows)).rows if r.is_path}
        self.auto: dict[str, Route] = {}
        self.pinned: dict[str, Route] = {}
        self._credit: dict[str, float] = {}
        for svc, route in initial_routes(cfg, list(self.rows.values())).items():
            try:
                self.auto[svc] = self.validate(svc, route["path"], route["coop_fraction"])
            except InvalidRouteError as e:  # e.g. the host's guest quota was set to 0 after the search
                log.warning("%s: cannot start on %s (%s); starting local-only", svc, route["path"], e)
                self.auto[svc] = Route(PathSpec.local_only(svc), 0.0)

    @property
    def services(self) -> list[str]:
        return [s.name for s in self.cfg.services]

    @property
    def routes(self) -> dict[str, Route]:
        return {svc: self.pinned.get(svc, self.auto[svc]) for svc in self.services}

    def check_service(self, svc: str) -> None:
        if svc not in self.services:
            raise UnknownServiceError(f"unknown service {svc!r}; expected one of {self.services}")

    def validate(self, svc: str, path_id: str, coop_fraction: float | None = None) -> Route:
        """The route `svc` → `path_id`, or UnknownServiceError / InvalidRouteError naming the problem."""
        self.check_service(svc)
        try:
            spec = PathSpec.parse(path_id)
        except ValueError as e:
            raise InvalidRouteError(f"path: {e}") from None
        if spec.local != svc:
            raise InvalidRouteError(f"path: {path_id!r} answers service {spec.local!r}, not {svc!r}")
        if spec.kind != "local":
            row = self.rows.get(spec.id)
            if row is None:
                raise InvalidRouteError(
                    f"path: {path_id!r} is not in the reward table of {svc!r}; GET /v1/services/{svc}/paths lists them"
                )
            if not row.links_file:
                raise InvalidRouteError(
                    f"path: {path_id!r} has no trained links (stage 1 only predicted it); "
                    "choose a row with trained: true"
                )
            if spec.kind == "coop":
                if spec.host not in self.services:
                    raise InvalidRouteError(f"path: host {spec.host!r} is not a service of this config")
                if self.cfg.service(spec.host).grant(svc) < 1:
                    raise InvalidRouteError(
                        f"path: host {spec.host!r} does not admit {svc!r} as a guest "
                        "(guest_quota 0, or not among its guests)"
                    )
        if coop_fraction is None:
            coop_fraction = 0.0 if spec.kind == "local" else 1.0
        if (
            isinstance(coop_fraction, bool)
            or not isinstance(coop_fraction, (int, float))
            or not 0.0 <= coop_fraction <= 1.0
        ):
            raise InvalidRouteError(f"coop_fraction: must be a number in [0, 1], got {coop_fraction!r}")
        return Route(spec, float(coop_fraction))

    def _validate_all(self, routes: Mapping[str, Mapping]) -> dict[str, Route]:
        if not isinstance(routes, Mapping):
            raise InvalidRouteError(
                f"routes: expected a mapping service -> {{path, coop_fraction}}, got {type(routes).__name__}"
            )
        new = {}
        for svc, r in routes.items():
            if not isinstance(r, Mapping) or "path" not in r or set(r) - {"path", "coop_fraction"}:
                raise InvalidRouteError(
                    f"routes.{svc}: expected {{'path': <path id>, 'coop_fraction': 0..1}}, got {r!r}"
                )
            new[svc] = self.validate(svc, r["path"], r.get("coop_fraction"))
        return new

    def _switch(self, table: dict[str, Route], new: dict[str, Route]) -> dict[str, Route]:
        before = self.routes
        table.update(new)
        after = self.routes
        for svc in new:
            if before.get(svc) != after[svc]:
                self._credit[svc] = 0.0
        return new

    def apply(self, routes: Mapping[str, Mapping]) -> dict[str, Route]:
        """Pin every entry of `{svc: {"path": id, "coop_fraction": f}}` (validated first; all or nothing)."""
        return self._switch(self.pinned, self._validate_all(routes))

    def set_auto(self, routes: Mapping[str, Mapping]) -> dict[str, Route]:
        """coderay's own choice for these services (all or nothing); a pinned service keeps its pin."""
        return self._switch(self.auto, self._validate_all(routes))

    def release(self, svc: str) -> Route:
        """Drop `svc`'s pin: it answers on coderay's own choice again. Returns that route."""
        self.check_service(svc)
        if self.pinned.pop(svc, None) is not None:
            self._credit[svc] = 0.0
        return self.auto[svc]

    def is_pinned(self, svc: str) -> bool:
        return svc in self.pinned

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
