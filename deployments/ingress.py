"""The HTTP ingress: decodes a request, picks the service's path, chains the replicas, answers.

The ingress holds one handle per block group. A path runs as a chain of `.remote()` calls, one per stage (its
hops on one node, `coderay.plan.stages`), in which each call receives the previous call's `DeploymentResponse` as
a top-level argument, so activations go from replica to replica (through Ray's object store) and only the final
logits come back here. Concurrent requests on one path share a chain (`deployments.merging.Merger`). Every chain is
bounded by `serving.request_timeout_s`; a cooperative path that fails (timeout, a dead replica, a lost node) is
answered on the local-only path with `"fallback": true`, and is then skipped (answered locally at once, still
marked as a fallback) for a cool-down (`serving.fallback_cooldown_s`, default `3 × request_timeout_s`, at least
10 s) before it is tried again, so a lost host costs one timeout, not one per request. coderay's domain errors
(unknown service, invalid route) become 404 / 422 here.

No `from __future__ import annotations` here: FastAPI reads the endpoint annotations (`Request`, the body model)
at run time through Serve's class-based view, where string annotations do not resolve.
"""

import asyncio
import logging
import math
import time
from typing import Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from coderay import controller as ctl
from coderay.config import CoderayConfig
from coderay.data import get_task
from coderay.emulation import cores_of
from coderay.errors import CoderayError
from coderay.paths import PathSpec, to_wire
from coderay.plan import crossings, plan_hops, stages
from coderay.routing import Router
from coderay.rows import Row

from deployments.blocks import latency_summary
from deployments.merging import Merger
from deployments.placement import direct_http_port
from deployments.routing import Activation
from deployments.schemas import (
    BINARY_TYPES, ApiError, ErrorBody, InferResponse, RouteInfo, RouteRequest, ServiceInfo, check_top_k,
    decode_binary, decode_json_body, format_validation, infer_openapi_body,
)

__all__ = ["Ingress", "api", "read_body"]

log = logging.getLogger(__name__)

