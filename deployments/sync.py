"""The ingress replica's side of the controller: its figures pushed, the routes and lost nodes pulled, each second.

Each replica pulls (`coderay.controller` says why not the other way round): every `POLL_S` seconds one call hands
the controller this replica's cumulative figures and brings back the routes it chose, applied as coderay's own
choice (pins stay), and the nodes it reports gone (`deployments.chains` ends the calls through them). Nothing on
the request path waits on it; while the controller is down the replica keeps its last routes. The same loop
exports the figures to Prometheus, off the request path.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from ray import serve

from coderay import controller as ctl
from coderay.errors import CoderayError
from coderay.routing import Router
from deployments.blocks import latency_summary
from deployments.schemas import ServiceStats

if TYPE_CHECKING:  # for annotations only: the metrics module is imported where it is used (tests replace it)
    from ray.actor import ActorHandle
    from ray.serve.metrics import Counter

__all__ = ["ControllerSync", "SyncStatus"]

log = logging.getLogger(__name__)


class SyncStatus(TypedDict):
    """How this replica's syncs with the controller went (`sync` under `ingress` in GET /v1/controller)."""

    ok: int
    failed: int
    last_ok: float | None  # time.time() of the last sync that succeeded
    last_error: str | None
    version: int | None  # the controller's routes version last applied


