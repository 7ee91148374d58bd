"""The block-group deployment: one service's frozen blocks on its node, dynamically batched, and the trained
links that run on that node.

Weights are loaded inside the replica, from its node's store (`load_service` + `split_service`; links from the
reward table's `links_file`s, store-relative), never shipped from the driver. The links come in the deployment's
`user_config`, so a table with other links (a search that finished while serving) reaches a running replica by
`reconfigure`: the blocks stay loaded and the replica keeps answering. A call runs one stage of a path's
plan: the consecutive
hops on this service's node (`coderay.plan.stages`), e.g. link_in → blocks hin..hout → link_out on a host, so a
request pays one call per node it visits. Block ranges are batched across calls; one batch may mix calls for
different ranges (grouped by range, one forward per group). Batches are counted in samples (the service's
`batch_size`, B); guest samples (another service's path passing through) take at most `guest_quota` (s) of each
batch: a guest chunk that does not fit is put back in the queue for a later batch by Serve's batcher, never
dropped.

Health never queues behind work: every replica pushes its figures (`BlockGroup.health`) to the controller from a
thread of its own (`HealthReporter`), every `coderay.controller.REPORT_S`. Asked through Serve instead, the
controller's question would wait for one of the replica's `max_ongoing_requests` slots and then for its event
loop, both held by queued batches when the group is saturated, and a busy host would look lost. A group that
stops reporting (its process died, its node is gone) is what the controller counts as missing. Serve checks each
replica every `HEALTH_CHECK_PERIOD_S` (its default is 10 s), so a crashed group is replaced within a request's
deadline rather than after it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from ray import serve

from coderay import controller as ctl
from coderay.config import CoderayConfig
from coderay.emulation import work_as
from coderay.links import Link, load_links
from coderay.paths import to_wire
from coderay.pathspec import PathSpec
from coderay.plan import TO_END, Hop
from coderay.services import split_service
from coderay.store import resolve
from coderay.train import load_service
from deployments.placement import capacity_info, replica_location, torch_threads
from deployments.routing import Activation, hop_delay_s

__all__ = [
    "BlockGroup",
    "Chunk",
    "HEALTH_CHECK_PERIOD_S",
    "HealthReporter",
    "batch_samples",
    "latency_summary",
    "run_grouped",
]

log = logging.getLogger(__name__)

HEALTH_CHECK_PERIOD_S = 2.0  # how often Serve checks a block-group replica's liveness: a crashed one is found,
# and replaced, within about this (the check takes no request slot; its timeout stays
# Serve's 30 s, so a busy replica is not mistaken for a dead one)


@dataclass(frozen=True)
class Chunk:
    """Part of one call: at most B samples of the owner's requests, at most s of a guest's."""

    x: torch.Tensor  # (n, ...) activations entering block `first`
    first: int
    last: int
    guest: bool
    quota: int  # s of the group (the same in every chunk: batch_size_fn sees no `self`)
    capacity: int  # B of the group
    owner: str = ""  # a guest chunk's service, and the slots of a batch its grant gives it
    grant: int = 0

    def __len__(self) -> int:
        return len(self.x)


def batch_samples(chunks: list[Chunk]) -> int:
    """Serve's batch size of `chunks`: their samples, or more than B once the guests exceed the quota s, or one
    guest its grant (the batcher then defers the chunk that crossed it to a later batch)."""
    per_guest: dict[str, int] = {}
    for c in chunks:
        if c.guest:
            per_guest[c.owner] = per_guest.get(c.owner, 0) + len(c)
    grants = {c.owner: c.grant for c in chunks if c.guest}
    if sum(per_guest.values()) > chunks[0].quota or any(n > grants[g] for g, n in per_guest.items()):
        return chunks[0].capacity + 1
    return sum(len(c) for c in chunks)


def run_grouped(blocks: Sequence[torch.nn.Module], chunks: list[Chunk]) -> list[torch.Tensor]:
    """Run each chunk through blocks first..last (1-based), one forward per distinct range."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, c in enumerate(chunks):
        groups.setdefault((c.first, c.last), []).append(i)
    out: dict[int, torch.Tensor] = {}  # by chunk
    with torch.inference_mode():
        for (first, last), idx in groups.items():
            x = chunks[idx[0]].x if len(idx) == 1 else torch.cat([chunks[i].x for i in idx])
            for block in blocks[first - 1 : last]:
                x = block(x)
            if len(idx) == 1:
                out[idx[0]] = x
            else:  # split views share the group's storage: clone so each result ships only its own samples
                for i, part in zip(idx, x.split([len(chunks[i]) for i in idx])):
                    out[i] = part.clone()
    return [out[i] for i in range(len(chunks))]  # every chunk is in one group


def latency_summary(latencies_ms) -> dict:
    """p50 / p99 (ms, nearest rank; None without any) of recent latencies, and how many there are: a block
    group's calls here, a service's requests in the ingress."""
    lat = sorted(latencies_ms)
    pick = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 3)) if lat else (lambda q: None)
    return {"p50_ms": pick(0.5), "p99_ms": pick(0.99), "calls": len(lat)}


