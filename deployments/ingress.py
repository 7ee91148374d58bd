"""The HTTP surface: routes, API keys, request bodies read and decoded, every refusal a JSON 4xx/5xx.

`Ingress` is the Serve deployment every HTTP request enters: it decodes a request, asks the `Router` for the
service's path and has it run (`deployments.chains.PathRunner`: the chain of replica calls, deadline, retries,
fallback), while `deployments.sync.ControllerSync` keeps its routes in step with the controller. coderay's
domain errors (unknown service, invalid route) become 404 / 422 here.

Bad input is never a 500: every refusal is `{"error": reason, ...}` with a 4xx. An infer body is refused before it
is buffered when it is above `serving.max_body_bytes` (413) or when the bodies in flight in this replica would pass
`serving.max_inflight_bytes` (503 with Retry-After; 413 for one that could never fit); bodies above
`INLINE_DECODE_BYTES` are decoded (JSON parsing, numpy, PNG) on a small thread pool rather than on the event loop
that every other request of this replica runs on. PNG decoding and numpy's checks release the GIL there; Python's
JSON parser does not, so a large JSON body still holds the interpreter while it is parsed (~40 ms per MB on this
machine): large batches belong in the binary encoding.

No `from __future__ import annotations` here: FastAPI reads the endpoint annotations (`Request`, the body model)
at run time through Serve's class-based view, where string annotations do not resolve.
"""

import asyncio
import collections
import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from coderay.auth import Denied, KeyRing
from coderay.config import CoderayConfig
from coderay.data import get_task
from coderay.emulation import cores_of
from coderay.errors import CoderayError
from coderay.pathspec import PathSpec
from coderay.routing import Router
from coderay.rows import Row
from deployments.chains import PathRunner, resolve
from deployments.placement import direct_http_port
from deployments.schemas import (
    ApiError,
    ErrorBody,
    InferResponse,
    RouteInfo,
    RouteRequest,
    ServiceInfo,
    body_kind,
    check_top_k,
    decode_body,
    echo,
    format_validation,
    infer_openapi_body,
)
from deployments.sync import ControllerSync

__all__ = ["Ingress", "api", "read_body", "InflightBytes", "Claim", "decode_request", "INLINE_DECODE_BYTES"]

log = logging.getLogger(__name__)

INLINE_DECODE_BYTES = 32 * 2**10  # bodies up to this size decode on the event loop: a thread hop costs more
DECODE_THREADS = 2  # decoding threads per ingress replica (bounds the memory decoding holds too)
MAX_HEADER_BYTES = 16 * 2**10  # request headers past these (HAProxy's own limits, tune.bufsize and maxhdr) get
MAX_HEADERS = 100  # a 431 on the direct port too, whose server takes headers of any size

api = FastAPI(
    title="coderay",
    version="1",
    description="Coordinated DNN services at the edge (CoDE) on Ray Serve: each service answers on its active "
    "path, local-only or through another provider's frozen blocks joined by trained links.",
)
_ERRORS: dict[int | str, dict[str, Any]] = {  # FastAPI's `responses`: status -> OpenAPI response fields
    401: {"model": ErrorBody},
    403: {"model": ErrorBody},
    404: {"model": ErrorBody},
    413: {"model": ErrorBody},
    415: {"model": ErrorBody},
    422: {"model": ErrorBody},
    503: {"model": ErrorBody},
}


class ErrorJSON(JSONResponse):
    """Error bodies as ASCII JSON: a reason may quote the client's own text, and a lone surrogate in it (valid in
    a JSON string escape) cannot be encoded as UTF-8, which would turn the refusal into a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(_json_safe(content), ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode(
            "ascii"
        )


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return ErrorJSON(exc.body(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(CoderayError)
async def _domain_error(request: Request, exc: CoderayError) -> JSONResponse:
    err = ApiError.of(exc)
    return ErrorJSON(err.body(), status_code=err.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()[:20]]
    return ErrorJSON({"error": format_validation(errors), "detail": errors}, status_code=422)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    reason = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and reason == "Not Found":
        reason = f"no route {request.method} {echo(request.url.path)}; the API is described at /docs"
    return ErrorJSON({"error": reason}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


class HeaderBound:
    """ASGI middleware: a request whose headers pass `MAX_HEADER_BYTES` or `MAX_HEADERS` gets a 431 JSON refusal
    before any route runs. Serve's front (HAProxy) refuses such requests itself; the ingress replica's direct
    HTTP port does not, so without this the app would parse headers of any size."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        headers = (scope.get("headers") or ()) if scope["type"] == "http" else ()
        size = sum(len(k) + len(v) + 4 for k, v in headers)
        if size > MAX_HEADER_BYTES or len(headers) > MAX_HEADERS:
            reason = (
                f"request headers too large: {len(headers)} headers, {size} bytes; the limit is "
                f"{MAX_HEADERS} headers and {MAX_HEADER_BYTES} bytes"
            )
            await ErrorJSON({"error": reason}, status_code=431)(scope, receive, send)
            return
        await self.app(scope, receive, send)


