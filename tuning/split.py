"""Split learning for cooperative paths: the local service's frozen blocks stay on the local node.

A trial that trains the links of `L[1..lout] → link_in → H[hin..hout] → link_out → L[lin..N]` runs on the
host's node and holds the host's blocks and the links. The local blocks live in a `LocalSide` actor pinned
to the local node; the trial sees them through `RemoteBlocks`, a stand-in for `ServiceModel.blocks` whose
slices are single `RemoteSegment` modules, so `build_path`, `PathModule`, `fit`, `evaluate` and
`predict_path`/`train_path` run unchanged:

- forward: the host sends the activation entering a local segment (link_out's output; the raw input or
  L[1..lout] for the head), the local actor runs its blocks and returns their output (for the tail: the
  logits, which with the labels give the loss on the host, as in any split-learning setup);
- backward (training only): the host sends d loss / d logits, the local actor back-propagates through its
  frozen tail and returns d loss / d activation, which continues into link_out, the host blocks and link_in.

Only activations and their gradients cross nodes; no parameter does. Numerically this is the same
computation as the in-process path (same blocks, same order, one thread each side).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import cast

import numpy as np
import ray
import torch
from torch import nn

from coderay.cluster import pin
from coderay.config import CoderayConfig
from coderay.emulation import speed_divisor
from coderay.services import ServiceModel

__all__ = [
    "LocalSide",
    "RemoteSegment",
    "RemoteBlocks",
    "local_side",
    "stop_side",
    "remote_service",
    "NAMESPACE",
    "SIDE_THREADS",
    "WAITED",
]

log = logging.getLogger(__name__)
NAMESPACE = "coderay"
WAITED = {"calls": 0, "seconds": 0.0}  # this process's round trips to a local side and the time spent in them


SIDE_THREADS = 4  # calls a local side runs at once: trials on different hosts do not queue behind each other


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=SIDE_THREADS)  # type: ignore[call-overload]  # ray's typed remote() lacks max_concurrency
class LocalSide:
    """The local service's frozen blocks on its own node: forward, backward and timing for remote trials.

    One actor serves every trial of the search, up to `SIDE_THREADS` calls at once (one torch thread each; the
    blocks are frozen, so calls share them safely); a pending backward is keyed by the calling trial, which has
    at most one forward in flight. It computes at this machine's speed, like the trials (the node's CPU cap
    emulates serving, not the search). It runs only the block ranges of the search's candidates `paths`: a
    path's own blocks before its return (head, the link's targets) and its tail lin..N; any other range or path
    is refused.
    """

    def __init__(self, cfg: dict, local: str, paths: Sequence[str]):
        from coderay.pathspec import PathSpec
        from coderay.services import load_services

        torch.set_num_threads(1)
        self.cfg = CoderayConfig.model_validate(cfg)
        self.svc = load_services(self.cfg, [local], train_missing=False, progress=False)[local]
        self.paths = {p: PathSpec.parse(p) for p in paths}
        self.pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.busy = {"calls": 0, "seconds": 0.0, "cpu_seconds": 0.0}  # what its calls cost it (the profile)
        self.lock = threading.Lock()

    def _check(self, path_id: str, first: int, last: int) -> None:
        spec, n = self.paths.get(path_id), len(self.svc.blocks)
        if spec is None:
            raise PermissionError(f"{path_id!r} is not a candidate of this search: the local side refuses it")
        if not (1 <= first <= last and (last < spec.lin or (first, last) == (spec.lin, n))):
            raise PermissionError(
                f"blocks {first}..{last} are not a range of {path_id} (head or targets "
                f"1..{spec.lin - 1}, tail {spec.lin}..{n}): the local side refuses them"
            )

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def stats(self) -> dict:
        """Calls served and their wall and CPU seconds inside this actor (where the search's time goes)."""
        return dict(self.busy)

    def _count(self, began: float, cpu: float) -> None:
        with self.lock:
            self.busy["calls"] += 1
            self.busy["seconds"] += time.perf_counter() - began
            self.busy["cpu_seconds"] += time.thread_time() - cpu

    def describe(self) -> dict:
        """What the host may know about the local service: block profiles and accuracy, no weights."""
        return {"infos": self.svc.infos, "metrics": self.svc.metrics}

    def forward(self, path_id: str, key: str, first: int, last: int, x: np.ndarray, keep: bool) -> np.ndarray:
        """Blocks first..last (1-based) of candidate `path_id` on `x`; with `keep`, remember the graph for
        `backward(key, ...)`."""
        self._check(path_id, first, last)
        began, cpu = time.perf_counter(), time.thread_time()
        blocks = self.svc.blocks[first - 1 : last]
        t = torch.tensor(x)  # a copy: what Ray hands over may be read-only
        if not keep:
            with torch.inference_mode():
                for b in blocks:
                    t = b(t)
            self._count(began, cpu)
            return t.numpy()
        t.requires_grad_(True)
        out = t.clone()  # a non-leaf, so a block may start with an in-place op
        for b in blocks:
            out = b(out)
        self.pending[key] = (t, out)
        self._count(began, cpu)
        return out.detach().numpy()

    def backward(self, key: str, grad: np.ndarray) -> np.ndarray:
        """d loss / d input of the segment `key` ran forward last, given d loss / d output."""
        if key not in self.pending:
            raise RuntimeError(f"no pending forward for {key!r} (the local side restarted?): retry the trial")
        began, cpu = time.perf_counter(), time.thread_time()
        x, out = self.pending.pop(key)
        out.backward(torch.tensor(grad))
        self._count(began, cpu)
        assert x.grad is not None  # x requires grad and `out` was computed from it
        return x.grad.numpy()


def side_name(cfg: CoderayConfig, local: str) -> str:
    return f"split-{local}-{cfg.fingerprint(cfg.services, cfg.seed)}"


def stop_side(cfg: CoderayConfig, local: str, *, timeout_s: float = 10.0) -> None:
    """Kill `local`'s `LocalSide` and wait until its name is free (a next search creates a new one)."""
    import time

    try:
        side = local_side(cfg, local)
    except ValueError:
        return
    ray.kill(side)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            local_side(cfg, local)
        except ValueError:
            return
        time.sleep(0.1)


def local_side(
    cfg: CoderayConfig, local: str, *, create: bool = False, paths: Sequence[str] = ()
) -> ray.actor.ActorHandle:
    """The `LocalSide` actor of `local` (pinned to its node), serving the candidates `paths`; the driver
    creates it, trials look it up."""
    name = side_name(cfg, local)
    if not create:
        return ray.get_actor(name, namespace=NAMESPACE)
    node = cfg.node(cfg.service(local).node).name
    return LocalSide.options(  # type: ignore[attr-defined]  # a @ray.remote class
        name=name, namespace=NAMESPACE, get_if_exists=True, **pin(node)
    ).remote(cfg.model_dump(mode="json"), local, list(paths))


def _array(x: torch.Tensor) -> np.ndarray:
    """Activations travel as numpy arrays: Ray moves them with less overhead than pickled tensors."""
    return x.detach().contiguous().numpy()


def _waited(ref) -> torch.Tensor:
    began = time.perf_counter()
    out = torch.tensor(ray.get(ref))
    WAITED["calls"] += 1
    WAITED["seconds"] += time.perf_counter() - began
    return out


class _Backprop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, segment: RemoteSegment) -> torch.Tensor:
        ctx.segment = segment
        return segment.call(x, keep=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.segment.grad(grad), None


class RemoteSegment(nn.Module):
    """Local blocks first..last, run by the `LocalSide` actor; differentiable w.r.t. its input."""

    _ids = itertools.count()

    def __init__(self, side: ray.actor.ActorHandle, path_id: str, first: int, last: int):
        super().__init__()
        self.side, self.path_id, self.first, self.last = side, path_id, first, last
        self.key = f"{os.getpid()}-{id(self)}-{next(self._ids)}"

    def call(self, x: torch.Tensor, *, keep: bool) -> torch.Tensor:
        return _waited(self.side.forward.remote(self.path_id, self.key, self.first, self.last, _array(x), keep))

    def grad(self, grad: torch.Tensor) -> torch.Tensor:
        return _waited(self.side.backward.remote(self.key, _array(grad)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _Backprop.apply(x, self)
        return self.call(x, keep=False)

    def extra_repr(self) -> str:
        return f"blocks {self.first}..{self.last} on the local node"


class RemoteBlocks(Sequence):
    """Stands in for a service's block list: `blocks[i]` and every slice are one `RemoteSegment` (a slice
    gives a list of one segment, or none), so each contiguous run of local blocks costs one round trip."""

    def __init__(self, side: ray.actor.ActorHandle, n: int, path_id: str):
        self.side, self.n, self.path_id = side, n, path_id  # the candidate whose ranges it asks for

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(self.n)
            if step != 1:
                raise ValueError("remote blocks slice contiguously only")
            return [RemoteSegment(self.side, self.path_id, start + 1, stop)] if stop > start else []
        if not -self.n <= i < self.n:
            raise IndexError(i)
        i %= self.n
        return RemoteSegment(self.side, self.path_id, i + 1, i + 1)


def remote_service(cfg: CoderayConfig, local: str, side: ray.actor.ActorHandle, path_id: str) -> ServiceModel:
    """The local service as the host's trial sees it: spec, node, task data, profiles and accuracy, and
    `RemoteBlocks` in place of its weights."""
    from coderay.data import get_task

    spec = cfg.service(local)
    info = cast(dict, ray.get(side.describe.remote()))
    # ray's stubs type an actor method's .remote() as never returning: what follows is reachable
    task = get_task(spec.task, data_root=cfg.data_root, seed=cfg.seed)  # type: ignore[unreachable]
    return ServiceModel(
        spec=spec,
        node=cfg.node(spec.node),
        infos=info["infos"],
        metrics=info["metrics"],
        divisor=speed_divisor(cfg, spec.node),
        task=task,
        model=None,
        blocks=RemoteBlocks(side, len(info["infos"]), path_id),
    )
