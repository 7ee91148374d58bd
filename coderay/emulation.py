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

Timings under a CFS quota must span many quota periods (a 2 ms block can run unthrottled inside one 20 ms
period); `sustained_seconds` measures that way.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from coderay import capacity
from coderay.config import CoderayConfig

__all__ = ["NodeCapacity", "node_capacity", "work_as", "timing_as", "speed_divisor", "node_rate",
           "sustained_seconds", "describe"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeCapacity:
    node: str
    share: float | None         # CPUs of quota (None: uncapped)
    scale: float | None         # measured rate / scale = the rate on the configured node
    mechanism: str              # "cgroup-v1", "cgroup-v2", "off: <why>" or "none: <reason>"

    @property
    def capped(self) -> bool:
        return self.share is not None

    def as_dict(self) -> dict:
        return asdict(self) | {"capped": self.capped}


@functools.lru_cache(maxsize=8)
def _plan(key: str, cfg_json: str) -> dict[str, NodeCapacity]:
    cfg = CoderayConfig.model_validate_json(cfg_json)
    if not cfg.emulation.cpu_caps:
        return {n.name: NodeCapacity(n.name, None, None, "off: emulation.cpu_caps is false (or a real cluster)")
                for n in cfg.nodes}
    det = capacity.detect()
    if not det.available:
        log.warning("CPU caps per node are not possible here (%s): node speeds are emulated in the throughput "
                    "model only, serving runs uncapped", det.reason)
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
    return 1.0 if node_capacity(cfg)[node].capped else cfg.node(node).speed


def node_rate(cfg: CoderayConfig, node: str) -> float:
    """How fast `node` computes, relatively: its CPU share when capped, else its configured speed."""
    cap = node_capacity(cfg)[node]
    return cap.share if cap.capped else cfg.node(node).speed


_CURRENT: dict[str, str | None] = {"node": None}    # the node this process works as (None: none)


def work_as(cfg: CoderayConfig, node: str) -> NodeCapacity:
    """Move this whole process into `node`'s CPU group (no-op when uncapped); for processes of one node."""
    cap = node_capacity(cfg)[node]
    if cap.capped and _CURRENT["node"] != node:
        done = capacity.join(node, cap.share)
        if not done.capped:
            return NodeCapacity(node, None, None, done.mechanism)
        _CURRENT["node"] = node
    return cap


@contextlib.contextmanager
def timing_as(cfg: CoderayConfig, node: str) -> Iterator[NodeCapacity]:
    """Run the body as `node` (inside its CPU group), then return to where this process was."""
    before = _CURRENT["node"]
    cap = work_as(cfg, node)
    try:
        yield cap
    finally:
        if cap.capped and before != node:
            if before is None:
                capacity.leave()
            else:
                capacity.join(before, node_capacity(cfg)[before].share)
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