class ControllerSync:
    """Controller sync of the ingress deployment (`deployments.ingress.Ingress`, which provides `cfg`, `router`,
    `stats` and `_latencies`, and `_suspended_paths` and `_apply_gone` through `deployments.chains.PathRunner`)."""

    # set by the ingress (`deployments.ingress.Ingress.__init__`) and by `deployments.chains.PathRunner`
    router: Router
    stats: dict[str, ServiceStats]
    _latencies: dict[str, collections.deque[float]]  # service -> its recent request latencies (ms)
    _suspended_paths: Callable[[str], dict[str, float]]
    _apply_gone: Callable[[set[str]], None]

    def _controller_init(self) -> None:
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 — outside Serve (tests)
            self.replica_id = uuid.uuid4().hex[:8]
        self.controller_sync: SyncStatus = {"ok": 0, "failed": 0, "last_ok": None, "last_error": None, "version": None}
        self._controller_task: asyncio.Task[None] | None = None
        self._controller_actor: ActorHandle | None = None
        self._ensure_controller_sync()

    def _ensure_controller_sync(self) -> None:
        if self._controller_task is not None and not self._controller_task.done():
            return
        try:
            self._controller_task = asyncio.get_running_loop().create_task(self._controller_loop())
        except RuntimeError:  # no loop yet: the next health check starts it
            self._controller_task = None

    async def check_health(self) -> None:
        """Serve's periodic health check: also (re)starts the controller sync if it is not running."""
        self._ensure_controller_sync()

    def controller_stats(self) -> dict:
        """This replica's cumulative figures per service, as the controller reads them."""
        out = {}
        for svc, st in self.stats.items():
            lat = latency_summary(self._latencies[svc])
            out[svc] = {
                "requests": st["requests"],
                "samples": st["samples"],
                "fallbacks": st["fallbacks"],
                "latency_s": st["latency_s"],
                "by_path": dict(st["by_path"]),
                "p50_ms": lat["p50_ms"],
                "p99_ms": lat["p99_ms"],
                "suspended_paths": self._suspended_paths(svc),
            }
        return {
            "replica_id": self.replica_id,
            "services": out,
            "pinned": sorted(self.router.pinned),
            "routes": self.router.snapshot(),
        }

    async def _controller_call(self, method: str, *args, timeout_s: float) -> Any:
        import ray

        loop = asyncio.get_running_loop()
        if self._controller_actor is None:
            self._controller_actor = await loop.run_in_executor(None, ctl.get_controller)
        try:
            ref = getattr(self._controller_actor, method).remote(*args)
            return await asyncio.wait_for(ref, timeout_s)
        except (TimeoutError, ray.exceptions.RayActorError):
            self._controller_actor = None  # look it up again next time (it may have been replaced)
            raise

    def _metrics_init(self) -> None:
        """Prometheus metrics through Ray (`ray.serve.metrics` adds deployment/replica/application tags),
        exported by every node's metrics agent; updated from the stats once a second, off the request path."""
        from ray.serve import metrics

        # ray.serve.metrics types tag_keys as Tuple[str] (one key); the ray.util.metrics it wraps takes any number
        tags = ("service", "path")
        counters: dict[str, Counter] = {
            "requests": metrics.Counter(
                "coderay_requests",
                description="requests answered, by service and path",
                tag_keys=tags,  # type: ignore[arg-type]
            ),
            "samples": metrics.Counter(
                "coderay_samples", description="samples answered, by service", tag_keys=("service",)
            ),
            "fallbacks": metrics.Counter(
                "coderay_fallbacks",
                description="requests answered on the local-only path after their path failed",
                tag_keys=("service",),
            ),
        }
        latency_ms = metrics.Histogram(
            "coderay_latency_ms",
            description="request latency in the ingress (ms)",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000],
            tag_keys=("service",),
        )
        share = metrics.Gauge(
            "coderay_coop_share",
            description="cooperative share of the active route",
            tag_keys=tags,  # type: ignore[arg-type]
        )
        self._counters, self._latency_ms, self._share = counters, latency_ms, share  # all made, or none kept
        self._metrics_prev: dict = {}

    def _record_metrics(self) -> None:
        if getattr(self, "_counters", None) is None:
            self._metrics_init()
        counters, prev = self._counters, self._metrics_prev
        key: Literal["samples", "fallbacks"]
        for svc, st in self.stats.items():
            p = prev.setdefault(svc, {"samples": 0, "fallbacks": 0, "requests": 0, "by_path": {}})
            for key in ("samples", "fallbacks"):
                if st[key] > p[key]:
                    counters[key].inc(st[key] - p[key], tags={"service": svc})
            for path, n in st["by_path"].items():
                if n > p["by_path"].get(path, 0):
                    counters["requests"].inc(n - p["by_path"].get(path, 0), tags={"service": svc, "path": path})
            new = min(st["requests"] - p["requests"], len(self._latencies[svc]))
            for ms in list(self._latencies[svc])[len(self._latencies[svc]) - new :] if new > 0 else []:
                self._latency_ms.observe(ms, tags={"service": svc})
            route = self.router.routes[svc]
            self._share.set(route.coop_fraction, tags={"service": svc, "path": route.path.id})
            prev[svc] = {
                "samples": st["samples"],
                "fallbacks": st["fallbacks"],
                "requests": st["requests"],
                "by_path": dict(st["by_path"]),
            }

    async def _controller_loop(self) -> None:
        while True:
            delay = ctl.POLL_S
            try:
                self._record_metrics()
            except Exception as e:  # noqa: BLE001 — metrics never stop the sync
                log.debug("metrics: %s", e)
            try:
                got = await self._controller_call(
                    "sync", self.replica_id, self.controller_stats(), timeout_s=max(2.0, 2 * ctl.POLL_S)
                )
                self._apply_auto(got["routes"])
                self._apply_gone(set(got.get("gone") or ()))
                self.controller_sync["ok"] += 1
                self.controller_sync["last_ok"] = time.time()
                self.controller_sync["version"] = got.get("version")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 — no controller (yet), or it is restarting: keep the routes
                self.controller_sync["failed"] += 1
                self.controller_sync["last_error"] = f"{type(e).__name__}: {e}"[:300]
                delay = 5 * ctl.POLL_S if isinstance(e, ValueError) else ctl.POLL_S
            await asyncio.sleep(delay)

    async def set_auto_routes(self, routes: dict) -> dict:
        """The controller's routes as coderay's own choice, service by service (an invalid entry leaves its
        service's route as it was and is reported); pinned services keep their pins. Async: on the event loop
        that serves requests, like every route change."""
        return self._apply_auto(routes)

    def _apply_auto(self, routes: dict) -> dict:
        applied, rejected = {}, {}
        for svc, route in (routes or {}).items():
            current = self.router.auto.get(svc)
            if current is not None and current.to_dict() == {
                "path": route.get("path"),
                "coop_fraction": route.get("coop_fraction"),
            }:
                continue
            try:
                self.router.set_auto({svc: route})
                applied[svc] = route
            except CoderayError as e:
                rejected[svc] = e.reason
        if applied:
            log.info("controller routes applied: %s", applied)
        for svc, reason in rejected.items():
            log.warning("controller route for %s rejected: %s", svc, reason)
        return {"applied": applied, "rejected": rejected, "routes": self.router.snapshot()}
