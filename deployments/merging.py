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

Each request may bring a deadline, which bounds its whole stay: waiting in the queue and riding a chain. A
request whose deadline passes leaves (`DeadlineExceeded`) wherever it is; a chain that no request waits for any
more is cancelled, so its replica calls stop instead of computing answers nobody reads.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

from deployments.routing import Activation

__all__ = ["DeadlineExceeded", "Merger"]


class DeadlineExceeded(TimeoutError):
    """A request's deadline passed before its answer came."""


@dataclass(eq=False)
class _Waiting:
    """One submitted request: its input, where its answer goes, and the chain it left in (None while queued)."""

    x: torch.Tensor
    future: asyncio.Future
    chain: _Chain | None = None


@dataclass(eq=False)
class _Chain:
    requests: list[_Waiting]
    task: asyncio.Task | None = None
    abandoned: bool = False  # cancelled because no request waits for it


class Merger:
    """One path's queue: `await submit(x)` answers `x`'s rows of the merged chain's output."""

    def __init__(self, run: Callable[[torch.Tensor], Awaitable[Activation]], *, max_samples: int, depth: int):
        self.run, self.max_samples, self.depth = run, max_samples, depth
        self.queue: deque[_Waiting] = deque()
        self.waiting = 0  # samples in the queue
        self.in_flight = 0
        self.stats = {"chains": 0, "requests": 0, "max_requests_in_chain": 0, "expired": 0, "chains_cancelled": 0}

    async def submit(self, x: torch.Tensor, deadline: float | None = None) -> Activation:
        """`x`'s rows of its chain's output; `DeadlineExceeded` once `deadline` (`time.monotonic()`) passes first.
        However the wait ends early (deadline, the caller cancelled), the request leaves: out of the queue if it
        is still there, and its chain is cancelled if no other request waits for it."""
        request = _Waiting(x, asyncio.get_running_loop().create_future())
        self.queue.append(request)
        self.waiting += len(x)
        self._pump()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return await asyncio.wait_for(asyncio.shield(request.future), timeout)
        except TimeoutError:
            if request.future.done():  # the chain's own failure, not the deadline
                raise
            self.stats["expired"] += 1
            raise DeadlineExceeded(
                f"no answer before the request's deadline ({timeout:.3g} s after it was submitted)"
            ) from None
        finally:
            if not request.future.done():
                request.future.cancel()
                self._leave(request)

    def _leave(self, request: _Waiting) -> None:
        """A request that stopped waiting: out of the queue, or its chain cancelled when it was the last waiting."""
        chain = request.chain
        if chain is None:
            try:
                self.queue.remove(request)
                self.waiting -= len(request.x)
            except ValueError:  # already taken off by _pump (it skips requests no longer waiting)
                pass
            return
        if chain.task is not None and not chain.task.done() and all(r.future.done() for r in chain.requests):
            chain.abandoned = True
            self.stats["chains_cancelled"] += 1
            chain.task.cancel()

    def _pump(self) -> None:
        while self.queue and (
            self.in_flight == 0 or (self.in_flight < self.depth and self.waiting >= self.max_samples)
        ):
            taken: list[_Waiting] = []
            n = 0
            while self.queue and (not taken or n + len(self.queue[0].x) <= self.max_samples):
                request = self.queue.popleft()
                self.waiting -= len(request.x)
                if not request.future.done():  # a request that stopped waiting is not sent
                    taken.append(request)
                    n += len(request.x)
            if not taken:
                continue
            self.in_flight += 1
            self.stats["chains"] += 1
            self.stats["requests"] += len(taken)
            self.stats["max_requests_in_chain"] = max(self.stats["max_requests_in_chain"], len(taken))
            chain = _Chain(taken)
            for request in taken:
                request.chain = chain
            chain.task = asyncio.get_running_loop().create_task(self._chain(chain))

    async def _chain(self, chain: _Chain) -> None:
        taken = chain.requests
        try:
            xs = [r.x for r in taken]
            out = await self.run(xs[0] if len(xs) == 1 else torch.cat(xs))
            parts = (
                [out]
                if len(xs) == 1
                else [out.part(y, len(x), len(out.x)) for x, y in zip(xs, out.x.split([len(x) for x in xs]))]
            )
            for request, part in zip(taken, parts):
                if not request.future.done():
                    request.future.set_result(part)
        except BaseException as exc:  # noqa: BLE001 — every waiting request gets the chain's failure
            for request in taken:
                if not request.future.done():
                    request.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            if not isinstance(exc, Exception) and not chain.abandoned:
                raise
        finally:
            self.in_flight -= 1
            self._pump()
