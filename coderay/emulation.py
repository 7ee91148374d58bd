"""Which capacity emulation is in force for a config, decided in one place, and the process-level moves.

- `node_capacity(cfg)`: per node, its CPU share and the mechanism that enforces it ("cgroup-v1",
  "cgroup-v2"), or why nothing does ("off: ..." by config or on a real cluster, "none: <reason>" where the
  OS refuses). Decided once per process and config; every figure that depends on it says which.
- `work_as(cfg, node)`: a process that belongs to `node` for its life (a Serve replica, a Tune trial, the
  split-learning actor) joins its group.
- `timing_as(cfg, node)`: a context for timing work *as* `node` from a process that is not one (the driver
  profiling blocks for the throughput model): joined inside, back where it was after.
- `speed_divisor(cfg, node)`: what profiled seconds are divided by: 1 when the node is really capped (its
  quota already makes it slower or faster), its `speed` when emulation is arithmetic only.
- `core_plan(cfg)` (`emulation.pin_cores`, without caps): which of this machine's cores Ray's own processes
  and each node's work are pinned to (CPU affinity), so that the proxy, the ingress and Ray's daemons do not
  preempt a node's replica; `pinned_head(cfg)` starts a local cluster's processes on the head's cores, and
  `work_as` / `timing_as` move a node's process (or the profiling) onto the node's.

Wall-clock timings under a CFS quota must span many quota periods (a 2 ms block can run unthrottled inside
one 20 ms period); `sustained_seconds` measures that way (links). Blocks are profiled by CPU time over the
node's share instead (`coderay.services.sustained_block_ms`), which the periods do not quantise.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from coderay import capacity
from coderay.config import CoderayConfig

__all__ = [
    "NodeCapacity",
    "node_capacity",
    "work_as",
    "timing_as",
    "speed_divisor",
    "node_rate",
    "sustained_seconds",
    "describe",
    "core_plan",
    "pinned_head",
    "cores_of",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeCapacity:
    node: str
    share: float | None  # CPUs of quota (None: uncapped)
    scale: float | None  # measured rate / scale = the rate on the configured node
    mechanism: str  # "cgroup-v1", "cgroup-v2", "off: <why>" or "none: <reason>"

    @property
    def capped(self) -> bool:
        return self.share is not None

    def as_dict(self) -> dict:
        return asdict(self) | {"capped": self.capped}


@functools.lru_cache(maxsize=8)
def _plan(key: str, cfg_json: str) -> dict[str, NodeCapacity]:
    cfg = CoderayConfig.model_validate_json(cfg_json)
    if not cfg.emulation.cpu_caps:
        return {
            n.name: NodeCapacity(n.name, None, None, "off: emulation.cpu_caps is false (or a real cluster)")
            for n in cfg.nodes
        }
    det = capacity.detect()
    if not det.available:
        log.warning(
            "CPU caps per node are not possible here (%s): node speeds are emulated in the throughput "
            "model only, serving runs uncapped",
            det.reason,
        )
        return {n.name: NodeCapacity(n.name, None, None, det.mechanism) for n in cfg.nodes}
    plan = capacity.plan_shares(cfg.nodes, capacity.machine_cpus(), cfg.emulation.reserve_cpus)
    return {n: NodeCapacity(n, share, plan.scale, det.kind) for n, share in plan.shares.items()}


def node_capacity(cfg: CoderayConfig) -> dict[str, NodeCapacity]:
    """Every node's capacity emulation under this config (same answer in every process of this machine)."""
    return _plan(cfg.fingerprint(cfg.nodes, cfg.emulation), cfg.model_dump_json())


def describe(cfg: CoderayConfig) -> dict:
    """For API responses and tables: the mechanism and each node's share."""
    caps = node_capacity(cfg)
    first = next(iter(caps.values()))
    return {"mechanism": first.mechanism, "scale": first.scale, "shares": {n: c.share for n, c in caps.items()}}


def speed_divisor(cfg: CoderayConfig, node: str) -> float:
    """What a node's profiled seconds are divided by: 1 where they were timed on (or as) that node, i.e. under
    its cap or on a real cluster (each node times its own blocks), else its configured speed."""
    return 1.0 if node_capacity(cfg)[node].capped or not cfg.emulation.local else cfg.node(node).speed


