"""A trained service as the rest of coderay sees it: frozen blocks, their profiles, its node.

`ServiceProfile` is what a driver may know of a service (spec, node, block profiles, metrics: never task data or
weights), enough to enumerate candidates, score rows and schedule trials; `ServiceModel` adds the task data and
the blocks that run a path, and only exists where the service's node store is.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from coderay.blocks import Block, BlockInfo, profile_blocks, split_model
from coderay.config import CoderayConfig, NodeSpec, ServiceSpec
from coderay.data import TaskData
from coderay.emulation import node_capacity, speed_divisor, timing_as
from coderay.models import StagedModel
from coderay.store import service_dir
from coderay.train import load_service, train_service

__all__ = ["PROFILE_METHOD", "ServiceModel", "ServiceProfile", "load_services", "split_service", "sustained_block_ms"]

Shape = tuple[int, ...]
log = logging.getLogger(__name__)
PROFILE_METHOD = "chain-cpu"  # how capped blocks are timed; part of every cache key built on profiles


@dataclass
class ServiceProfile:
    """A service as far as its metadata goes: what a driver may hold of another node's service."""

    spec: ServiceSpec
    node: NodeSpec
    infos: list[BlockInfo]  # measured on this machine, under the node's CPU cap where one is in force
    metrics: dict  # from training: val_acc, test_acc, ...
    divisor: float | None = None  # profiled seconds / divisor = seconds on the node (None: node.speed)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_blocks(self) -> int:
        """N, the service's blocks: one profile each."""
        return len(self.infos)

    @property
    def boundaries(self) -> list[Shape]:
        """Per-sample shapes after block k, k = 0..N (0: the input)."""
        return [tuple(self.infos[0].in_shape)] + [tuple(i.out_shape) for i in self.infos]

    @property
    def block_params(self) -> list[int]:
        return [i.params for i in self.infos]

    def block_seconds(self, first: int, last: int) -> float:
        """Per-sample seconds of blocks first..last (1-based, inclusive) on this service's node at its batch size."""
        b = self.spec.batch_size
        divisor = self.node.speed if self.divisor is None else self.divisor
        return sum(self.infos[k - 1].latency_ms[b] / b for k in range(first, last + 1)) / 1e3 / divisor


@dataclass(kw_only=True)
class ServiceModel(ServiceProfile):
    """A service with what runs its paths: its task data and frozen blocks, on the node whose store holds them."""

    task: TaskData
    model: StagedModel | None  # None where the weights are elsewhere (a split-learning stand-in)
    blocks: Sequence[nn.Module]  # its Blocks, or a stand-in whose slices run elsewhere (`tuning.split.RemoteBlocks`)


def split_service(spec: ServiceSpec, model: StagedModel) -> list[Block]:
    return split_model(model, blocks=spec.blocks, cuts=spec.cuts)


def _profile(
    cfg: CoderayConfig, spec: ServiceSpec, blocks: Sequence[Block], input_shape: tuple[int, int, int]
) -> list[BlockInfo]:
    """Block profiles, measured once per (service checkpoint, cuts, batch size, node capacity, method) and
    cached beside the checkpoint. Under a CPU cap the blocks are timed inside their node's group
    (`sustained_block_ms`), so the throughput model describes the machine that serves."""
    cap = node_capacity(cfg)[spec.node]
    key = cfg.fingerprint(spec.blocks, spec.cuts, spec.batch_size, cap.share, cap.capped, PROFILE_METHOD)
    path = service_dir(cfg, spec) / f"profile-{key}.json"
    if path.exists():
        return [BlockInfo.from_dict(r) for r in json.loads(path.read_text())]
    b = spec.batch_size
    if not cap.capped:
        infos = profile_blocks(blocks, input_shape, batch_sizes=tuple(sorted({1, b})))
    else:
        infos = profile_blocks(blocks, input_shape, measure_latency=False)
        for info, ms in zip(infos, sustained_block_ms(cfg, spec, blocks, input_shape)):
            info.latency_ms = {b: ms}
        log.info("%s: blocks profiled under %s at %.3f CPU (node %s)", spec.name, cap.mechanism, cap.share, spec.node)
    path.write_text(json.dumps([i.to_dict() for i in infos], indent=2))
    return infos


def sustained_block_ms(
    cfg: CoderayConfig,
    spec: ServiceSpec,
    blocks: Sequence[nn.Module],
    input_shape: Shape,
    *,
    seconds: float = 1.5,
    cpu_clock: Callable[[], float] = time.thread_time,
) -> list[float]:
    """Milliseconds per batch of B for each block on the service's node: its CPU time inside the composed chain
    (the blocks run back to back as a replica runs them, one torch thread, a fresh batch each pass, for
    `seconds`), divided by the node's CPU share. A node with share c runs a CPU second in 1/c seconds; wall
    time measured under the quota is quantised by its 100 ms periods instead (the tail's share of the demo's
    model moved 0.44-0.59 between rounds that way, 0.45-0.47 by CPU time). `cpu_clock`: this thread's CPU
    seconds (a test gives a clock of its own to check the arithmetic without timing anything)."""
    b = spec.batch_size
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(b, *input_shape, generator=gen) for _ in range(8)]
    cpu = [0.0] * len(blocks)
    with timing_as(cfg, spec.node) as cap, torch.inference_mode():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            runs, start = 0, time.perf_counter()
            while runs < 3 or time.perf_counter() - start < seconds:
                x = batches[runs % len(batches)].clone()
                for k, block in enumerate(blocks):
                    t = cpu_clock()
                    x = block(x)
                    cpu[k] += cpu_clock() - t
                runs += 1
        finally:
            torch.set_num_threads(threads)
    share = cap.share if cap.share is not None else 1.0  # None: uncapped
    return [1e3 * c / runs / share for c in cpu]


def load_services(
    cfg: CoderayConfig, names: Sequence[str] | None = None, *, train_missing: bool = True, progress: bool = True
) -> dict[str, ServiceModel]:
    """Trained, split and profiled services; trains what is missing unless `train_missing` is False."""
    out = {}
    for spec in cfg.services:
        if names is not None and spec.name not in names:
            continue
        trained = train_service(cfg, spec, progress=progress) if train_missing else load_service(cfg, spec.name)
        blocks = split_service(spec, trained.model)
        infos = _profile(cfg, spec, blocks, trained.task.input_shape)
        out[spec.name] = ServiceModel(
            spec,
            cfg.node(spec.node),
            infos,
            trained.metrics,
            divisor=speed_divisor(cfg, spec.node),
            task=trained.task,
            model=trained.model,
            blocks=blocks,
        )
    return out
