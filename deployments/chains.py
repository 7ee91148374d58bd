"""Running a path from the ingress: its chain of replica calls, bounded by one deadline, retried or fallen back.

The ingress holds one handle per block group. A path runs as a chain of `.remote()` calls, one per stage (its
hops on one node, `coderay.plan.stages`), in which each call receives the previous call's `DeploymentResponse` as
a top-level argument, so activations go from replica to replica (through Ray's object store) and only the final
logits come back here. Concurrent requests on one path share a chain (`deployments.merging.Merger`).

Each request has one deadline, `serving.request_timeout_s` after it arrived, that bounds all of it: its wait in
the merger's queue, every chain it rides and every retry. A chain that fails, or that no request waits for any
more (deadline, client gone), has every one of its replica calls cancelled, not only the last. A cooperative
path gets at most `COOP_SHARE` of the time left; when it fails (a dead replica, a lost node, that budget spent)
the request is answered on the local-only path with `"fallback": true`, and the path is then skipped (answered
locally at once, still marked as a fallback) for a cool-down (`serving.fallback_cooldown_s`, default
`request_timeout_s`, at least 10 s) before it is tried again, so a lost host costs one failure, not one per
request. The local-only path has no fallback: a call lost with its replica (the process died, the replica is
unreachable) is retried, with a short back-off, on a live replica or once Serve has restarted the group, until
the deadline; inference is idempotent, so a retry is safe. Only a request whose deadline passes unanswered gets
a 503 (a replica was lost and none came back in time) or 504 (no failure, just no answer in time), with a JSON
reason.

A node the controller reports gone (`deployments.sync`) ends the calls in flight through it at once, and new
ones fail before they are sent, so its guests fall back instead of waiting for the deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import torch

from coderay.config import CoderayConfig
from coderay.paths import to_wire
from coderay.pathspec import PathSpec
from coderay.plan import crossings, plan_hops, stages
from coderay.routing import Router
from deployments.merging import DeadlineExceeded, Merger
from deployments.routing import Activation
from deployments.schemas import ApiError, ServiceStats

__all__ = ["COOP_SHARE", "RETRY_FIRST_S", "RETRY_MAX_S", "HostGone", "PathRunner", "replica_lost", "resolve"]

log = logging.getLogger(__name__)

COOP_SHARE = 0.5  # of a request's time left, what its cooperative path may take: the rest is the fallback's
RETRY_FIRST_S = 0.05  # back-off before the first retry of a call lost with its replica, doubled each time ...
RETRY_MAX_S = 1.0  # ... up to this


class HostGone(RuntimeError):
    """A path's call through a node that the controller reports gone."""


async def resolve(response: Any) -> Any:
    """A `DeploymentResponse` awaited as a coroutine, which `asyncio.wait_for` and `ensure_future` take."""
    return await response


def replica_lost(exc: BaseException) -> bool:
    """Whether `exc` says a replica died or could not be reached (a retry, on another replica or on its
    replacement, can succeed), looking through the wrappers Ray and Serve put around the cause: `RayTaskError`'s
    `cause`, the `__cause__` of Serve's "upstream actor died" error. A model's own error is not such a loss."""
    import grpc
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, (RayActorError, ReplicaUnavailableError)):
            return True
        if isinstance(current, grpc.aio.AioRpcError) and current.code() == grpc.StatusCode.UNAVAILABLE:
            return True
        seen.add(id(current))
        current = getattr(current, "cause", None) or current.__cause__
    return False


