"""What travels between replicas, and the emulated network between them.

- `Activation`: the tensor plus where it was produced, hops so far and emulated delay;
- `hop_delay_s`: the emulated one-way delay of a cross-node hop.
The path plan is `coderay.plan.plan_hops`; the routing state is `coderay.routing.Router`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from coderay.config import CoderayConfig

__all__ = ["Activation", "hop_delay_s"]


@dataclass(frozen=True)
class Activation:
    """A batch between two replicas: `x` (B, ...) and the node that produced it."""

    x: torch.Tensor
    node: str  # where `x` was produced (the receiver emulates the hop from here)
    hops: int = 0  # cross-node hops so far
    delay_ms: float = 0.0  # emulated network delay so far
    wire_bytes: int = 0  # bytes that crossed between nodes so far (as encoded on the wire)

    def moved(self, x: torch.Tensor, node: str, *, delay_s: float, crossed: bool) -> Activation:
        """The output `x` of the hop on `node` that received this activation (across the wire if `crossed`)."""
        return replace(
            self,
            x=x,
            node=node,
            hops=self.hops + int(crossed),
            delay_ms=self.delay_ms + delay_s * 1e3,
            wire_bytes=self.wire_bytes + (self.x.nbytes if crossed else 0),
        )

    def part(self, x: torch.Tensor, n: int, total: int) -> Activation:
        """Rows `x` of this batch (`n` of its `total` samples), with their share of the bytes on the wire."""
        return replace(self, x=x, wire_bytes=self.wire_bytes * n // total)


def hop_delay_s(cfg: CoderayConfig, src: str, dst: str, nbytes: int) -> float:
    """Emulated one-way delay of `nbytes` from node `src` to `dst`: RTT/2 + bytes / bandwidth (0 on one node)."""
    if src == dst or not cfg.serving.emulate_network:
        return 0.0
    bandwidth_mbps, rtt_ms = cfg.network.between(src, dst)
    return rtt_ms / 2e3 + (nbytes * 8 / (bandwidth_mbps * 1e6) if math.isfinite(bandwidth_mbps) else 0.0)
