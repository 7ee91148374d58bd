"""Load generators for HTTP serving benchmarks: open-loop Poisson arrivals and closed-loop clients.

Pure asyncio (no Ray), so a benchmark can drive any server with it and a test can check it against a toy
server. Requests go through `HttpClient`, a minimal HTTP/1.1 keep-alive client on asyncio streams: httpx's
AsyncClient costs several times more CPU per request, and on a 2-core machine the generator's CPU is taken
from the server it measures. The way MLPerf's Server scenario and Triton's perf_analyzer measure:

- `open_loop`: requests arrive as a Poisson process at an offered rate, whatever the server does. Each
  request's latency runs from its *scheduled* send time, so a late send (the generator or the server
  stalled) is counted as waiting, not hidden (no coordinated omission). At most `max_in_flight` requests are
  outstanding; an arrival that finds the bound hit is *dropped* (counted, never sent, never waited for).
- `closed_loop`: N clients, each sending its next request as soon as the last one is answered, for a time or
  a number of requests.
- `rate_search`: the highest offered rate whose step passes a check (`step_check`: p99 under a bound, no
  failure or drop, answers keeping up with arrivals): geometric steps up to the first failing rate, then
  bisection between the last pass and the first fail.

A request is an `async send(client, i) -> bool` supplied by the caller (`client`: an `HttpClient`; True: a good
answer); an exception in it counts as a failure. Each step reports the CPU seconds of the generator's own
thread (`time.thread_time`), so a reader can check the generator was not the limit.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = [
    "Send",
    "Step",
    "SearchResult",
    "HttpClient",
    "HttpError",
    "make_client",
    "open_loop",
    "closed_loop",
    "rate_search",
    "percentile",
    "step_check",
]

Send = Callable[["HttpClient", int], Awaitable[bool]]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


@dataclass
class Step:
    """One load step: what was asked, what came back, and what the generator itself cost."""

    mode: str  # "open" or "closed"
    offered_rps: float | None  # open loop: the Poisson rate asked for (requests/s)
    clients: int | None  # closed loop: concurrent clients
    duration_s: float  # the sending window
    wall_s: float = 0.0  # from the window's start to the last answer (≥ duration_s)
    scheduled: int = 0  # arrivals in the window (open loop) / requests started (closed loop)
    sent: int = 0
    ok: int = 0
    failed: int = 0  # bad answers, errors, timeouts, requests cut at the end of the drain
    dropped: int = 0  # arrivals not sent because max_in_flight requests were outstanding
    latencies_ms: list[float] = field(default_factory=list, repr=False)  # good answers, from scheduled time
    send_lag_ms: list[float] = field(default_factory=list, repr=False)  # actual send − scheduled send
    cpu_s: float = 0.0  # CPU seconds of the generator's thread during the step
    first_sched: float = math.nan  # scheduled times of the first and last request sent, first and last
    last_sched: float = math.nan  # good answer (perf_counter seconds)
    first_done: float = math.nan
    last_done: float = math.nan

    @property
    def failures(self) -> int:
        """Everything that was not a good answer: failed plus dropped."""
        return self.failed + self.dropped

    @property
    def arrival_rps(self) -> float:
        """The rate actually offered: arrivals in the window / its duration (Poisson: ≈ offered_rps ± √n)."""
        return self.scheduled / self.duration_s

    @property
    def achieved_rps(self) -> float:
        """Good answers per second over the step's wall time (a server that falls behind stretches it)."""
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def keeps_up(self) -> float | None:
        """Answer rate / arrival rate, each over its own span (first to last good answer; first to last
        request sent): ≈ 1 when the server keeps up, < 1 when answers trail out (a backlog drained after the
        window); unlike achieved / offered it carries no Poisson count noise and no ramp of one latency at the
        window's ends. None below 3 answers."""
        if self.ok < 3 or not self.last_sched > self.first_sched or not self.last_done > self.first_done:
            return None
        answers = (self.ok - 1) / (self.last_done - self.first_done)
        return answers / ((self.sent - 1) / (self.last_sched - self.first_sched))

    @property
    def p50_ms(self) -> float | None:
        return percentile(self.latencies_ms, 50)

    @property
    def p99_ms(self) -> float | None:
        return percentile(self.latencies_ms, 99)

    @property
    def lag_p99_ms(self) -> float | None:
        return percentile(self.send_lag_ms, 99)