class PathRunner:
    """Path execution of the ingress deployment (`deployments.ingress.Ingress`, which provides `cfg`, `router`
    and `stats`): one per replica, it holds the block groups' handles, the paths' plans and mergers, the paths
    in cool-down and the nodes reported gone."""

    # set by the ingress (`deployments.ingress.Ingress.__init__`)
    cfg: CoderayConfig
    router: Router
    stats: dict[str, ServiceStats]

    def _runner_init(self, blocks: dict) -> None:
        self.blocks = {name: h.options(method_name="run") for name, h in blocks.items()}
        self.mergers: dict[str, Merger] = {}
        self.suspended: dict[str, float] = {}  # path id -> time.monotonic() until which it is skipped
        self.gone: set[str] = set()  # nodes the controller reports gone: their guests' calls fail fast
        self._gone_watch: dict[str, asyncio.Future] = {}  # node -> resolved when it is reported gone
        self._plans: dict[str, tuple] = {}
        cooldown = self.cfg.serving.fallback_cooldown_s
        self.cooldown_s = max(10.0, self.cfg.serving.request_timeout_s) if cooldown is None else cooldown

    def _suspended_paths(self, svc: str) -> dict[str, float]:
        """Cooperative paths of `svc` skipped after a failure, with the seconds left of their cool-down."""
        now = time.monotonic()
        return {p: round(t - now, 1) for p, t in self.suspended.items() if t > now and p.startswith(f"{svc}:")}

    async def answer(
        self, svc: str, x: torch.Tensor, deadline: float | None = None
    ) -> tuple[PathSpec, bool, Activation]:
        """(path used, fell back?, output activation) for the model input `x` of service `svc`, by `deadline`
        (`time.monotonic()`; default: `serving.request_timeout_s` from now)."""
        if deadline is None:
            deadline = time.monotonic() + self.cfg.serving.request_timeout_s
        spec = self.router.choose(svc)
        if spec.kind == "local":
            return spec, False, await self.run_retrying(svc, spec, x, deadline)
        now = time.monotonic()
        if self.suspended.get(spec.id, 0.0) <= now:
            try:
                out = await self.run_merged(svc, spec, x, now + COOP_SHARE * max(0.0, deadline - now))
                self.suspended.pop(spec.id, None)
                return spec, False, out
            except Exception as exc:  # noqa: BLE001 — any failure of a cooperative path falls back
                self.suspended[spec.id] = time.monotonic() + self.cooldown_s
                log.warning(
                    "%s: path %s failed (%s: %s); answering on the local-only path and skipping it for %.0f s",
                    svc,
                    spec.id,
                    type(exc).__name__,
                    exc,
                    self.cooldown_s,
                )
        local = PathSpec.local_only(svc)
        return local, True, await self.run_retrying(svc, local, x, deadline)

    async def run_retrying(self, svc: str, spec: PathSpec, x: torch.Tensor, deadline: float) -> Activation:
        """`x` on `spec` by `deadline`, retried while its calls are lost with their replica (`replica_lost`): Serve's
        router sends a retry to a live replica, or holds it until the group's replacement is up. Any other failure
        is final. ApiError 503/504 with the reason when the path fails or the deadline passes."""
        tries, lost = 0, None
        while True:
            try:
                return await self.run_merged(svc, spec, x, deadline)
            except DeadlineExceeded:
                raise self._expired(svc, spec, lost, tries) from None
            except Exception as exc:  # noqa: BLE001 — sorted below: a lost replica is retried, the rest is final
                if not replica_lost(exc):
                    raise self._unavailable(svc, spec, exc) from None
                lost = exc
            if time.monotonic() >= deadline:
                raise self._expired(svc, spec, lost, tries)
            tries += 1
            self.stats[svc]["retries"] += 1
            if tries == 1:
                log.warning(
                    "%s: a call of path %s was lost with its replica (%s); retrying until the request's deadline",
                    svc,
                    spec.id,
                    type(lost).__name__,
                )
            pause = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (tries - 1))
            await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))

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
            ends = [sum(map(len, runs[: k + 1])) for k in range(len(runs))]  # hop index after each stage
            sends = [encoding if end in cross else None for end in ends]
            self._plans[spec.id] = (runs, encoding if 0 in cross else None, sends)
        return self._plans[spec.id]

    async def run_merged(self, svc: str, spec: PathSpec, x: torch.Tensor, deadline: float) -> Activation:
        """`x` on the path, in one chain with the path's other concurrent requests (`serving.merge_requests`);
        `DeadlineExceeded` once `deadline` passes, wherever the request then is (queued or in a chain)."""
        if not self.cfg.serving.merge_requests:
            try:
                return await asyncio.wait_for(self.run_path(svc, spec, x), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise DeadlineExceeded(f"{spec.id}: no answer before the request's deadline") from None
        merger = self.mergers.get(spec.id)
        if merger is None:
            b = min(self.cfg.service(svc).batch_size, self.cfg.serving.max_batch_size)
            merger = self.mergers[spec.id] = Merger(
                lambda batch: self.run_path(svc, spec, batch), max_samples=b, depth=len(self.plan(spec)[0]) + 1
            )
        return await merger.submit(x, deadline)

    async def run_path(self, svc: str, spec: PathSpec, x: torch.Tensor) -> Activation:
        """Chain the path's replica calls, one per stage, each taking the previous response; await the last.
        Unbounded itself: the caller's deadline cancels it. However it ends short of an answer (a failure,
        cancelled, a node gone), every call of the chain is cancelled, so no stage goes on computing for nobody.
        A call through another service's node ends as soon as the controller reports that node gone (a crashed
        node's calls would otherwise hang until the deadline), so its requests fall back at once."""
        runs, first_send, sends = self.plan(spec)
        home = self.cfg.service(svc).node
        away = {self.cfg.service(run[0].service).node for run in runs} - {home}
        if away & self.gone:
            raise HostGone(f"{spec.id}: node {sorted(away & self.gone)[0]} is gone (the controller says so)")
        response: Any = Activation(to_wire(x, first_send) if first_send else x, home)
        responses = []
        for run, send in zip(runs, sends):
            response = self.blocks[run[0].service].remote(response, run, send)
            responses.append(response)
        call = asyncio.ensure_future(resolve(response))
        watch = [self._gone_future(n) for n in away]
        answered = False
        try:
            done, _ = await asyncio.wait([call, *watch], return_when=asyncio.FIRST_COMPLETED)
            if call in done:
                out = call.result()
                answered = True
                return out
        finally:
            if not answered:
                call.cancel()
                for r in responses:
                    r.cancel()
        lost = [w.result() for w in watch if w in done]
        raise HostGone(f"{spec.id}: node {lost[0]} gone while the call was in flight (the controller says so)")

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

    def _expired(self, svc: str, spec: PathSpec, lost: BaseException | None, tries: int) -> ApiError:
        """The refusal of a request whose deadline passed: 503 if a replica was lost and none answered since,
        504 if the path was merely slow."""
        timeout = self.cfg.serving.request_timeout_s
        if lost is not None:
            return ApiError(
                503,
                f"service {svc!r}: no live replica answered path {spec.id} within {timeout:g} s "
                f"(serving.request_timeout_s): a call was lost with its replica "
                f"({type(lost).__name__}) and {tries} retr{'y' if tries == 1 else 'ies'} found "
                "none back in time",
                headers={"Retry-After": "1"},
            )
        return ApiError(
            504, f"service {svc!r}: path {spec.id} gave no answer within {timeout:g} s (serving.request_timeout_s)"
        )

    def _unavailable(self, svc: str, spec: PathSpec, exc: BaseException) -> ApiError:
        return ApiError(503, f"service {svc!r}: path {spec.id} is unavailable ({type(exc).__name__})")