def load_path_links(cfg: CoderayConfig, node: str, files: dict[str, str]) -> dict[str, dict[str, Link]]:
    """{path id: its links} from {path id: links file in `node`'s store}, checking each file holds the path it
    is listed for."""
    out = {}
    for path_id, file in files.items():
        stored_id, links = load_links(resolve(file, cfg, node))
        if stored_id != path_id:
            raise ValueError(
                f"{file} holds the links of {stored_id!r}, not {path_id!r}: the reward table and the "
                "links directory disagree; rerun the search"
            )
        out[path_id] = links
    return out


class HealthReporter:
    """Pushes `health()` to the controller every `ctl.REPORT_S` seconds from a daemon thread, so the figures
    leave even while the replica's event loop and request slots are taken by batches. No controller (none runs,
    or it is being replaced): it looks the controller up again next time. At most one report is in flight: a
    controller slow to take them gets fewer, not a pile."""

    def __init__(self, service: str, health: Callable[[], dict]):
        self.service, self.health = service, health
        self.stopped = threading.Event()
        threading.Thread(target=self._run, name=f"coderay-health-{service}", daemon=True).start()

    def stop(self) -> None:
        self.stopped.set()

    def _run(self) -> None:
        import ray

        actor, sent = None, None
        while not self.stopped.wait(ctl.REPORT_S):
            try:
                if sent is not None:
                    if not ray.wait([sent], timeout=0)[0]:
                        continue
                    ray.get(sent)  # raises if the controller it went to is gone
                if actor is None:
                    actor = ctl.get_controller()
                sent = actor.report_blocks.remote(self.service, self.health())
            except Exception as e:  # noqa: BLE001 — no controller now: look it up again next time
                log.debug("block group %s: health report not sent (%s: %s)", self.service, type(e).__name__, e)
                actor, sent = None, None


