"""Concurrent requests on one path merged into one chain of replica calls.

A replica call has a fixed cost (Serve's request handling, (de)serialisation, the hop) that on a small edge node
rivals the model itself; eight requests of eight samples each paid it eight times. A `Merger` keeps at most
`depth` chains of a path in flight; requests that arrive meanwhile wait and leave together, up to `max_samples`
samples, as one chain whose output is split back. No timer: an idle path sends a request at once, a busy one
sends bigger batches (adaptive batching, as in Clipper's AIMD batching or Triton's dynamic batcher without a
delay). A chain beyond the first leaves only full (`max_samples` waiting): at moderate load the second slot
would otherwise split the waiting requests into two half-size chains, paying the call's cost twice for the
same samples; once the load fills chains, `depth` of them keep every stage busy. A failed chain fails each of
its requests, which then take their own fallback.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

import torch

from deployments.routing import Activation

__all__ = ["Merger"]


class Merger:
    """One path's queue: `await submit(x)` answers `x`'s rows of the merged chain's output."""

    def __init__(self, run: Callable[[torch.Tensor], Awaitable[Activation]], *, max_samples: int, depth: int):
        self.run, self.max_samples, self.depth = run, max_samples, depth
        self.queue: deque[tuple[torch.Tensor, asyncio.Future]] = deque()
        self.waiting = 0                # samples in the queue
        self.in_flight = 0
        self.stats = {"chains": 0, "requests": 0, "max_requests_in_chain": 0}

    async def submit(self, x: torch.Tensor) -> Activation:
        future = asyncio.get_running_loop().create_future()
        self.queue.append((x, future))
        self.waiting += len(x)
        self._pump()
        return await future

    def _pump(self) -> None:
        while self.queue and (self.in_flight == 0 or
                              (self.in_flight < self.depth and self.waiting >= self.max_samples)):
            taken, n = [], 0
            while self.queue and (not taken or n + len(self.queue[0][0]) <= self.max_samples):
                x, future = self.queue.popleft()
                self.waiting -= len(x)
                if not future.done():           # a request cancelled while waiting is not sent
                    taken.append((x, future))
                    n += len(x)
            if not taken:
                continue
            self.in_flight += 1
            self.stats["chains"] += 1
            self.stats["requests"] += len(taken)
            self.stats["max_requests_in_chain"] = max(self.stats["max_requests_in_chain"], len(taken))
            asyncio.get_running_loop().create_task(self._chain(taken))

    async def _chain(self, taken: list[tuple[torch.Tensor, asyncio.Future]]) -> None:
        try:
            xs = [x for x, _ in taken]
            out = await self.run(xs[0] if len(xs) == 1 else torch.cat(xs))
            parts = [out] if len(xs) == 1 else [out.part(y, len(x), len(out.x))
                                                 for x, y in zip(xs, out.x.split([len(x) for x in xs]))]
            for (_, future), part in zip(taken, parts):
                if not future.done():
                    future.set_result(part)
        except BaseException as exc:  # noqa: BLE001 — every waiting request gets the chain's failure
            for _, future in taken:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            if not isinstance(exc, Exception):
                raise
        finally:
            self.in_flight -= 1
            self._pump()