class HttpError(Exception):
    """A malformed or cut HTTP response."""


class HttpClient:
    """A minimal HTTP/1.1 client over asyncio streams for one `http://host:port`: keep-alive connections
    (one per concurrent request, opened on demand, reused), a timeout per request, Content-Length or chunked
    responses. `await client.request(method, path, body, headers)` → (status, headers, body bytes)."""

    def __init__(self, base_url: str, *, timeout_s: float = 30.0):
        u = urlsplit(base_url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"expected http://host[:port], got {base_url!r}")
        self.host, self.port, self.timeout_s = u.hostname, u.port or 80, timeout_s
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._open: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for w in list(self._open):
            w.close()
        self._open.clear()
        self._idle.clear()

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        async with asyncio.timeout(self.timeout_s):
            if self._idle:
                reader, writer = self._idle.pop()
            else:
                reader, writer = await asyncio.open_connection(self.host, self.port)
                self._open.add(writer)
            try:
                head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Length: {len(body)}\r\n"
                head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
                writer.write(head.encode("latin-1") + b"\r\n" + body)
                status, resp_headers, data = await self._read_response(reader)
            except BaseException:
                self._open.discard(writer)
                writer.close()
                raise
        if resp_headers.get("connection", "").lower() == "close":
            self._open.discard(writer)
            writer.close()
        else:
            self._idle.append((reader, writer))
        return status, resp_headers, data

    async def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        return await self.request("GET", path)

    @staticmethod
    async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
        line = await reader.readline()
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise HttpError(f"bad status line {line[:80]!r}")
        status = int(parts[1])
        headers = {}
        while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = h.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            return status, headers, await reader.readexactly(int(headers["content-length"]))
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while size := int((await reader.readline()).split(b";")[0], 16):
                chunks.append(await reader.readexactly(size))
                await reader.readline()
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            return status, headers, b"".join(chunks)
        raise HttpError("response without Content-Length or chunked encoding")


def make_client(base_url: str, *, timeout_s: float = 30.0) -> HttpClient:
    return HttpClient(base_url, timeout_s=timeout_s)


async def _call(send: Send, client: HttpClient, i: int) -> bool:
    try:
        return bool(await send(client, i))
    except Exception:  # noqa: BLE001 — any error of a request is a failure of that request
        return False