@serve.deployment(health_check_period_s=HEALTH_CHECK_PERIOD_S)
class BlockGroup:
    """Blocks 1..N of one service, frozen, on the service's node, with the links of the paths that run there
    (`reconfigure`)."""

    def __init__(self, cfg: CoderayConfig, service: str, cpus: float):
        self.cfg, self.service = cfg, service
        spec = self.spec = cfg.service(service)
        self.node, self.quota = spec.node, spec.guest_quota
        self.capacity = min(spec.batch_size, cfg.serving.max_batch_size)  # B, in samples
        self.threads = torch_threads(cpus)
        trained = load_service(cfg, service)
        self.blocks = split_service(spec, trained.model)
        self.n_blocks = len(self.blocks)
        self.links: dict[str, dict[str, Link]] = {}  # {path id: its links}, from `reconfigure`
        # the node's CPU quota, where emulation has one, from here on: it emulates a server's serving speed, not
        # its start (loading under it would only make every start on this 2-core machine wait on the smallest cap)
        self.cap = work_as(cfg, self.node)
        self.in_flight = 0  # calls received and not yet answered: this hop's queue
        self.latencies_ms: collections.deque[float] = collections.deque(maxlen=512)  # recent calls, wait included
        # serve.batch is typed as returning the plain method; its wrapper has these setters
        self._run_batch.set_max_batch_size(self.capacity)  # type: ignore[attr-defined]
        self._run_batch.set_batch_wait_timeout_s(cfg.serving.batch_wait_timeout_s)  # type: ignore[attr-defined]
        self.stats = {
            "calls": 0,
            "batches": 0,
            "samples": 0,
            "own_samples": 0,
            "guest_samples": 0,
            "max_batch_samples": 0,
            "max_guest_samples_in_batch": 0,
            "mixed_range_batches": 0,
            "compute_s": 0.0,
            "compute_cpu_s": 0.0,
            "link_calls": 0,
        }
        self.reporter = HealthReporter(service, self.health) if _in_replica() else None
        log.info(
            "block group %s: %d blocks on %s (CPU: %s, share %s), %d torch thread(s), B=%d, s=%d",
            service,
            self.n_blocks,
            self.node,
            self.cap.mechanism,
            self.cap.share,
            self.threads,
            self.capacity,
            self.quota,
        )

    def reconfigure(self, user_config: dict) -> None:
        """`{"links": {path id: links file in this node's store}}`: the links this node runs. Serve calls it before
        the replica takes requests, and again in place when a table with other links is deployed; a call in
        flight finishes with the links it started with."""
        files = (user_config or {}).get("links") or {}
        self.links = load_path_links(self.cfg, self.node, dict(files))
        log.info("block group %s: links of %s", self.service, sorted(self.links) or "no path")

    def __del__(self) -> None:
        reporter = getattr(self, "reporter", None)
        if reporter is not None:
            reporter.stop()

    async def run(self, a: Activation, hops: tuple[Hop, ...], send: str | None = None) -> Activation:
        """One stage of a path on `a`: its hops in order, each this service's blocks or one of a path's links.
        A guest's samples count against the quota. `send`: the wire encoding of the output when the next stage
        is on another node."""
        steps = [self._check(h) for h in hops]
        self.stats["calls"] += 1
        self.in_flight += 1
        start = time.perf_counter()
        try:
            return await self._run_stage(a, hops, steps, send)
        finally:
            self.in_flight -= 1
            self.latencies_ms.append((time.perf_counter() - start) * 1e3)

    async def _run_stage(self, a: Activation, hops: tuple[Hop, ...], steps: list, send: str | None) -> Activation:
        delay = hop_delay_s(self.cfg, a.node, self.node, a.x.nbytes)
        if delay:
            await asyncio.sleep(delay)
        x = a.x.float()  # a no-op unless it crossed the wire as float16/bfloat16
        for hop, step in zip(hops, steps):
            if hop.kind == "links":
                self.stats["link_calls"] += 1
                cpu = time.thread_time()
                with torch.inference_mode():
                    x = step(x)
                self.stats["compute_cpu_s"] += time.thread_time() - cpu
                continue
            first, last = step
            owner = PathSpec.parse(hop.path_id).local if hop.guest else ""
            grant = self.spec.grant(owner) if hop.guest else 0
            size = grant if hop.guest else self.capacity
            chunks = [
                Chunk(part, first, last, hop.guest, self.quota, self.capacity, owner, grant) for part in x.split(size)
            ]
            parts = await asyncio.gather(*(self._run_batch(c) for c in chunks))
            x = parts[0] if len(parts) == 1 else torch.cat(parts)
        return a.moved(to_wire(x, send) if send else x, self.node, delay_s=delay, crossed=a.node != self.node)

    def _check(self, hop: Hop):
        """The link module of a links hop, or the (first, last) block range of a blocks hop; ValueError naming
        what this group lacks otherwise."""
        if hop.service != self.service:
            raise ValueError(f"blocks-{self.service} was sent a hop of {hop.service!r}")
        if hop.kind == "links":
            try:
                return self.links[hop.path_id][hop.link]
            except KeyError:
                raise ValueError(
                    f"blocks-{self.service} has no {hop.link!r} link for {hop.path_id!r}; it holds "
                    f"the links of {sorted(self.links)}"
                ) from None
        last = self.n_blocks if hop.last == TO_END else hop.last
        if not 1 <= hop.first <= last <= self.n_blocks:
            raise ValueError(f"{self.service}: block range {hop.first}..{last} outside 1..{self.n_blocks}")
        if hop.guest and self.spec.grant(PathSpec.parse(hop.path_id).local) < 1:
            raise ValueError(f"{self.service} does not admit the guest samples of {hop.path_id!r} (not granted)")
        return hop.first, last

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=batch_samples)
    async def _run_batch(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        start, cpu = time.perf_counter(), time.thread_time()
        out = run_grouped(self.blocks, chunks)
        s = self.stats
        guests = sum(len(c) for c in chunks if c.guest)
        total = sum(len(c) for c in chunks)
        s["batches"] += 1
        s["samples"] += total
        s["guest_samples"] += guests
        s["own_samples"] += total - guests
        s["max_batch_samples"] = max(s["max_batch_samples"], total)
        s["max_guest_samples_in_batch"] = max(s["max_guest_samples_in_batch"], guests)
        s["mixed_range_batches"] += len({(c.first, c.last) for c in chunks}) > 1
        s["compute_s"] += time.perf_counter() - start  # wall: stretched by the node's quota
        s["compute_cpu_s"] += time.thread_time() - cpu  # the model's own CPU (the rest is per-call cost)
        return out

    def health(self) -> dict:
        """What the controller reads each interval: the batching figures, the node's CPU under its cap, this hop's
        queue. Copies only, no Ray call: `HealthReporter` runs it off the event loop, beside the batches."""
        return {
            "service": self.service,
            "pid": os.getpid(),
            "stats": dict(self.stats),
            "capacity": capacity_info(self.cfg, self.cap),
            "queue": {"in_flight": self.in_flight, **latency_summary(self.latencies_ms)},
        }

    def info(self) -> dict:
        """Where this replica runs (checked from inside it), its batching figures and its settings."""
        return {
            "deployment": f"blocks-{self.service}",
            **self.health(),
            **replica_location(self.node),
            "torch_threads": torch.get_num_threads(),
            "blocks": self.n_blocks,
            "batch_size": self.capacity,
            "guest_quota": self.quota,
            "paths": sorted(self.links),
            "process_cpu_s": time.process_time(),
        }


def _in_replica() -> bool:
    """Whether this runs inside a Serve replica (not a test building the class by hand)."""
    try:
        serve.get_replica_context()
    except Exception:  # noqa: BLE001 — RayServeException outside a replica
        return False
    return True
