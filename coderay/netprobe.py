"""The network between a cluster's nodes, measured: round-trip time and bandwidth of Ray calls node to node.

On a real cluster the throughput model's network is what the nodes measure (`measured_network`), not what a
config assumes: for each pair of nodes a probe actor on one calls an echo actor on the other, with a tiny
payload (RTT: the median round trip) and a large one (bandwidth: its bytes over the time beyond one RTT).
The figures include Ray's own call cost, which a served request pays too.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Iterable
from typing import Any

import ray

from coderay.cluster import pin
from coderay.config import CoderayConfig, NetworkLink, NetworkSpec

__all__ = ["probe_pair", "measured_network"]

SMALL, LARGE = 1, 4 * 2**20  # bytes of the RTT probe and of the bandwidth probe


@ray.remote(num_cpus=0, max_restarts=0)
class _Echo:
    def size(self, payload: bytes) -> int:
        return len(payload)

    def probe(self, peer: Any, repeats: int) -> dict:
        """Median seconds of calls to `peer` (another _Echo's actor handle; Any, as ray types a handle's methods as
        Never) carrying SMALL and LARGE payloads (after one warm-up each)."""
        out: dict[int, float] = {}
        for size in (SMALL, LARGE):
            payload = b"\0" * size
            ray.get(peer.size.remote(payload))
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                ray.get(peer.size.remote(payload))
                times.append(time.perf_counter() - t)
            out[size] = statistics.median(times)
        return out


def probe_pair(a: str, b: str, *, repeats: int = 7) -> tuple[float, float]:
    """(bandwidth in Mbit/s, RTT in ms) from node `a` to node `b`, measured by Ray calls between them."""
    # mypy keeps a decorated class's type: ray.remote made _Echo an ActorClass
    src = _Echo.options(**pin(a)).remote()  # type: ignore[attr-defined]
    dst = _Echo.options(**pin(b)).remote()  # type: ignore[attr-defined]
    try:
        t = ray.get(src.probe.remote(dst, repeats))
    finally:
        ray.kill(src)
        ray.kill(dst)
    rtt = t[SMALL]
    transfer = max(t[LARGE] - rtt, 1e-6)
    return (LARGE - SMALL) * 8 / transfer / 1e6, rtt * 1e3


def measured_network(cfg: CoderayConfig, pairs: Iterable[tuple[str, str]] | None = None) -> NetworkSpec:
    """The config's network with every pair of nodes (default: all) measured on the connected cluster; the
    defaults for unlisted pairs stay the config's, the wire encoding too."""
    nodes = [n.name for n in cfg.nodes]
    pairs = list(pairs) if pairs is not None else list(itertools.combinations(nodes, 2))
    links = []
    for a, b in pairs:
        bandwidth, rtt = probe_pair(a, b)
        links.append(NetworkLink(between=(a, b), bandwidth_mbps=round(bandwidth, 1), rtt_ms=round(rtt, 3)))
    return cfg.network.model_copy(update={"links": links})