api.add_middleware(HeaderBound)


class InflightBytes:
    """The request bodies one ingress replica holds at once, bounded by `limit` (`serving.max_inflight_bytes`).

    A body is counted from its Content-Length before any of it is read (else chunk by chunk as it arrives) and
    stays counted until its request is answered, since its decoded batch lives that long. One that would pass the
    bound is refused instead of buffered: 503 with Retry-After while others hold the room, 413 when it alone is
    above the bound. Only the replica's event loop touches the count, so it needs no lock."""

    def __init__(self, limit: int):
        self.limit, self.held, self.refused = limit, 0, 0

    @contextlib.contextmanager
    def claim(self) -> Iterator["Claim"]:
        """A request's share of the bound, given back when the block exits, however it exits."""
        claim = Claim(self)
        try:
            yield claim
        finally:
            self.held -= claim.bytes

    def take(self, claim: "Claim", n: int) -> None:
        if claim.bytes + n > self.limit:
            raise ApiError(
                413,
                f"body of {claim.bytes + n} bytes is above the {self.limit} bytes this ingress "
                "holds for all requests in flight (serving.max_inflight_bytes); send fewer samples "
                "per request",
                limit=self.limit,
            )
        if self.held + n > self.limit:
            self.refused += 1
            raise ApiError(
                503,
                f"the ingress holds {self.held} bytes of request bodies in flight; {n} more would "
                f"pass its bound of {self.limit} (serving.max_inflight_bytes): retry shortly",
                headers={"Retry-After": "1"},
                limit=self.limit,
            )
        self.held += n
        claim.bytes += n


class Claim:
    """The bytes one request holds of an `InflightBytes` bound."""

    def __init__(self, bound: InflightBytes):
        self.bound, self.bytes = bound, 0

    def cover(self, total: int) -> None:
        """Hold at least `total` bytes (the body read so far)."""
        if total > self.bytes:
            self.bound.take(self, total - self.bytes)


