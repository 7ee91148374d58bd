"""bench/loadgen.py against a tiny asyncio HTTP server started in the test (no Ray; a few seconds in all)."""

import asyncio
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import loadgen  # noqa: E402


class ToyServer:
    """HTTP/1.1 keep-alive on 127.0.0.1; `behave(path)` (async) returns the status of each request."""

    def __init__(self, behave):
        self.behave = behave
        self.requests = 0

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def _handle(self, reader, writer):
        try:
            while line := await reader.readline():
                path = line.decode().split(" ")[1]
                length = 0
                while (h := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = h.decode().partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                self.requests += 1
                status = await self.behave(path, self.requests)
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok".encode())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


async def post(client, i):
    status, _, body = await client.request("POST", "/x", b"0123", {"Content-Type": "application/octet-stream"})
    return status == 200 and body == b"ok"


async def fast(path, n):
    return 200


def test_open_loop_achieves_offered_rate_on_a_fast_server():
    async def main():
        async with ToyServer(fast) as srv, loadgen.make_client(srv.url, timeout_s=5) as c:
            return await loadgen.open_loop(c, post, 100, 0.6, seed=1)

    step = asyncio.run(main())
    assert step.failures == 0 and step.ok == step.scheduled > 35
    assert 0.7 * 100 <= step.achieved_rps <= 1.3 * 100  # Poisson: ~60 ± 8 arrivals in 0.6 s
    assert step.p99_ms < 200
    assert step.cpu_s > 0


def test_latency_counts_from_the_scheduled_time_when_the_server_stalls():
    # The server blocks the whole event loop (and so the generator too) for 0.5 s on one request: arrivals
    # scheduled during the stall are sent late, and their wait must show (a generator timing from its
    # actual send would see one slow request: coordinated omission).
    async def stall_once(path, n):
        if n == 25:
            time.sleep(0.5)
        return 200

    async def main():
        async with ToyServer(stall_once) as srv, loadgen.make_client(srv.url, timeout_s=5) as c:
            return await loadgen.open_loop(c, post, 100, 1.2, seed=2)

    step = asyncio.run(main())
    assert step.failures == 0
    slow = sum(ms > 250 for ms in step.latencies_ms)
    assert slow >= 10, (slow, step.scheduled)  # ~100/s × 0.25 s of arrivals waited > 250 ms
    assert step.p99_ms >= 400
    assert step.lag_p99_ms >= 250  # they were sent late: the lag is reported too


def test_failures_and_drops_are_counted_not_waited_for():
    async def every_fourth_fails(path, n):
        return 500 if n % 4 == 0 else 200

    async def hang(path, n):
        await asyncio.sleep(0.3)
        return 200

    async def main():
        async with ToyServer(every_fourth_fails) as srv, loadgen.make_client(srv.url, timeout_s=5) as c:
            failing = await loadgen.open_loop(c, post, 60, 0.6, seed=3)
        async with ToyServer(hang) as srv, loadgen.make_client(srv.url, timeout_s=5) as c:
            start = time.perf_counter()
            bounded = await loadgen.open_loop(c, post, 50, 0.6, max_in_flight=2, seed=4)
            bounded_s = time.perf_counter() - start
        async with ToyServer(hang) as srv, loadgen.make_client(srv.url, timeout_s=5) as c:
            cut = await loadgen.open_loop(c, post, 10, 0.3, drain_s=0.05, seed=5)
        return failing, bounded, bounded_s, cut

    failing, bounded, bounded_s, cut = asyncio.run(main())
    assert failing.failed == failing.scheduled // 4 and failing.dropped == 0
    assert loadgen.step_check(failing, p99_ms=1000) is not None
    # 2 in flight, each 0.3 s: the generator drops what it cannot send instead of slowing down
    assert bounded.dropped >= 0.5 * bounded.scheduled and bounded.sent + bounded.dropped == bounded.scheduled
    assert bounded_s < 0.6 + 0.3 + 0.3
    assert cut.failed == cut.sent and cut.ok == 0  # answers that outlive the drain are failures


def test_closed_loop_clients_send_back_to_back():
    async def slow(path, n):
        await asyncio.sleep(0.02)
        return 200

    async def main():
        async with ToyServer(slow) as srv, loadgen.make_client(srv.url, timeout_s=5) as c:
            return [await loadgen.closed_loop(c, post, n, 0.5) for n in (1, 4)]

    one, four = asyncio.run(main())
    assert one.failures == four.failures == 0
    assert 15 <= one.achieved_rps <= 55  # ~1 / 20 ms
    assert four.achieved_rps > 2.5 * one.achieved_rps  # the server overlaps its sleeps


def test_closed_loop_sends_exactly_the_requests_asked_for():
    seen: list[str] = []

    async def count(path, n):
        seen.append(path)
        await asyncio.sleep(0.005)
        return 200 if n % 10 else 500  # every tenth request a failure

    async def main():
        async with ToyServer(count) as srv, loadgen.make_client(srv.url, timeout_s=5) as c:
            return await loadgen.closed_loop(c, post, 7, requests=100)

    step = asyncio.run(main())
    assert len(seen) == step.sent == 100  # 7 clients, none overshoots the bound
    assert (step.ok, step.failed) == (90, 10) and len(step.latencies_ms) == 90
    assert step.duration_s == step.wall_s > 0
    with pytest.raises(ValueError):
        asyncio.run(loadgen.closed_loop(None, post, 1))


def test_rate_search_finds_the_capacity_of_a_server_limited_to_k_per_second():
    # steps of 0.6 s (~30 answers): latency jitter moves the answer span by ~10% of it, hence 0.85, not 0.95
    K = 50.0
    state = {"free": 0.0}

    async def capacity_k(path, n):
        # one request at a time, 1/K s each (a semaphore and a sleep, without the sleep's drift)
        now = time.perf_counter()
        start = max(now, state["free"])
        state["free"] = start + 1 / K
        await asyncio.sleep(state["free"] - now)
        return 200

    async def main():
        async with ToyServer(capacity_k) as srv, loadgen.make_client(srv.url, timeout_s=5) as c:
            seeds = iter(range(100))
            return await loadgen.rate_search(
                lambda rate: loadgen.open_loop(c, post, rate, 0.6, drain_s=2, seed=next(seeds)),
                lambda step: loadgen.step_check(step, p99_ms=300, min_achieved=0.85),
                start=20,
                factor=2,
                resolution=0.1,
            )

    res = asyncio.run(main())
    assert res.best_rps is not None and res.first_fail_rps > res.best_rps
    assert 0.75 * K <= res.best_rps <= 1.25 * K, [(round(s.offered_rps), why) for s, why in res.steps]
    rates = [s.offered_rps for s, _ in res.steps]
    assert rates[:2] == [20, 40] and all(r in (20, 40, 80) or 40 < r < 80 for r in rates)  # geometric, bisection


def test_rate_search_steps_down_when_the_first_rate_fails():
    async def run(rate):
        step = loadgen.Step(
            "open",
            rate,
            None,
            1.0,
            wall_s=1.0,
            scheduled=3,
            sent=3,
            ok=3,
            latencies_ms=[1.0] * 3,
            first_sched=0.0,
            last_sched=1.0,
            first_done=0.1,
            last_done=1.1,
        )
        if rate > 5:
            step.ok, step.failed = 0, 1
        return step

    res = asyncio.run(loadgen.rate_search(run, lambda s: loadgen.step_check(s, p99_ms=10), start=40, resolution=0.05))
    assert 5 * 0.95 / 1.05 <= res.best_rps <= 5 < res.first_fail_rps <= 5 * 1.05 / 0.95