def node_rate(cfg: CoderayConfig, node: str) -> float:
    """How fast `node` computes, relatively: its CPU share when capped, else its configured speed."""
    cap = node_capacity(cfg)[node]
    return cap.share if cap.share is not None else speed_divisor(cfg, node)


HEAD = "head"  # core_plan's key for Ray's own processes, the proxy and the ingress


def _machine_cores() -> list[int]:
    """This machine's cores, the same in every process (a pinned process's own mask is not: ask init's)."""
    try:
        return sorted(os.sched_getaffinity(1))
    except OSError:
        return list(range(os.cpu_count() or 1))


@functools.lru_cache(maxsize=8)
def _core_plan(key: str, cfg_json: str) -> dict[str, tuple[int, ...]]:
    cfg = CoderayConfig.model_validate_json(cfg_json)
    if not cfg.emulation.pin_cores:
        return {}
    cores = _machine_cores()
    head = max(1, math.ceil(cfg.emulation.reserve_cpus))
    if len(cores) <= head:
        log.warning(
            "emulation.pin_cores: this machine has %d core(s), none left after the %d kept for Ray's own "
            "processes (reserve_cpus %s): nothing is pinned",
            len(cores),
            head,
            cfg.emulation.reserve_cpus,
        )
        return {}
    return {HEAD: tuple(cores[:head])} | {n.name: tuple(cores[head:]) for n in cfg.nodes}


def core_plan(cfg: CoderayConfig) -> dict[str, tuple[int, ...]]:
    """{"head" or node: the cores its processes are pinned to}; empty when `emulation.pin_cores` is off or
    this machine has too few cores (warned once)."""
    return _core_plan(cfg.fingerprint(cfg.nodes, cfg.emulation), cfg.model_dump_json())


def cores_of(pid: int | str = "self") -> list[int]:
    """The cores a process may run on (its main thread's affinity), for reports and checks."""
    return sorted(os.sched_getaffinity(0 if pid == "self" else int(pid)))


def _pin(cores) -> set[int]:
    """Pin every thread of this process to `cores` (threads started later inherit it); the previous mask."""
    before = os.sched_getaffinity(0)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), set(cores))
        except OSError:  # a thread that has just exited
            pass
    return before


@contextlib.contextmanager
def pinned_head(cfg: CoderayConfig) -> Iterator[None]:
    """This process on the head's cores while the body starts Ray's processes (they inherit the mask), then
    back: a local cluster's daemons, proxy and ingress stay off the nodes' cores."""
    cores = core_plan(cfg).get(HEAD)
    before = _pin(cores) if cores else None
    try:
        yield
    finally:
        if before is not None:
            _pin(before)


_CURRENT: dict[str, str | None] = {"node": None}  # the node this process works as (None: none)


def work_as(cfg: CoderayConfig, node: str) -> NodeCapacity:
    """Move this whole process into `node`'s CPU group (no-op when uncapped), or onto its cores where they are
    pinned; for processes of one node."""
    cores = core_plan(cfg).get(node)
    if cores:
        _pin(cores)
    cap = node_capacity(cfg)[node]
    if cap.share is not None and _CURRENT["node"] != node:  # capped
        done = capacity.join(node, cap.share)
        if not done.capped:
            return NodeCapacity(node, None, None, done.mechanism)
        _CURRENT["node"] = node
    return cap


@contextlib.contextmanager
def timing_as(cfg: CoderayConfig, node: str) -> Iterator[NodeCapacity]:
    """Run the body as `node` (inside its CPU group), then return to where this process was."""
    before = _CURRENT["node"]
    mask = os.sched_getaffinity(0)
    cap = work_as(cfg, node)
    try:
        yield cap
    finally:
        if core_plan(cfg):
            _pin(mask)
        if cap.capped and before != node:
            if before is None:
                capacity.leave()
            else:
                share = node_capacity(cfg)[before].share
                assert share is not None  # this process was in `before`'s group: that node is capped
                capacity.join(before, share)
            _CURRENT["node"] = before


def sustained_seconds(fn: Callable[[], object], *, min_seconds: float = 0.25, min_runs: int = 3) -> float:
    """Seconds per call of `fn`, averaged over at least `min_seconds` of back-to-back calls (many quota
    periods), after one warm-up call."""
    fn()
    runs, start = 0, time.perf_counter()
    while runs < min_runs or time.perf_counter() - start < min_seconds:
        fn()
        runs += 1
    return (time.perf_counter() - start) / runs