async def open_loop(
    client: HttpClient,
    send: Send,
    rate: float,
    duration_s: float,
    *,
    max_in_flight: int = 64,
    drain_s: float = 30.0,
    seed: int = 0,
    first_index: int = 0,
) -> Step:
    """Poisson arrivals at `rate` requests/s for `duration_s`; waits up to `drain_s` for the last answers (the
    rest are cancelled and counted as failed). Latency is measured from each request's scheduled time."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"rate and duration must be positive, got {rate}, {duration_s}")
    step = Step("open", rate, None, duration_s)
    rng = random.Random(seed)
    clock = time.perf_counter
    pending: set[asyncio.Task] = set()
    last_done = 0.0

    async def one(i: int, scheduled: float) -> None:
        nonlocal last_done
        good = await _call(send, client, i)
        done = clock()
        last_done = max(last_done, done)
        if good:
            step.ok += 1
            step.latencies_ms.append((done - scheduled) * 1e3)
            step.first_done = min(step.first_done, done) if step.ok > 1 else done
            step.last_done = max(step.last_done, done) if step.ok > 1 else done
        else:
            step.failed += 1

    cpu0 = time.thread_time()
    t0 = clock()
    end = t0 + duration_s
    t = t0 + rng.expovariate(rate)
    i = first_index
    while t < end:
        wait = t - clock()
        if wait > 0:
            await asyncio.sleep(wait)
        step.scheduled += 1
        if len(pending) >= max_in_flight:
            step.dropped += 1
        else:
            step.sent += 1
            if step.sent == 1:
                step.first_sched = t
            step.last_sched = t
            step.send_lag_ms.append((clock() - t) * 1e3)
            task = asyncio.create_task(one(i, t))
            pending.add(task)
            task.add_done_callback(pending.discard)
        i += 1
        t += rng.expovariate(rate)
    if pending:
        _, late = await asyncio.wait(set(pending), timeout=drain_s)
        for task in late:
            task.cancel()
        if late:
            await asyncio.gather(*late, return_exceptions=True)
            step.failed += len(late)
    step.wall_s = max(duration_s, last_done - t0)
    step.cpu_s = time.thread_time() - cpu0
    return step


async def closed_loop(
    client: HttpClient,
    send: Send,
    clients: int,
    duration_s: float | None = None,
    *,
    requests: int | None = None,
    first_index: int = 0,
) -> Step:
    """`clients` concurrent clients, each sending back to back for `duration_s`, or until `requests` requests
    have been started in all (a request started is awaited to its end). Latency from each send."""
    if (duration_s is None) == (requests is None):
        raise ValueError("give exactly one of duration_s and requests")
    step = Step("closed", None, clients, duration_s or 0.0)
    clock = time.perf_counter
    counter = iter(range(first_index, 2**62))

    def more() -> bool:
        return clock() < end if requests is None else step.sent < requests

    async def client_loop() -> None:
        while more():
            start = clock()
            step.scheduled += 1
            step.sent += 1
            if await _call(send, client, next(counter)):
                step.ok += 1
                step.latencies_ms.append((clock() - start) * 1e3)
            else:
                step.failed += 1

    cpu0 = time.thread_time()
    t0 = clock()
    end = t0 + (duration_s or 0.0)
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    step.wall_s = clock() - t0
    if requests is not None:
        step.duration_s = step.wall_s
    step.cpu_s = time.thread_time() - cpu0
    return step


def step_check(step: Step, *, p99_ms: float, min_achieved: float = 0.95) -> str | None:
    """None when an open-loop step is sustained, else why not. Sustained: no failure or drop, p99 under the
    bound, and the server kept up: its answer rate ≥ min_achieved × the arrival rate, each over its own span
    (`Step.keeps_up`; not achieved / nominal offered, whose Poisson count noise alone is ±6% at 300
    arrivals)."""
    if step.failures:
        return f"{step.failed} failed, {step.dropped} dropped"
    if not step.ok:
        return "no answer in the window (nothing to judge)"
    if step.keeps_up is not None and step.keeps_up < min_achieved:  # None: under 3 answers, nothing to judge
        return f"answers at {step.keeps_up:.0%} of the arrival rate (< {min_achieved:.0%})"
    if step.p99_ms is None or step.p99_ms > p99_ms:
        return f"p99 {step.p99_ms or math.nan:.0f} ms > {p99_ms:g} ms"
    return None


@dataclass
class SearchResult:
    best_rps: float | None  # highest offered rate that passed (None: not even the lowest)
    first_fail_rps: float | None  # lowest offered rate that failed (None: the maximum passed)
    steps: list[tuple[Step, str | None]]  # in the order run, with why each failed (None: passed)


async def rate_search(
    run: Callable[[float], Awaitable[Step]],
    check: Callable[[Step], str | None],
    *,
    start: float,
    factor: float = 2.0,
    resolution: float = 0.1,
    max_rate: float = math.inf,
    min_rate: float = 0.1,
    max_steps: int = 20,
) -> SearchResult:
    """Geometric steps (start, start·factor, ...) up to the first failing rate (down from `start` if it fails),
    then bisection between the last pass and the first fail until they are within `resolution` (relative)."""
    if start <= 0 or factor <= 1:
        raise ValueError(f"start must be > 0 and factor > 1, got {start}, {factor}")
    steps: list[tuple[Step, str | None]] = []
    lo = hi = None

    async def attempt(rate: float) -> bool:
        step = await run(rate)
        why = check(step)
        steps.append((step, why))
        return why is None

    rate = min(start, max_rate)
    if await attempt(rate):
        lo = rate
        while len(steps) < max_steps and lo < max_rate:
            rate = min(lo * factor, max_rate)
            if await attempt(rate):
                lo = rate
            else:
                hi = rate
                break
    else:
        hi = rate
        while len(steps) < max_steps and hi / factor >= min_rate:
            rate = hi / factor
            if await attempt(rate):
                lo = rate
                break
            hi = rate
    while lo is not None and hi is not None and hi / lo - 1 > resolution and len(steps) < max_steps:
        mid = (lo + hi) / 2
        if await attempt(mid):
            lo = mid
        else:
            hi = mid
    return SearchResult(lo, hi, steps)