api = FastAPI(
    title="coderay",
    version="1",
    description="Coordinated DNN services at the edge (CoDE) on Ray Serve: each service answers on its active "
                "path, local-only or through another provider's frozen blocks joined by trained links.",
)
_ERRORS = {404: {"model": ErrorBody}, 413: {"model": ErrorBody}, 415: {"model": ErrorBody},
           422: {"model": ErrorBody}, 503: {"model": ErrorBody}}


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(CoderayError)
async def _domain_error(request: Request, exc: CoderayError) -> JSONResponse:
    err = ApiError.of(exc)
    return JSONResponse(err.body(), status_code=err.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
    return JSONResponse({"error": format_validation(errors), "detail": errors}, status_code=422)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    reason = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and reason == "Not Found":
        reason = f"no route {request.method} {request.url.path}; the API is described at /docs"
    return JSONResponse({"error": reason}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as Content-Length or the bytes actually read exceed `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, f"Content-Length: not an integer ({declared!r})") from None
        if size > limit:
            raise ApiError(413, f"body of {size} bytes is above the limit of {limit} (serving.max_body_bytes); "
                                "send fewer samples per request", limit=limit)
    parts, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"body is above the limit of {limit} bytes (serving.max_body_bytes)", limit=limit)
        parts.append(chunk)
    return b"".join(parts)


class HostGone(RuntimeError):
    """A path's call through a node that the controller reports gone."""


async def _resolve(response: Any) -> Any:
    return await response


def _clean(value: Any) -> Any:
    """JSON-safe table values: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_safe(value: Any) -> Any:
    """Nested dicts/lists with non-finite floats as null and anything else JSON lacks as a string."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return _clean(value)
    return str(value)


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP front of every service; owns the routing state (active path, cooperative share)."""

    def __init__(self, cfg: CoderayConfig, rows: list[Row], blocks: dict):
        self.cfg = cfg
        self.rows = rows
        self.router = Router(cfg, rows)
        self.tasks = {s.name: get_task(s.task, data_root=cfg.data_root, seed=cfg.seed) for s in cfg.services}
        self.blocks = {name: h.options(method_name="run") for name, h in blocks.items()}
        self._info_handles = [h.options(method_name="info") for h in blocks.values()]
        self.mergers: dict[str, Merger] = {}
        self._direct_port: int | None = None
        self.stats = {s.name: {"requests": 0, "samples": 0, "fallbacks": 0, "latency_s": 0.0, "by_path": {}}
                      for s in cfg.services}
        self.suspended: dict[str, float] = {}   # path id -> time.monotonic() until which it is skipped
        self.gone: set[str] = set()             # nodes the controller reports gone: their guests' calls fail fast
        self._gone_watch: dict[str, asyncio.Future] = {}   # node -> resolved when it is reported gone
        self._plans: dict[str, tuple] = {}
        self.config_errors: dict[str, str] = {}  # the last reconfigure's rejected entries
        cooldown = cfg.serving.fallback_cooldown_s
        self.cooldown_s = max(10.0, 3 * cfg.serving.request_timeout_s) if cooldown is None else cooldown
        self._controller_init()

    # ------------------------------------------------------------------ routing (config deploys, controller)

    async def reconfigure(self, user_config: dict) -> dict:
        """`user_config = {"routes": {svc: {"path": id, "coop_fraction": f}}}`. Serve calls this on a config deploy
        (in place, no restart). The routes named are pinned, as by PUT; services not named keep their route.

        Never raises: Serve stops a replica whose reconfigure raises, and its replacement would fail the same way,
        leaving no ingress. An invalid entry is rejected (its service keeps its route) and reported in the
        result, in the log and under `config_errors` of GET /healthz. Async: it runs on the event loop that serves
        requests, so a switch never interleaves with a request reading the routes."""
        routes = (user_config or {}).get("routes", {}) if isinstance(user_config, dict) else user_config
        applied, rejected = {}, {}
        if not isinstance(routes, dict):
            rejected["*"] = f"user_config.routes: expected a mapping service -> {{path, coop_fraction}}, got {routes!r}"
        else:
            for svc, route in routes.items():
                try:
                    self.router.apply({svc: route})
                    applied[svc] = self.router.routes[svc].to_dict()
                except CoderayError as e:
                    rejected[svc] = f"user_config.routes.{svc}: {e.reason}"
        self.config_errors = rejected
        for reason in rejected.values():
            log.error("%s (the previous route stays)", reason)
        log.info("routes: %s", self.router.snapshot())
        return {"applied": applied, "rejected": rejected, "routes": self.router.snapshot()}

    async def get_routes(self) -> dict:
        return self.router.snapshot()

    # ------------------------------------------------------------------ HTTP

    @api.get("/healthz", summary="liveness")
    async def healthz(self) -> dict:
        """`direct_http_port`: where this ingress replica also answers HTTP itself, without the proxy (Serve's
        throughput-optimized mode, `serving.throughput_optimized`), or null."""
        if self._direct_port is None:
            self._direct_port = direct_http_port()    # kept once found (the server may start after the replica)
        return {"status": "ok", "services": self.router.services, "config_errors": self.config_errors,
                "direct_http_port": self._direct_port}

    @api.get("/v1/services", response_model=list[ServiceInfo], summary="every service and its active route")
    async def services(self) -> list[dict]:
        out = []
        for s in self.cfg.services:
            task, route = self.tasks[s.name], self.router.routes[s.name]
            out.append({"name": s.name, "task": s.task, "classes": list(task.class_names),
                        "input_shape": list(task.input_shape), "node": s.node, "guest_quota": s.guest_quota,
                        "batch_size": s.batch_size, "active_path": route.path.id,
                        "coop_fraction": route.coop_fraction, "pinned": self.router.is_pinned(s.name),
                        "stats": self.stats[s.name] | {"suspended_paths": self._suspended_paths(s.name)}})
        return out

    def _suspended_paths(self, svc: str) -> dict[str, float]:
        """Cooperative paths of `svc` skipped after a failure, with the seconds left of their cool-down."""
        now = time.monotonic()
        return {p: round(t - now, 1) for p, t in self.suspended.items() if t > now and p.startswith(f"{svc}:")}

    @api.get("/v1/services/{svc}/paths", responses=_ERRORS, summary="the reward table rows of a service")
    async def paths(self, svc: str) -> dict:
        self.router.check_service(svc)
        route = self.router.routes[svc]
        mine = [r for r in self.rows if r.local == svc]
        rows = [{k: _clean(v) for k, v in r.to_dict().items()} | {
                    "active": r.path_id == route.path.id, "servable": r.kind == "local" or bool(r.links_file)}
                for r in mine if r.is_path]
        if not any(r["active"] for r in rows):  # a service without a table still runs local-only
            rows.insert(0, {"path_id": PathSpec.local_only(svc).id, "local": svc, "kind": "local", "active": True,
                            "servable": True})
        baselines = [{k: _clean(v) for k, v in r.to_dict().items()} for r in mine if not r.is_path]
        return {"service": svc, "active_path": route.path.id, "coop_fraction": route.coop_fraction,
                "pinned": self.router.is_pinned(svc), "paths": rows, "baselines": baselines}

    @api.get("/v1/services/{svc}/route", response_model=RouteInfo, responses=_ERRORS, summary="the active route")
    async def get_route(self, svc: str) -> dict:
        self.router.check_service(svc)
        return self._route_info(svc)

    @api.put("/v1/services/{svc}/route", response_model=RouteInfo, responses=_ERRORS,
             summary="pin the active path and the cooperative share, live, until DELETE releases it")
    async def put_route(self, svc: str, body: RouteRequest) -> dict:
        self.router.check_service(svc)
        self.router.apply({svc: body.model_dump(exclude_none=True)})
        log.info("route %s pinned -> %s", svc, self.router.routes[svc].to_dict())
        return self._route_info(svc)

    @api.delete("/v1/services/{svc}/route", response_model=RouteInfo, responses=_ERRORS,
                summary="release a pinned route: the service answers on coderay's own choice again")
    async def delete_route(self, svc: str) -> dict:
        self.router.release(svc)
        log.info("route %s released -> %s", svc, self.router.routes[svc].to_dict())
        return self._route_info(svc)

    def _route_info(self, svc: str) -> dict:
        r = self.router.routes[svc]
        return {"service": svc, "path": r.path.id, "path_kind": r.path.kind, "coop_fraction": r.coop_fraction}

    @api.post("/v1/services/{svc}/infer", response_model=InferResponse, responses=_ERRORS,
              openapi_extra=infer_openapi_body(), summary="classify a batch on the service's active path")
    async def infer(self, svc: str, request: Request,
                    top_k: int | None = Query(None, ge=1, description="classes per sample (default 3)")
                    ) -> JSONResponse:
        self.router.check_service(svc)
        serving, task = self.cfg.serving, self.tasks[svc]
        raw = await read_body(request, serving.max_body_bytes)
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype in BINARY_TYPES:
            x01, body_k = decode_binary(raw, request.headers, task.input_shape,
                                        max_samples=serving.max_request_samples), None
        elif ctype in ("", "application/json", "text/json") or ctype.endswith("+json"):
            x01, body_k = decode_json_body(raw, task.input_shape, max_samples=serving.max_request_samples)
        else:
            raise ApiError(415, f"Content-Type {ctype!r} not supported: send application/json "
                                "({'inputs': ...} or {'images': ...}) or application/octet-stream with X-Shape")
        k = check_top_k(top_k if top_k is not None else body_k, task.num_classes)
        start = time.perf_counter()
        spec, fallback, out = await self.answer(svc, task.normalize(x01))
        latency_ms = (time.perf_counter() - start) * 1e3
        stats = self.stats[svc]
        stats["requests"] += 1
        stats["samples"] += len(x01)
        stats["fallbacks"] += fallback
        stats["latency_s"] += latency_ms / 1e3
        stats["by_path"][spec.id] = stats["by_path"].get(spec.id, 0) + 1
        self._latencies[svc].append(latency_ms)
        probs = torch.softmax(out.x.float(), dim=1)
        top_p, top_i = probs.topk(k, dim=1)
        names = task.class_names
        preds = [{"class_index": int(i[0]), "class_name": names[int(i[0])], "prob": float(p[0]),
                  "top_k": [{"class_index": int(c), "class_name": names[int(c)], "prob": float(q)}
                            for c, q in zip(i.tolist(), p.tolist())]}
                 for p, i in zip(top_p, top_i)]
        return JSONResponse({
            "service": svc, "path": spec.id, "path_kind": spec.kind, "fallback": fallback,
            "latency_ms": round(latency_ms, 3), "samples": len(x01), "predictions": preds,
            "network": {"emulated": serving.emulate_network, "cross_node_hops": out.hops,
                        "delay_ms": round(out.delay_ms, 3), "wire_bytes": out.wire_bytes}})

    @api.get("/v1/debug/replicas", summary="where each replica runs (asked from inside it) and its batching figures")
    async def replicas(self) -> dict:
        infos = await asyncio.gather(*(asyncio.wait_for(_resolve(h.remote()), self.cfg.serving.request_timeout_s)
                                       for h in self._info_handles), return_exceptions=True)
        import os

        import ray

        return {"replicas": [i if isinstance(i, dict) else {"error": repr(i)} for i in infos],
                "ingress": {"pid": os.getpid(), "cores": cores_of(),
                            "node_id": ray.get_runtime_context().get_node_id(),
                            "merged": {p: dict(m.stats) for p, m in self.mergers.items()}},
                "routes": self.router.snapshot(), "config_errors": self.config_errors}

    # ------------------------------------------------------------------ the controller (coderay.controller)
    # Each replica pulls: every POLL_S seconds one call hands the controller this replica's figures and brings
    # back the routes it chose, applied as coderay's own choice (pins stay). Nothing on the request path waits
    # on it; while the controller is down the replica keeps its last routes.

    def _controller_init(self) -> None:
        import collections
        import uuid

        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 — outside Serve (tests)
            self.replica_id = uuid.uuid4().hex[:8]
        self._latencies = {s.name: collections.deque(maxlen=512) for s in self.cfg.services}
        self.controller_sync = {"ok": 0, "failed": 0, "last_ok": None, "last_error": None, "version": None}
        self._controller_task = None
        self._controller_actor = None
        self._ensure_controller_sync()

    def _ensure_controller_sync(self) -> None:
        if self._controller_task is not None and not self._controller_task.done():
            return
        try:
            self._controller_task = asyncio.get_running_loop().create_task(self._controller_loop())
        except RuntimeError:   # no loop yet: the next health check starts it
            self._controller_task = None

    async def check_health(self) -> None:
        """Serve's periodic health check: also (re)starts the controller sync if it is not running."""
        self._ensure_controller_sync()

    def controller_stats(self) -> dict:
        """This replica's cumulative figures per service, as the controller reads them."""
        out = {}
        for svc, st in self.stats.items():
            lat = latency_summary(self._latencies[svc])
            out[svc] = {"requests": st["requests"], "samples": st["samples"], "fallbacks": st["fallbacks"],
                        "latency_s": st["latency_s"], "by_path": dict(st["by_path"]), "p50_ms": lat["p50_ms"],
                        "p99_ms": lat["p99_ms"], "suspended_paths": self._suspended_paths(svc)}
        return {"replica_id": self.replica_id, "services": out, "pinned": sorted(self.router.pinned),
                "routes": self.router.snapshot()}

    async def _controller_call(self, method: str, *args, timeout_s: float) -> Any:
        import ray

        loop = asyncio.get_running_loop()
        if self._controller_actor is None:
            self._controller_actor = await loop.run_in_executor(None, ctl.get_controller)
        try:
            ref = getattr(self._controller_actor, method).remote(*args)
            return await asyncio.wait_for(ref, timeout_s)
        except (asyncio.TimeoutError, ray.exceptions.RayActorError):
            self._controller_actor = None   # look it up again next time (it may have been replaced)
            raise

    def _metrics_init(self) -> None:
        """Prometheus metrics through Ray (`ray.serve.metrics` adds deployment/replica/application tags),
        exported by every node's metrics agent; updated from the stats once a second, off the request path."""
        from ray.serve import metrics

        tags = ("service", "path")
        self._metrics = {
            "requests": metrics.Counter("coderay_requests", description="requests answered, by service and path",
                                        tag_keys=tags),
            "samples": metrics.Counter("coderay_samples", description="samples answered, by service",
                                       tag_keys=("service",)),
            "fallbacks": metrics.Counter("coderay_fallbacks", description="requests answered on the local-only "
                                         "path after their path failed", tag_keys=("service",)),
            "latency": metrics.Histogram("coderay_latency_ms", description="request latency in the ingress (ms)",
                                         boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000],
                                         tag_keys=("service",)),
            "share": metrics.Gauge("coderay_coop_share", description="cooperative share of the active route",
                                   tag_keys=tags),
        }
        self._metrics_prev: dict = {}

    def _record_metrics(self) -> None:
        if getattr(self, "_metrics", None) is None:
            self._metrics_init()
        m, prev = self._metrics, self._metrics_prev
        for svc, st in self.stats.items():
            p = prev.setdefault(svc, {"samples": 0, "fallbacks": 0, "requests": 0, "by_path": {}})
            for key in ("samples", "fallbacks"):
                if st[key] > p[key]:
                    m[key].inc(st[key] - p[key], tags={"service": svc})
            for path, n in st["by_path"].items():
                if n > p["by_path"].get(path, 0):
                    m["requests"].inc(n - p["by_path"].get(path, 0), tags={"service": svc, "path": path})
            new = min(st["requests"] - p["requests"], len(self._latencies[svc]))
            for ms in list(self._latencies[svc])[len(self._latencies[svc]) - new:] if new > 0 else []:
                m["latency"].observe(ms, tags={"service": svc})
            route = self.router.routes[svc]
            m["share"].set(route.coop_fraction, tags={"service": svc, "path": route.path.id})
            prev[svc] = {"samples": st["samples"], "fallbacks": st["fallbacks"], "requests": st["requests"],
                         "by_path": dict(st["by_path"])}

    async def _controller_loop(self) -> None:
        while True:
            delay = ctl.POLL_S
            try:
                self._record_metrics()
            except Exception as e:  # noqa: BLE001 — metrics never stop the sync
                log.debug("metrics: %s", e)
            try:
                got = await self._controller_call("sync", self.replica_id, self.controller_stats(),
                                                  timeout_s=max(2.0, 2 * ctl.POLL_S))
                self._apply_auto(got["routes"])
                self._apply_gone(set(got.get("gone") or ()))
                self.controller_sync.update(ok=self.controller_sync["ok"] + 1, last_ok=time.time(),
                                            version=got.get("version"))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 — no controller (yet), or it is restarting: keep the routes
                self.controller_sync.update(failed=self.controller_sync["failed"] + 1,
                                            last_error=f"{type(e).__name__}: {e}"[:300])
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
            if current is not None and current.to_dict() == {"path": route.get("path"),
                                                             "coop_fraction": route.get("coop_fraction")}:
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

    @api.get("/v1/controller", responses={503: {"model": ErrorBody}},
             summary="the controller's live table: routes, shares, queues and its last decisions with reasons")
    async def controller(self) -> JSONResponse:
        try:
            status = await self._controller_call("status", timeout_s=5.0)
        except Exception as e:  # noqa: BLE001
            reason = "no controller is running (started by `coderay up`/`serve` unless --no-controller)" \
                if isinstance(e, ValueError) else f"the controller did not answer ({type(e).__name__})"
            return JSONResponse({"error": reason, "ingress": {"replica_id": self.replica_id,
                                                              "routes": self.router.snapshot(),
                                                              "sync": self.controller_sync}}, status_code=503)
        status["ingress"] = {"replica_id": self.replica_id, "routes": self.router.snapshot(),
                             "pinned": sorted(self.router.pinned), "sync": self.controller_sync}
        return JSONResponse(_json_safe(status))

    # ------------------------------------------------------------------ running a path

    async def answer(self, svc: str, x: torch.Tensor) -> tuple[PathSpec, bool, Activation]:
        """(path used, fell back?, output activation) for the model input `x` of service `svc`."""
        spec = self.router.choose(svc)
        if spec.kind == "local" or self.suspended.get(spec.id, 0.0) <= time.monotonic():
            try:
                out = await self.run_merged(svc, spec, x)
                self.suspended.pop(spec.id, None)
                return spec, False, out
            except Exception as exc:  # noqa: BLE001 — any failure of a cooperative path falls back
                if spec.kind == "local":
                    raise self._unavailable(svc, spec, exc) from None
                self.suspended[spec.id] = time.monotonic() + self.cooldown_s
                log.warning("%s: path %s failed (%s: %s); answering on the local-only path and skipping it for "
                            "%.0f s", svc, spec.id, type(exc).__name__, exc, self.cooldown_s)
        local = PathSpec.local_only(svc)
        try:
            return local, True, await self.run_merged(svc, local, x)
        except Exception as exc:  # noqa: BLE001
            raise self._unavailable(svc, local, exc) from None

    def plan(self, spec: PathSpec) -> tuple[list[tuple], str | None, list[str | None]]:
        """(stages, wire encoding of the input, wire encoding of each stage's output): the path's plan with its
        placement from the reward table, its hops grouped into one call per node visited; `None` where the next
        stage runs on the same node. Cached per path."""
        if spec.id not in self._plans:
            row = self.router.rows.get(spec.id)
            link_out, encoding = (row.link_out_on or "host", row.encoding) if row is not None else ("host", "float32")
            hops = plan_hops(spec, link_out=link_out)
            cross = {i for i, _, _ in crossings(spec, link_out=link_out)}
            runs = stages(hops)
            ends = [sum(map(len, runs[:k + 1])) for k in range(len(runs))]   # hop index after each stage
            sends = [encoding if end in cross else None for end in ends]
            self._plans[spec.id] = (runs, encoding if 0 in cross else None, sends)
        return self._plans[spec.id]

    async def run_merged(self, svc: str, spec: PathSpec, x: torch.Tensor) -> Activation:
        """`x` on the path, in one chain with the path's other concurrent requests (`serving.merge_requests`)."""
        if not self.cfg.serving.merge_requests:
            return await self.run_path(svc, spec, x)
        merger = self.mergers.get(spec.id)
        if merger is None:
            b = min(self.cfg.service(svc).batch_size, self.cfg.serving.max_batch_size)
            merger = self.mergers[spec.id] = Merger(lambda batch: self.run_path(svc, spec, batch), max_samples=b,
                                                    depth=len(self.plan(spec)[0]) + 1)
        return await merger.submit(x)

    async def run_path(self, svc: str, spec: PathSpec, x: torch.Tensor) -> Activation:
        """Chain the path's replica calls, one per stage, each taking the previous response; await the last.
        A call through another service's node ends as soon as the controller reports that node gone (a crashed
        node's calls would otherwise hang until the timeout), so its requests fall back at once."""
        runs, first_send, sends = self.plan(spec)
        home = self.cfg.service(svc).node
        away = {self.cfg.service(run[0].service).node for run in runs} - {home}
        if away & self.gone:
            raise HostGone(f"{spec.id}: node {sorted(away & self.gone)[0]} is gone (the controller says so)")
        response: Any = Activation(to_wire(x, first_send) if first_send else x, home)
        for run, send in zip(runs, sends):
            response = self.blocks[run[0].service].remote(response, run, send)
        call = asyncio.ensure_future(_resolve(response))
        watch = [self._gone_future(n) for n in away]
        try:
            done, _ = await asyncio.wait([call, *watch], timeout=self.cfg.serving.request_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if call in done:
                return call.result()
        finally:
            if not call.done():       # timed out, node gone, or this request cancelled: stop the chain
                response.cancel()
                call.cancel()
        lost = [w.result() for w in watch if w in done]
        if lost:
            raise HostGone(f"{spec.id}: node {lost[0]} gone while the call was in flight (the controller says so)")
        raise asyncio.TimeoutError(f"no answer within {self.cfg.serving.request_timeout_s:g} s")

    def _gone_future(self, node: str) -> asyncio.Future:
        """Resolved (with the node's name) when the controller reports `node` gone; one per node, shared."""
        future = self._gone_watch.get(node)
        if future is None:
            future = self._gone_watch[node] = asyncio.get_running_loop().create_future()
        return future

    def _apply_gone(self, gone: set[str]) -> None:
        """The controller's view of lost nodes: calls in flight through a newly lost one end now."""
        for node in gone - self.gone:
            watch = self._gone_watch.pop(node, None)
            if watch is not None and not watch.done():
                watch.set_result(node)
            log.warning("node %s reported gone by the controller: guests' calls through it fall back", node)
        self.gone = gone

    def _unavailable(self, svc: str, spec: PathSpec, exc: BaseException) -> ApiError:
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            return ApiError(504, f"service {svc!r}: path {spec.id} gave no answer within "
                                 f"{self.cfg.serving.request_timeout_s:g} s (serving.request_timeout_s)")
        return ApiError(503, f"service {svc!r}: path {spec.id} is unavailable ({type(exc).__name__})")
