"""One interval's figures from what block groups and ingress replicas reported: pure, no Ray, no clock.

Reports carry cumulative counters; an interval's figure is a counter's increase since the report the last interval
used (its baseline), and a counter that went down (its process restarted) counts from zero. A block group's report
is read only if it is fresh (received within `stale_s`, on a node Ray reports alive); an ingress replica counts only
if it synced within `fresh_s`. The caller (`coderay.controller.Controller.tick`) keeps the baselines and the clocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["COUNTERS", "SERVED", "Interval", "Report", "aggregate", "delta", "heard_blocks"]

COUNTERS = ("own_samples", "guest_samples", "compute_s")  # a block group's counters, summed per node
SERVED = ("requests", "samples", "fallbacks", "latency_s")  # an ingress replica's counters, summed per service
Report = tuple[float, Mapping]  # (when received, its figures)


def delta(cur: float, prev: float) -> float:
    """A counter's increase; a counter that went down (its replica restarted) counts from zero."""
    return cur - prev if cur >= prev else cur


def heard_blocks(
    reports: Mapping[str, Report],
    services: Mapping[str, str],
    alive: Mapping[str, bool],
    *,
    now: float,
    since: float,
    stale_s: float,
) -> tuple[dict[str, Report], list[str]]:
    """({service: (when received, its group's stats + its node's cgroup CPU seconds and share, where capped)} for
    services on live nodes whose group reported within `stale_s` of `now`, [services missed]). A service never
    heard from counts from `since`: missed once that is `stale_s` old, not before."""
    heard: dict[str, Report] = {}
    missed: list[str] = []
    for svc, node in services.items():
        if not alive.get(node, True):
            continue
        at, info = reports.get(svc, (since, None))
        if now - at > stale_s:
            missed.append(svc)
            continue
        if info is None:  # not heard from yet, not missed yet
            continue
        cap = info.get("capacity") or {}
        cpu = (
            {"cpu_s": cap["cpu_s"], "cpu_share": cap["share"]}
            if cap.get("cpu_s") is not None and cap.get("share")
            else {}
        )
        heard[svc] = (at, dict(info["stats"]) | cpu)
    return heard, missed


@dataclass(frozen=True)
class Interval:
    """What one interval measured, and the baselines the next interval counts from."""

    arrivals: dict[str, float]  # service -> samples/s its clients sent (answered)
    nodes: dict[str, dict]  # node -> COUNTERS (scaled to the interval), cpu_busy and own_latency_ms where known
    served: dict[str, dict]  # service -> SERVED and by_path {path id: requests}, summed over fresh replicas
    failing: frozenset[str]  # path ids a fresh replica skips after a failure
    replicas: list[str]  # the fresh replicas counted, sorted
    block_baselines: dict[str, Report]  # service -> the report the next interval counts from
    ingress_baselines: dict[str, Mapping]  # fresh replica id -> the figures the next interval counts from


def aggregate(
    *,
    services: Mapping[str, str],
    nodes: Iterable[str],
    dt: float,
    now: float,
    blocks: Mapping[str, Report],
    prev_blocks: Mapping[str, Report],
    ingress: Mapping[str, Mapping],
    prev_ingress: Mapping[str, Mapping],
    fresh_s: float,
) -> Interval:
    """Sum the block groups' counters per node and the fresh ingress replicas' counters per service over one
    interval of `dt` seconds ending at `now`. `services`: service -> its node; `blocks`: the groups heard from
    (`heard_blocks`); `ingress`: replica id -> {"seen": when it synced, "stats": its cumulative figures}. A group
    or replica without a baseline is its own baseline (counts nothing this interval)."""
    per_node: dict[str, dict] = {n: dict.fromkeys(COUNTERS, 0.0) for n in nodes}
    block_baselines = {}
    for svc, (at, stats) in blocks.items():
        prev_at, prev = prev_blocks.get(svc, (at, stats))
        block_baselines[svc] = (prev_at, prev)
        if at <= prev_at:  # no report since the last interval's (or the baseline): nothing to count
            continue
        # the counters' increase between two reports, scaled to this interval: reports and intervals are not
        # in step, and a report's span may be half an interval longer or shorter than `dt`
        scale = dt / (at - prev_at)
        node = per_node[services[svc]]
        for k in COUNTERS:
            node[k] += scale * delta(stats.get(k, 0.0), prev.get(k, 0.0))
        if "cpu_s" in stats and "cpu_s" in prev:  # one cgroup per node: counted once per node
            node["cpu_busy"] = min(1.5, scale * delta(stats["cpu_s"], prev["cpu_s"]) / dt / stats["cpu_share"])
        block_baselines[svc] = (at, stats)
    fresh = {rid: v for rid, v in ingress.items() if now - v["seen"] <= fresh_s}
    served: dict[str, dict] = {
        svc: {"requests": 0, "samples": 0, "fallbacks": 0, "latency_s": 0.0, "by_path": {}} for svc in services
    }
    failing: set[str] = set()
    for rid, v in fresh.items():
        prev = prev_ingress.get(rid, v["stats"])
        for svc, s in (v["stats"].get("services") or {}).items():
            if svc not in served:
                continue
            p = (prev.get("services") or {}).get(svc, s)
            for k in SERVED:
                served[svc][k] += delta(s.get(k, 0), p.get(k, 0))
            by_path, before = served[svc]["by_path"], p.get("by_path") or {}
            for path, n in (s.get("by_path") or {}).items():
                by_path[path] = by_path.get(path, 0) + delta(n, before.get(path, 0))
            failing |= set(s.get("suspended_paths") or {})
    for name, node in per_node.items():  # how long its own clients waited, on average, this interval
        own = [served[svc] for svc, n in services.items() if n == name and served[svc]["requests"]]
        if own:
            node["own_latency_ms"] = 1e3 * sum(s["latency_s"] for s in own) / sum(s["requests"] for s in own)
    return Interval(
        arrivals={svc: served[svc]["samples"] / dt for svc in services},
        nodes=per_node,
        served=served,
        failing=frozenset(failing),
        replicas=sorted(fresh),
        block_baselines=block_baselines,
        ingress_baselines={rid: v["stats"] for rid, v in fresh.items()},
    )
