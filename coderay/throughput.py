"""The throughput model of a path, Th_p = Th_p^l + Th_p^h, from profiled block times.

Per second of steady state (each node a server; pipelined, so stages overlap):
- the host runs batches of B; s slots of each go to guests, so a batch takes
  t_H = (B − s)·c_host_full + s·c_guest and the host admits Th^h ≤ s / t_H guest samples per second,
  while its own throughput falls from 1/c_host_full to (B − s) / t_H;
- the network caps Th^h at bandwidth / bytes-per-sample (out and back);
- the local node spends c_ht (its head and tail) on every offloaded sample and serves its own requests
  end to end (c_local) with the time left: Th^l = (1 − Th^h · c_ht) / c_local.
A skip path runs every request of the service on the local node at its (cheaper) cost.
Times are this machine's profiles (under each node's CPU quota, or divided by its `speed` where emulation is
arithmetic) plus each replica call's fixed cost shared by the B samples of a chain: what serving pays.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from coderay.config import NetworkSpec

__all__ = ["BYTES_PER_VALUE", "PathCosts", "Throughput", "path_throughput"]

BYTES_PER_VALUE = {"float32": 4, "float16": 2, "bfloat16": 2}  # activations on the wire, by encoding


@dataclass(frozen=True)
class PathCosts:
    """Per-sample seconds and bytes of one path, on the nodes where each part runs."""

    local_full: float  # c_local: local-only, on the local node
    local_part: float  # c_ht: the local head + tail (+ skip link) of this path, on the local node
    host_full: float = 0.0  # c_host_full: the host's own model, on the host node
    host_part: float = 0.0  # c_guest: links + host blocks of this path, on the host node
    batch: int = 1  # B: the host's batch
    guest_quota: int = 0  # s
    bytes_out: int = 0  # activation bytes sent to the host per sample
    bytes_back: int = 0  # activation bytes returned per sample


@dataclass(frozen=True)
class Throughput:
    local: float  # Th^l, samples/s answered by the local-only model
    host: float  # Th^h, samples/s answered through the path (via the host; a skip path: itself)
    local_only: float  # the service's throughput without cooperation
    host_own_before: float  # the host's own throughput before it admits guests
    host_own_after: float  # ... and with this path's guests
    latency_ms: float  # one sample's modelled latency along the path, network included
    bottleneck: str  # which limit bound Th^h: 'quota', 'network', 'local', or '-'

    @property
    def total(self) -> float:
        return self.local + self.host

    @property
    def ratio(self) -> float:
        return self.total / self.local_only

    def to_dict(self) -> dict:
        return asdict(self) | {"total": self.total, "ratio": self.ratio}


def path_throughput(
    c: PathCosts, *, kind: str, network: NetworkSpec | None = None, local_node: str = "", host_node: str = ""
) -> Throughput:
    local_only = 1.0 / c.local_full
    if kind == "local":
        return Throughput(local_only, 0.0, local_only, 0.0, 0.0, c.local_full * 1e3, "-")
    if kind == "skip":
        return Throughput(0.0, 1.0 / c.local_part, local_only, 0.0, 0.0, c.local_part * 1e3, "-")
    bandwidth, rtt_ms = (network or NetworkSpec()).between(local_node, host_node)
    t_batch = (c.batch - c.guest_quota) * c.host_full + c.guest_quota * c.host_part
    caps = {
        "quota": c.guest_quota / t_batch if t_batch > 0 else 0.0,
        "network": bandwidth * 1e6 / 8 / max(c.bytes_out + c.bytes_back, 1),
        "local": 1.0 / c.local_part if c.local_part > 0 else float("inf"),
    }
    bottleneck = min(caps, key=caps.__getitem__)
    host = caps[bottleneck]
    local = max(0.0, 1.0 - host * c.local_part) / c.local_full
    transfer_s = (c.bytes_out + c.bytes_back) * 8 / (bandwidth * 1e6) if bandwidth != float("inf") else 0.0
    latency = (c.local_part + c.host_part + transfer_s) * 1e3 + rtt_ms
    before = 1.0 / c.host_full if c.host_full > 0 else 0.0
    after = (c.batch - c.guest_quota) / t_batch if t_batch > 0 else 0.0
    return Throughput(local, host, local_only, before, after, latency, bottleneck)