async def read_body(request: Request, limit: int, claim: Claim | None = None) -> bytes:
    """The body, refused with 413 as soon as Content-Length or the bytes actually read exceed `limit`; with a
    `claim`, each byte is claimed before it is buffered (Content-Length's worth at once, when declared)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, f"Content-Length: not an integer ({echo(declared)})") from None
        if size < 0:
            raise ApiError(400, f"Content-Length: negative ({size})")
        if size > limit:
            raise ApiError(
                413,
                f"body of {size} bytes is above the limit of {limit} (serving.max_body_bytes); "
                "send fewer samples per request",
                limit=limit,
            )
        if claim is not None:
            claim.cover(size)
    parts, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ApiError(413, f"body is above the limit of {limit} bytes (serving.max_body_bytes)", limit=limit)
            if claim is not None:
                claim.cover(total)
            parts.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "the client closed the connection before the whole body arrived") from None
    return b"".join(parts)


async def decode_request(
    raw: bytes,
    kind: str,
    headers: Mapping[str, str],
    input_shape: tuple[int, ...],
    *,
    max_samples: int,
    executor: Executor | None,
) -> tuple[torch.Tensor, int | None]:
    """`decode_body` off the event loop (on `executor`) for a body above `INLINE_DECODE_BYTES`, so the loop goes on
    serving the replica's other requests wherever decoding releases the GIL; small ones decode in place."""
    decode = functools.partial(decode_body, raw, kind, headers, input_shape, max_samples=max_samples)
    if len(raw) <= INLINE_DECODE_BYTES:
        return decode()
    return await asyncio.get_running_loop().run_in_executor(executor, decode)


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
class Ingress(PathRunner, ControllerSync):
    """HTTP front of every service; owns the routing state (active path, cooperative share) and the request figures.
    Paths run through `PathRunner`, the controller is kept in step by `ControllerSync`: one concern per module."""

    def __init__(self, cfg: CoderayConfig, rows: list[Row], blocks: dict, keys: dict | None = None):
        self.cfg = cfg
        self.rows = rows
        self.keys = KeyRing.from_args(keys) if keys else KeyRing(False)  # digests only (coderay.auth)
        self.router = Router(cfg, rows)
        self.tasks = {s.name: get_task(s.task, data_root=cfg.data_root, seed=cfg.seed) for s in cfg.services}
        self._info_handles = [h.options(method_name="info") for h in blocks.values()]
        self._direct_port: int | None = None
        self.stats = {
            s.name: {"requests": 0, "samples": 0, "fallbacks": 0, "retries": 0, "latency_s": 0.0, "by_path": {}}
            for s in cfg.services
        }
        self._latencies = {s.name: collections.deque(maxlen=512) for s in cfg.services}
        self.config_errors: dict[str, str] = {}  # the last reconfigure's rejected entries
        self.inflight = InflightBytes(cfg.serving.max_inflight_bytes)
        self._decoder = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="coderay-decode")
        self._runner_init(blocks)
        self._controller_init()

    # ------------------------------------------------------------------ routing (config deploys)

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

    def _allow(self, request: Request, action: str, svc: str | None = None) -> None:
        """The request's API key allows `action` (coderay.auth), else 401 (no or unknown key) or 403."""
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key")
        try:
            self.keys.check(key, action, svc)
        except Denied as e:
            raise ApiError(
                e.status, e.reason, headers={"WWW-Authenticate": "Bearer"} if e.status == 401 else None
            ) from None

    @api.get("/healthz", summary="liveness")
    async def healthz(self) -> dict:
        """`direct_http_port`: where this ingress replica also answers HTTP itself, without the proxy (Serve's
        throughput-optimized mode, `serving.throughput_optimized`), or null."""
        if self._direct_port is None:
            self._direct_port = direct_http_port()  # kept once found (the server may start after the replica)
        return {
            "status": "ok",
            "services": self.router.services,
            "config_errors": self.config_errors,
            "direct_http_port": self._direct_port,
        }

    @api.get("/v1/services", response_model=list[ServiceInfo], summary="every service and its active route")
    async def services(self, request: Request) -> list[dict]:
        self._allow(request, "read")
        out = []
        for s in self.cfg.services:
            task, route = self.tasks[s.name], self.router.routes[s.name]
            out.append(
                {
                    "name": s.name,
                    "task": s.task,
                    "classes": list(task.class_names),
                    "input_shape": list(task.input_shape),
                    "node": s.node,
                    "guest_quota": s.guest_quota,
                    "batch_size": s.batch_size,
                    "active_path": route.path.id,
                    "coop_fraction": route.coop_fraction,
                    "pinned": self.router.is_pinned(s.name),
                    "stats": self.stats[s.name] | {"suspended_paths": self._suspended_paths(s.name)},
                }
            )
        return out

    @api.get("/v1/services/{svc}/paths", responses=_ERRORS, summary="the reward table rows of a service")
    async def paths(self, svc: str, request: Request) -> dict:
        self._allow(request, "read")
        self.router.check_service(svc)
        route = self.router.routes[svc]
        mine = [r for r in self.rows if r.local == svc]
        rows = [
            {k: _clean(v) for k, v in r.to_dict().items()}
            | {"active": r.path_id == route.path.id, "servable": r.kind == "local" or bool(r.links_file)}
            for r in mine
            if r.is_path
        ]
        if not any(r["active"] for r in rows):  # a service without a table still runs local-only
            rows.insert(
                0,
                {
                    "path_id": PathSpec.local_only(svc).id,
                    "local": svc,
                    "kind": "local",
                    "active": True,
                    "servable": True,
                },
            )
        baselines = [{k: _clean(v) for k, v in r.to_dict().items()} for r in mine if not r.is_path]
        return {
            "service": svc,
            "active_path": route.path.id,
            "coop_fraction": route.coop_fraction,
            "pinned": self.router.is_pinned(svc),
            "paths": rows,
            "baselines": baselines,
        }

    @api.get("/v1/services/{svc}/route", response_model=RouteInfo, responses=_ERRORS, summary="the active route")
    async def get_route(self, svc: str, request: Request) -> dict:
        self._allow(request, "read")
        self.router.check_service(svc)
        return self._route_info(svc)

    @api.put(
        "/v1/services/{svc}/route",
        response_model=RouteInfo,
        responses=_ERRORS,
        summary="pin the active path and the cooperative share, live, until DELETE releases it",
    )
    async def put_route(self, svc: str, body: RouteRequest, request: Request) -> dict:
        self._allow(request, "operate")
        self.router.check_service(svc)
        self.router.apply({svc: body.model_dump(exclude_none=True)})
        log.info("route %s pinned -> %s", svc, self.router.routes[svc].to_dict())
        return self._route_info(svc)

    @api.delete(
        "/v1/services/{svc}/route",
        response_model=RouteInfo,
        responses=_ERRORS,
        summary="release a pinned route: the service answers on coderay's own choice again",
    )
    async def delete_route(self, svc: str, request: Request) -> dict:
        self._allow(request, "operate")
        self.router.release(svc)
        log.info("route %s released -> %s", svc, self.router.routes[svc].to_dict())
        return self._route_info(svc)

    def _route_info(self, svc: str) -> dict:
        r = self.router.routes[svc]
        return {"service": svc, "path": r.path.id, "path_kind": r.path.kind, "coop_fraction": r.coop_fraction}

    @api.post(
        "/v1/services/{svc}/infer",
        response_model=InferResponse,
        responses=_ERRORS,
        openapi_extra=infer_openapi_body(),
        summary="classify a batch on the service's active path",
    )
    async def infer(
        self,
        svc: str,
        request: Request,
        top_k: int | None = Query(None, ge=1, description="classes per sample (default 3)"),
    ) -> JSONResponse:
        self._allow(request, "infer", svc)
        self.router.check_service(svc)
        kind = body_kind(request.headers.get("content-type"))
        with self.inflight.claim() as claim:
            return await self._infer(svc, request, kind, top_k, claim)

    async def _infer(self, svc: str, request: Request, kind: str, top_k: int | None, claim: Claim) -> JSONResponse:
        serving, task = self.cfg.serving, self.tasks[svc]
        deadline = time.monotonic() + serving.request_timeout_s  # the request's one deadline, from arrival
        raw = await read_body(request, serving.max_body_bytes, claim)
        x01, body_k = await decode_request(
            raw,
            kind,
            request.headers,
            task.input_shape,
            max_samples=serving.max_request_samples,
            executor=self._decoder,
        )
        del raw
        k = check_top_k(top_k if top_k is not None else body_k, task.num_classes)
        start = time.perf_counter()
        spec, fallback, out = await self.answer(svc, task.normalize(x01), deadline)
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
        preds = [
            {
                "class_index": int(i[0]),
                "class_name": names[int(i[0])],
                "prob": float(p[0]),
                "top_k": [
                    {"class_index": int(c), "class_name": names[int(c)], "prob": float(q)}
                    for c, q in zip(i.tolist(), p.tolist())
                ],
            }
            for p, i in zip(top_p, top_i)
        ]
        return JSONResponse(
            {
                "service": svc,
                "path": spec.id,
                "path_kind": spec.kind,
                "fallback": fallback,
                "latency_ms": round(latency_ms, 3),
                "samples": len(x01),
                "predictions": preds,
                "network": {
                    "emulated": serving.emulate_network,
                    "cross_node_hops": out.hops,
                    "delay_ms": round(out.delay_ms, 3),
                    "wire_bytes": out.wire_bytes,
                },
            }
        )

    @api.get("/v1/debug/replicas", summary="where each replica runs (asked from inside it) and its batching figures")
    async def replicas(self, request: Request) -> dict:
        self._allow(request, "operate")
        infos = await asyncio.gather(
            *(asyncio.wait_for(resolve(h.remote()), self.cfg.serving.request_timeout_s) for h in self._info_handles),
            return_exceptions=True,
        )
        import os

        import ray

        return {
            "replicas": [i if isinstance(i, dict) else {"error": repr(i)} for i in infos],
            "ingress": {
                "pid": os.getpid(),
                "cores": cores_of(),
                "node_id": ray.get_runtime_context().get_node_id(),
                "merged": {p: dict(m.stats) for p, m in self.mergers.items()},
                "inflight_bytes": {
                    "held": self.inflight.held,
                    "limit": self.inflight.limit,
                    "refused": self.inflight.refused,
                },
            },
            "routes": self.router.snapshot(),
            "config_errors": self.config_errors,
        }

    # ------------------------------------------------------------------ the controller (deployments.sync)

    @api.get(
        "/v1/controller",
        responses={503: {"model": ErrorBody}},
        summary="the controller's live table: routes, shares, queues and its last decisions with reasons",
    )
    async def controller(self, request: Request) -> JSONResponse:
        self._allow(request, "operate")
        try:
            status = await self._controller_call("status", timeout_s=5.0)
        except Exception as e:  # noqa: BLE001
            reason = (
                "no controller is running (started by `coderay up`/`serve` unless --no-controller)"
                if isinstance(e, ValueError)
                else f"the controller did not answer ({type(e).__name__})"
            )
            return JSONResponse(
                {
                    "error": reason,
                    "ingress": {
                        "replica_id": self.replica_id,
                        "routes": self.router.snapshot(),
                        "sync": self.controller_sync,
                    },
                },
                status_code=503,
            )
        status["ingress"] = {
            "replica_id": self.replica_id,
            "routes": self.router.snapshot(),
            "pinned": sorted(self.router.pinned),
            "sync": self.controller_sync,
        }
        return JSONResponse(_json_safe(status))
