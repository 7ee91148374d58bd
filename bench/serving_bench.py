"""Serving benchmark: coderay's HTTP serving measured the way serving benchmarks are (MLPerf Server, perf_analyzer).

For each measured path of each searched service (local-only; the best CoDE path of the reward table at the
model's split coop_fraction = th_host / th_total and at 1.0), in `--repeats` interleaved runs:
- open loop: Poisson arrivals of requests of `--batch` held-out test samples (raw float32, octet-stream) at
  rising offered rates (`--start-rps` × `--factor`^k, then bisection between the last pass and the first
  fail), `--step-s` seconds a step; per step offered vs achieved, p50/p99 from the scheduled send time,
  failures (non-200, `fallback: true`, timeouts, drops at `--max-in-flight`), accuracy of the answers served
  and the generator's own CPU seconds. Headline: the highest offered rate sustained with p99 ≤ `--p99-ms`,
  no failure and achieved ≥ 95% of the arrivals;
- closed loop: `--clients` N clients sending back to back;
beside the reward table's modelled figures (th_total, th_ratio), the edge-early baseline as a model row (it
cannot be served: it needs the local model mirrored on the host), and the raw-torch row (the same local
model's blocks composed, one process, one thread, same batch). Writes a Markdown report and a plot.

    .venv/bin/python bench/serving_bench.py [CONFIG] [--url http://HOST:PORT] [--batch 8] [--p99-ms 500]
        [--step-s 10] [--repeats 3] [--clients 1 8 32] [--out bench/results/serving.md]

Without `--url` it starts a local multi-node Ray cluster of the config, deploys the searched app on a free
port and shuts both down at the end (also on Ctrl-C / SIGTERM); with `--url` it measures a running
`coderay up` of the same CONFIG (pinned routes are released at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shlex
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# this checkout's coderay and deployments (not whichever one the venv's editable install points at)
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import loadgen  # noqa: E402

NOT_SEARCHED = "no reward table for config {name!r} (under {root}): run `coderay search CONFIG --in-process` first"


# ---------------------------------------------------------------------------------------------------- data


@dataclass
class Pool:
    """Pre-encoded requests covering the whole held-out test split once (a random order, the last batch
    wrapped around): request i sends batch i % len."""

    bodies: list[bytes]
    shapes: list[str]
    labels: list[np.ndarray]

    @classmethod
    def from_task(cls, task, batch: int, seed: int = 0) -> Pool:
        x = torch.stack([task.test[i][0] for i in range(len(task.test))])
        y = np.array([int(task.test[i][1]) for i in range(len(task.test))])
        pixels = task.denormalize(x).numpy().astype("<f4")  # raw [0, 1] pixels, as a client has
        order = np.random.default_rng(seed).permutation(len(y))
        order = np.concatenate([order, order[: (-len(order)) % batch]])
        pool = cls([], [], [])
        for idx in order.reshape(-1, batch):
            pool.bodies.append(pixels[idx].tobytes())
            pool.shapes.append(",".join(map(str, pixels[idx].shape)))
            pool.labels.append(y[idx])
        return pool


@dataclass
class Tally:
    """What the answers of one step said (beside loadgen's counts)."""

    samples: int = 0
    correct: int = 0
    fallbacks: int = 0
    statuses: Counter = field(default_factory=Counter)
    by_path: Counter = field(default_factory=Counter)
    emulated: set = field(default_factory=set)
    delay_ms: list = field(default_factory=list)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.samples if self.samples else None


class Service:
    """One service under test: its requests, the route control and the tally of the step running."""

    def __init__(self, name: str, pool: Pool):
        self.name, self.pool, self.tally = name, pool, Tally()
        self.path = f"/v1/services/{name}/infer?top_k=1"

    async def send(self, client: loadgen.HttpClient, i: int) -> bool:
        k = i % len(self.pool.bodies)
        status, _, data = await client.request(
            "POST",
            self.path,
            self.pool.bodies[k],
            {"Content-Type": "application/octet-stream", "X-Shape": self.pool.shapes[k]},
        )
        t = self.tally
        t.statuses[status] += 1
        if status != 200:
            return False
        ans = json.loads(data)
        if ans["fallback"]:
            t.fallbacks += 1
            return False
        labels = self.pool.labels[k]
        t.samples += len(labels)
        t.correct += sum(p["class_index"] == int(y) for p, y in zip(ans["predictions"], labels))
        t.by_path[ans["path"]] += 1
        t.emulated.add(ans["network"]["emulated"])
        t.delay_ms.append(ans["network"]["delay_ms"])
        return True


async def call_json(client: loadgen.HttpClient, method: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else b""
    status, _, out = await client.request(method, path, data, {"Content-Type": "application/json"})
    if status != 200:
        raise RuntimeError(f"{method} {path} -> {status}: {out[:300].decode(errors='replace')}")
    return json.loads(out)


# ---------------------------------------------------------------------------------------------------- figures


def med(values: Sequence[float | None]) -> tuple[float, float, float] | None:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return (statistics.median(v), min(v), max(v)) if v else None


def fmt(values: Sequence[float | None], digits: int = 0, scale: float = 1.0) -> str:
    """'median (min–max)' of the runs, '–' when none."""
    m = med(values)
    if m is None:
        return "–"
    a, lo, hi = (x * scale for x in m)
    if len(values) == 1 or lo == hi:
        return f"{a:.{digits}f}"
    return f"{a:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def step_record(step: loadgen.Step, tally: Tally, batch: int) -> dict:
    """One step's figures (open-loop steps get `passed` and `why` from the rate search's check)."""
    return {
        "mode": step.mode,
        "offered_rps": step.offered_rps,
        "clients": step.clients,
        "arrival_rps": step.arrival_rps if step.mode == "open" else None,
        "arrival_sps": step.arrival_rps * batch if step.mode == "open" else None,
        "keeps_up": step.keeps_up if step.mode == "open" else None,
        "achieved_rps": step.achieved_rps,
        "achieved_sps": step.achieved_rps * batch,
        "p50_ms": step.p50_ms,
        "p99_ms": step.p99_ms,
        "sent": step.sent,
        "ok": step.ok,
        "failed": step.failed,
        "dropped": step.dropped,
        "fallbacks": tally.fallbacks,
        "accuracy": tally.accuracy,
        "by_path": dict(tally.by_path),
        "statuses": {str(k): v for k, v in tally.statuses.items()},
        "cpu_s": step.cpu_s,
        "wall_s": step.wall_s,
        "lag_p99_ms": step.lag_p99_ms,
        "emulated": sorted(tally.emulated),
        "delay_ms": statistics.median(tally.delay_ms) if tally.delay_ms else None,
        "load1": os.getloadavg()[0],
    }


# ---------------------------------------------------------------------------------------------------- the runs


@dataclass
class Route:
    key: str  # label in the tables
    service: str
    path_id: str
    coop_fraction: float
    row: dict  # its reward-table row
    note: str


def choose_routes(svc: str, rows: list[dict]) -> tuple[list[Route], dict | None, dict | None]:
    """(routes to measure, the best CoDE row, the best edge-early baseline row) of `svc`."""
    local_id = f"{svc}:local"
    local_row = next(
        (r for r in rows if r["path_id"] == local_id), {"path_id": local_id, "th_total": None, "th_ratio": 1.0}
    )
    routes = [Route(local_id, svc, local_id, 1.0, local_row, "local-only")]
    code = [
        r for r in rows if r.get("kind") in ("coop", "skip") and r.get("links_file") and r.get("reward") is not None
    ]
    best = max(code, key=lambda r: r["reward"]) if code else None
    if best is not None:
        th_host, th_total = best.get("th_host") or 0.0, best.get("th_total") or 0.0
        split = th_host / th_total if th_total else 1.0
        if best["kind"] == "coop" and 0 < split < 1:
            routes.append(
                Route(
                    f"{best['path_id']} @ {split:.2f}",
                    svc,
                    best["path_id"],
                    split,
                    best,
                    "the model's split: coop_fraction = th_host / th_total",
                )
            )
        routes.append(Route(f"{best['path_id']} @ 1.00", svc, best["path_id"], 1.0, best, "every request on the path"))
    baselines = [r for r in rows if r.get("kind") not in ("local", "coop", "skip") and r.get("reward") is not None]
    edge = max(baselines, key=lambda r: r["reward"]) if baselines else None
    return routes, best, edge


async def measure_route(
    client: loadgen.HttpClient,
    route: Route,
    svc: Service,
    first_run: bool,
    args,
    seeds,
    log,
    raw_now: Callable[[str], float] | None = None,
) -> dict:
    """One run of one path: pin it, warm up, the open-loop rate search, then the closed-loop clients, each
    between two timings of raw torch (`raw_now(service)`, samples/s, the server idle) when given."""
    body: dict[str, object] = {"path": route.path_id}
    if route.path_id != f"{route.service}:local":
        body["coop_fraction"] = route.coop_fraction
    await call_json(client, "PUT", f"/v1/services/{route.service}/route", body)
    # warm-up, not recorded; longer the first time a path runs (cold replicas, first batches)
    await loadgen.closed_loop(client, svc.send, 2, args.warmup_s * (3 if first_run else 1))

    records: list[dict] = []

    async def run(rate: float) -> loadgen.Step:
        svc.tally = Tally()
        step = await loadgen.open_loop(
            client,
            svc.send,
            rate,
            args.step_s,
            max_in_flight=args.max_in_flight,
            drain_s=args.timeout_s,
            seed=next(seeds),
        )
        records.append(step_record(step, svc.tally, args.batch))
        return step

    def check(step: loadgen.Step) -> str | None:  # called by rate_search right after run(): records[-1]
        why = loadgen.step_check(step, p99_ms=args.p99_ms)
        r = records[-1]
        r.update(passed=why is None, why=why)
        log(
            f"  open    {route.key:<32} offered {step.offered_rps * args.batch:7.1f} achieved "
            f"{r['achieved_sps']:7.1f} samples/s  p50 {r['p50_ms'] or math.nan:6.0f}  p99 "
            f"{r['p99_ms'] or math.nan:6.0f} ms  fail {step.failed}+{step.dropped}  acc "
            f"{r['accuracy'] or math.nan:.3f}  cpu {step.cpu_s:.2f} s  {why or 'pass'}"
        )
        return why

    search = await loadgen.rate_search(
        run, check, start=args.start_rps, factor=args.factor, resolution=args.resolution, max_steps=args.max_steps
    )
    closed: list[dict] = []
    out = {"search": records, "best_rps": search.best_rps, "first_fail_rps": search.first_fail_rps, "closed": closed}
    for n in args.clients:
        svc.tally = Tally()
        raw_before = raw_now(route.service) if raw_now else None
        replicas_before = await replicas_or_none(client)
        step = await loadgen.closed_loop(client, svc.send, n, args.step_s)
        c = step_record(step, svc.tally, args.batch)
        c["replicas"] = replica_costs(replicas_before, await replicas_or_none(client), step.wall_s)
        if raw_now and raw_before is not None:
            # the raw-torch rate of the same minutes: this machine's speed drifts by ±20% within minutes
            c["raw_sps"] = (raw_before + raw_now(route.service)) / 2
        closed.append(c)
        log(
            f"  closed  {route.key:<32} {n:>3} clients  {c['achieved_sps']:7.1f} samples/s  "
            f"p50 {c['p50_ms'] or math.nan:6.0f}  p99 {c['p99_ms'] or math.nan:6.0f} ms  "
            f"failed {c['failed']}  cpu {c['cpu_s']:.2f} s  raw torch {c.get('raw_sps') or math.nan:.0f}"
        )
    return out


async def replicas_or_none(client: loadgen.HttpClient) -> dict | None:
    try:
        return await call_json(client, "GET", "/v1/debug/replicas")
    except Exception:  # noqa: BLE001 — a step without replica figures is still a step
        return None


def replica_costs(before: dict | None, after: dict | None, wall_s: float) -> dict[str, dict]:
    """Per block group over one step: CPU used per second (its node's group where capped, else its process),
    calls, samples per call, the model's CPU per sample and everything else's CPU per call."""
    if not before or not after or "replicas" not in before or "replicas" not in after:
        return {}
    old = {r.get("deployment"): r for r in before["replicas"] if "error" not in r}
    out = {}
    for r in after["replicas"]:
        prev = old.get(r.get("deployment"))
        if "error" in r or prev is None:
            continue
        d = {k: r["stats"].get(k, 0) - prev["stats"].get(k, 0) for k in ("calls", "samples", "compute_cpu_s")}
        cpu = _replica_cpu_s(r) - _replica_cpu_s(prev)
        if d["calls"] > 0:
            out[r["deployment"]] = {
                "cpu_per_s": cpu / wall_s,
                "calls": d["calls"],
                "samples_per_call": d["samples"] / d["calls"],
                "model_ms_per_sample": 1e3 * d["compute_cpu_s"] / max(d["samples"], 1),
                "other_ms_per_call": 1e3 * (cpu - d["compute_cpu_s"]) / d["calls"],
            }
    return out


def saturation_cost_lines(routes: list[Route], runs: dict, reps: int, clients: list[int]) -> list[str]:
    """Each path's block groups in its closed-loop steps at the most clients: what a sample costs where it runs."""
    j = clients.index(max(clients))
    lines = [
        f"Per path, each block group over the closed-loop steps at {clients[j]} clients (medians of the runs; CPU "
        "per second against the node's share shows which node bound the path):",
        "",
        "| path | replica | CPU used / s | samples/call | model CPU ms/sample | other CPU ms/call |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for route in routes:
        costs = [
            runs[(route.key, rep)]["closed"][j].get("replicas") or {} for rep in range(reps) if (route.key, rep) in runs
        ]
        for dep in sorted({d for c in costs for d in c}):
            got = [c[dep] for c in costs if dep in c]
            lines.append(
                f"| `{route.key}` | `{dep}` | {fmt([g['cpu_per_s'] for g in got], 2)} | "
                f"{fmt([g['samples_per_call'] for g in got], 1)} | "
                f"{fmt([g['model_ms_per_sample'] for g in got], 2)} | "
                f"{fmt([g['other_ms_per_call'] for g in got], 1)} |"
            )
    return lines


async def measure(
    url: str,
    routes: list[Route],
    services: dict[str, Service],
    args,
    log,
    raw_now: Callable[[str], float] | None = None,
) -> dict:
    """Every run: {"runs": {(route key, repeat): measure_route's dict}, "replicas": ..., "routes_released": ...};
    the paths interleaved within each run, every pinned route released at the end (also when cancelled)."""
    results: dict = {}
    facts: dict = {"replicas": None, "routes_released": []}
    seeds = iter(range(1, 10**9))
    async with loadgen.make_client(url, timeout_s=args.timeout_s) as client:
        try:
            facts["replicas"] = await call_json(client, "GET", "/v1/debug/replicas")
        except Exception as e:  # noqa: BLE001 — a report without replica facts is still a report
            facts["replicas"] = {"error": repr(e)}
        try:
            for rep in range(args.repeats):
                for route in routes:
                    out = await measure_route(
                        client, route, services[route.service], rep == 0, args, seeds, log, raw_now
                    )
                    results[(route.key, rep)] = out
                    best = f"{out['best_rps'] * args.batch:.0f} samples/s" if out["best_rps"] else "none"
                    log(f"run {rep + 1}/{args.repeats} {route.key}: sustained {best}")
        finally:
            try:
                facts["replicas_after"] = await call_json(client, "GET", "/v1/debug/replicas")
            except Exception as e:  # noqa: BLE001
                facts["replicas_after"] = {"error": repr(e)}
            for svc_name in services:
                try:
                    await call_json(client, "DELETE", f"/v1/services/{svc_name}/route")
                    facts["routes_released"].append(svc_name)
                except Exception as e:  # noqa: BLE001
                    log(f"could not release the route of {svc_name}: {e}")
    return {"runs": results, **facts}


async def until_signal(coro):
    """Run `coro`, cancelling it on SIGINT or SIGTERM (its `finally` blocks run: routes are released); the
    cancellation then propagates to the caller."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None  # a coroutine runs in a task
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await coro
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


class RawTorch:
    """The local model's blocks composed, in this process, one torch thread, at `batch`: built once, timed as
    often as asked (before the server starts, and around every closed-loop step). Where the config pins cores
    (`emulation.pin_cores`) it is timed on the service's node's cores, those its replica computes on: this
    VM's cores differ in speed from minute to minute, so another core would compare two machines."""

    def __init__(self, cfg, svc: str, batch: int):
        from coderay.emulation import core_plan
        from coderay.services import split_service
        from coderay.train import load_service

        trained = load_service(cfg, svc)
        self.model = torch.nn.Sequential(*split_service(trained.spec, trained.model)).eval()
        self.cores = core_plan(cfg).get(trained.spec.node)
        self.batch = batch
        test = trained.task.test
        assert isinstance(test, Sized)  # a TensorDataset or a Subset
        self.x = torch.stack([test[i][0] for i in range(len(test))])
        self.y = torch.tensor([int(test[i][1]) for i in range(len(test))])
        self.batches = [self.x[i : i + batch] for i in range(0, len(self.x) - batch + 1, batch)] or [self.x[:batch]]

    def accuracy(self) -> float:
        """Over the whole test split."""
        b = self.batch
        with torch.inference_mode():
            correct = sum(
                int((self.model(self.x[i : i + b]).argmax(1) == self.y[i : i + b]).sum())
                for i in range(0, len(self.x), b)
            )
        return correct / len(self.x)

    def rate(self, seconds: float) -> float:
        """Samples/s over `seconds` of back-to-back batches (this thread on the node's cores, if pinned)."""
        before = os.sched_getaffinity(0)
        if self.cores:
            os.sched_setaffinity(0, self.cores)
        try:
            with torch.inference_mode():
                n, start = 0, time.perf_counter()
                while time.perf_counter() - start < seconds:
                    self.model(self.batches[n % len(self.batches)])
                    n += 1
            return n * self.batch / (time.perf_counter() - start)
        finally:
            os.sched_setaffinity(0, before)


# ---------------------------------------------------------------------------------------------------- report


def ladder_table(routes: list[Route], runs: dict, repeats: int, batch: int) -> list[str]:
    """Every open-loop step, grouped by offered rate over the runs (the geometric rates recur in every run)."""
    lines = [
        "| path | offered samples/s | runs (pass) | arriving samples/s | achieved samples/s | answers / arrivals "
        "| p50 ms | p99 ms | failed + dropped | accuracy served | generator CPU s / step | send lag p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for route in routes:
        steps = [s for rep in range(repeats) for s in runs.get((route.key, rep), {}).get("search", [])]
        for rate in sorted({round(s["offered_rps"], 6) for s in steps}):
            at = [s for s in steps if round(s["offered_rps"], 6) == rate]
            lines.append(
                f"| `{route.key}` | {rate * batch:.0f} | {len(at)} ({sum(s['passed'] for s in at)}) | "
                f"{fmt([s['arrival_sps'] for s in at])} | {fmt([s['achieved_sps'] for s in at])} | "
                f"{fmt([s['keeps_up'] for s in at], 0, 100)}% | {fmt([s['p50_ms'] for s in at])} | "
                f"{fmt([s['p99_ms'] for s in at])} | {fmt([s['failed'] + s['dropped'] for s in at])} | "
                f"{fmt([s['accuracy'] for s in at], 1, 100)}% | {fmt([s['cpu_s'] for s in at], 2)} | "
                f"{fmt([s['lag_p99_ms'] for s in at], 1)} |"
            )
    return lines


def plot(routes: list[Route], runs: dict, repeats: int, batch: int, p99_ms: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    top = 0.0
    for route in routes:
        steps = [s for rep in range(repeats) for s in runs.get((route.key, rep), {}).get("search", [])]
        if not steps:
            continue
        rates = sorted({round(s["offered_rps"], 6) for s in steps})
        at = {r: [s for s in steps if round(s["offered_rps"], 6) == r] for r in rates}
        xs = [r * batch for r in rates]
        ach = [statistics.median(s["achieved_sps"] for s in at[r]) for r in rates]
        p99 = [
            statistics.median(s["p99_ms"] for s in at[r] if s["p99_ms"] is not None)
            if any(s["p99_ms"] is not None for s in at[r])
            else math.nan
            for r in rates
        ]
        (line,) = ax1.plot(xs, ach, "o-", label=route.key)
        ax2.plot(xs, p99, "o-", color=line.get_color(), label=route.key)
        best = [runs[(route.key, rep)]["best_rps"] for rep in range(repeats) if (route.key, rep) in runs]
        best = [b * batch for b in best if b]
        if best:  # the headline: the highest offered rate sustained (median of the runs)
            ax1.plot(
                [statistics.median(best)],
                [statistics.median(best)],
                "*",
                ms=15,
                color=line.get_color(),
                markeredgecolor="k",
            )
        top = max(top, *xs)
    ax1.plot([0, top], [0, top], "k:", lw=1, label="achieved = offered; ★ sustained (headline)")
    ax1.set(xlabel="offered samples/s (Poisson)", ylabel="achieved samples/s", title="throughput (median of runs)")
    ax2.axhline(p99_ms, color="k", ls=":", lw=1, label=f"p99 bound {p99_ms:g} ms")
    ax2.set(
        xlabel="offered samples/s (Poisson)",
        ylabel="p99 latency ms (from scheduled send)",
        yscale="log",
        title="p99 latency (median of runs)",
    )
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replica_lines(replicas: dict | None) -> list[str]:
    if not replicas or "replicas" not in replicas:
        return [f"- Replicas: not read ({(replicas or {}).get('error', 'no answer')})."]
    out = [
        "| replica | node | on its pinned node | torch threads | capacity (CPU cap) | cores |",
        "|---|---|---|---:|---|---|",
    ]
    for r in replicas["replicas"]:
        if "error" in r:
            out.append(f"| ? | ? | ? | ? | error: {r['error'][:80]} | ? |")
            continue
        cap = r.get("capacity")
        if isinstance(cap, dict):
            cap_s = (
                f"{cap.get('mechanism')}, share {cap.get('share') if cap.get('share') is not None else '–'} "
                f"CPU, scale {cap.get('scale') if cap.get('scale') is not None else '–'}"
            )
        else:
            cap_s = "not reported (no `capacity` field)" if cap is None else f"unexpected: {cap!r}"
        out.append(
            f"| `{r.get('deployment')}` | {r.get('node')} | {r.get('on_pinned_node')} | "
            f"{r.get('torch_threads', '–')} | {cap_s} | {_cores(r.get('cores'))} |"
        )
    ingress = replicas.get("ingress") or {}
    out.append(f"| ingress | head | – | – | – | {_cores(ingress.get('cores'))} |")
    return out


def _cores(cores) -> str:
    return ",".join(map(str, cores)) if cores else "–"


def call_cost_lines(before: dict | None, after: dict | None, configured_ms: float) -> list[str]:
    """What a replica call costs beyond the model, measured over the whole benchmark: each block group's CPU
    seconds (its node's group where capped, else its process; idle time included) minus the model's own CPU
    (`compute_cpu_s`), per call."""
    if not before or not after or "replicas" not in before or "replicas" not in after:
        return ["- Replica call costs: not read."]
    out = [
        f"Replica calls over the whole benchmark (the model charges `serving.call_overhead_ms` = "
        f"{configured_ms:g} CPU ms per call; the measured figure includes the replica's idle CPU):",
        "",
        "| replica | calls | samples/call | model CPU ms/sample | other CPU ms/call |",
        "|---|---:|---:|---:|---:|",
    ]
    for dep, c in replica_costs(before, after, 1.0).items():
        out.append(
            f"| `{dep}` | {c['calls']} | {c['samples_per_call']:.1f} | {c['model_ms_per_sample']:.2f} | "
            f"{c['other_ms_per_call']:.1f} |"
        )
    merged = (after.get("ingress") or {}).get("merged") or {}
    if merged:
        out += [
            "",
            "Requests merged per chain in the ingress: "
            + "; ".join(
                f"`{p}` {m['requests'] / max(m['chains'], 1):.2f} (max {m['max_requests_in_chain']})"
                for p, m in merged.items()
            ),
        ]
    return out


def _replica_cpu_s(info: dict) -> float:
    cap = info.get("capacity")
    if not isinstance(cap, dict):
        cap = {}
    return cap.get("cpu_s") or info.get("process_cpu_s") or 0.0


def closed_ratios(runs: dict, key: str, local_key: str, j: int, reps: int) -> list[float]:
    """Per run, closed-loop step `j` of path `key` over local-only's same step in that run."""
    return [
        runs[(key, rep)]["closed"][j]["achieved_sps"] / runs[(local_key, rep)]["closed"][j]["achieved_sps"]
        for rep in range(reps)
        if (key, rep) in runs and (local_key, rep) in runs and runs[(local_key, rep)]["closed"][j]["achieved_sps"]
    ]


def report(
    args, cfg, routes, best_rows, edge_rows, raw, measured, load_before, started, wall_s, mode, now=None, factors=None
) -> str:
    runs, batch, reps = measured["runs"], args.batch, args.repeats
    all_steps = [s for out in runs.values() for s in out["search"] + out["closed"]]
    loads = [s["load1"] for s in all_steps]
    emulated = sorted({e for s in all_steps for e in s["emulated"]})
    lines = ["# Serving benchmark (HTTP, Ray Serve): open-loop Poisson load, rate search, closed-loop clients", ""]
    if args.label:
        lines += [f"**{args.label}**", ""]
    lines += [
        f"- Command: `{shlex.join(['python', 'bench/serving_bench.py', *sys.argv[1:]])}`",
        f"- Machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}; date {started}; the whole run took "
        f"{wall_s / 60:.1f} min.",
        f"- Load average (1 min): {load_before:.2f} before; during the steps median "
        f"{fmt(loads, 2)} (min–max). Anything above the benchmark's own processes shares the cores with it.",
        f"- Server: {mode}. Config `{args.config}` "
        f"({', '.join(f'{n.name}: {n.cpus:g} CPU, speed {n.speed:g}' for n in cfg.nodes)}).",
        f"- Figures emulated? Responses' `network.emulated`: {emulated or 'no answer'} (cross-node hops delayed by "
        f"RTT/2 + bytes / bandwidth when true). Node capacity per replica (`GET /v1/debug/replicas`, field "
        "`capacity`) below.",
        f"- Requests: {batch} held-out test samples each (raw [0, 1] float32, `application/octet-stream`, "
        "`X-Shape`, `?top_k=1`), cycling through the whole test split in a fixed random order; accuracy is that "
        "of the answers served against the held-out labels.",
        f"- Open loop: Poisson arrivals, {args.step_s:g} s a step, at most {args.max_in_flight} requests in "
        "flight (an arrival finding the bound hit is dropped and counted as a failure); latency from each "
        "request's scheduled send time (no coordinated omission). Rate search: "
        f"{args.start_rps * batch:g} samples/s × {args.factor:g} per step up to the first failing rate, then "
        f"bisection to {args.resolution:.0%}; a step passes with p99 ≤ {args.p99_ms:g} ms, no failure (non-200, "
        "`fallback: true`, timeout, drop) and the server keeping up: answers / arrivals ≥ 95%, each rate over its "
        "own span (first to last answer; first to last request sent), which carries neither the Poisson noise of "
        "the arrival count nor the ramp of one latency at the window's ends. Closed loop: "
        f"{', '.join(map(str, args.clients))} clients back to back, {args.step_s:g} s each. Each run: a "
        f"{args.warmup_s:g} s warm-up per path (not recorded), then the search and the closed loop; paths "
        f"interleaved within each of {reps} runs (the first warm-up of a path is 3× as long). Every figure: median "
        "(min–max) of the runs.",
        f"- Generator: one asyncio thread with a minimal HTTP/1.1 keep-alive client (`bench/loadgen.py`); its "
        f"own CPU seconds per step (`time.thread_time`) are in the tables: at most "
        f"{max((s['cpu_s'] / s['wall_s'] for s in all_steps if s['wall_s']), default=0):.0%} of one core in any "
        "step.",
        "",
        "## Headline: highest offered load sustained",
        "",
        f"p99 ≤ {args.p99_ms:g} ms, 0 failures, answers / arrivals ≥ 95%. Model: the reward table's `th_total` "
        "(samples/s, with emulated node speeds) and `th_ratio` (× local-only), at the model's split "
        "th_host / th_total. Measured ratio: per run, this path's sustained rate / local-only's in the same run.",
        "",
        "| path | coop_fraction | sustained samples/s | p50 / p99 ms at it | accuracy served | share on the path "
        "| model th_total | model × local | measured × local |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for route in routes:
        local_key = f"{route.service}:local"
        outs = [o for rep in range(reps) if (o := runs.get((route.key, rep)))]
        best = [o["best_rps"] * batch if o["best_rps"] else None for o in outs]
        found = [
            next(
                (
                    s
                    for s in o["search"]
                    if s["passed"] and o["best_rps"] and abs(s["offered_rps"] - o["best_rps"]) < 1e-9
                ),
                None,
            )
            for o in outs
        ]
        at = [s for s in found if s]
        ratios = []
        for rep in range(reps):
            mine, base = runs.get((route.key, rep)), runs.get((local_key, rep))
            if mine and base and mine["best_rps"] and base["best_rps"]:
                ratios.append(mine["best_rps"] / base["best_rps"])
        share = [s["by_path"].get(route.path_id, 0) / max(1, sum(s["by_path"].values())) for s in at]
        row = route.row
        lines.append(
            f"| `{route.key}` | {route.coop_fraction:.2f} | {fmt(best)} | {fmt([s['p50_ms'] for s in at])} / "
            f"{fmt([s['p99_ms'] for s in at])} | {fmt([s['accuracy'] for s in at], 1, 100)}% | "
            f"{fmt(share, 0, 100)}% | {row.get('th_total') or math.nan:.0f} | {row.get('th_ratio') or math.nan:.2f} | "
            f"{fmt(ratios, 2)} |"
        )
    for svc, edge in edge_rows.items():
        if edge:
            lines.append(
                f"| `{edge['path_id']}` (edge-early baseline of highest reward, model only: needs "
                f"{edge.get('mirrored_params')} of {svc}'s parameters mirrored on the host; not servable) "
                "| – | – | – | "
                f"{(edge.get('test_acc') or math.nan) * 100:.1f}% (test, model) | – | "
                f"{edge.get('th_total') or math.nan:.0f} | {edge.get('th_ratio') or math.nan:.2f} | – |"
            )
    for svc, r in raw.items():
        where = f", on its node's cores {r['cores']}" if r.get("cores") else ""
        lines.append(
            f"| `{svc}` raw torch (its blocks composed, one process, 1 thread, batch {batch}{where}, no HTTP) "
            f"| – | {fmt(r['samples_per_s'])} | – | {r['accuracy'] * 100:.1f}% | – | – | – | – |"
        )
    lines += [
        "",
        "## Closed loop: N clients back to back",
        "",
        "× raw torch: per run, samples/s over raw torch's (the same model, one process, one thread, batch "
        f"{batch}, on the node's cores where they are pinned) timed right before and after the step, the "
        "server idle: serving's overhead where emulation "
        "is off; under CPU caps the served model runs on a fraction of a CPU and raw torch on a whole one.",
        "",
        "| path | clients | samples/s | p50 ms | p99 ms | failed | accuracy served | measured × local "
        "| raw torch samples/s | × raw torch | generator CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for route in routes:
        local_key = f"{route.service}:local"
        for j, n in enumerate(args.clients):
            cs = [runs[(route.key, rep)]["closed"][j] for rep in range(reps) if (route.key, rep) in runs]
            ratios = closed_ratios(runs, route.key, local_key, j, reps)
            lines.append(
                f"| `{route.key}` | {n} | {fmt([c['achieved_sps'] for c in cs])} | "
                f"{fmt([c['p50_ms'] for c in cs])} | {fmt([c['p99_ms'] for c in cs])} | "
                f"{fmt([c['failed'] for c in cs])} | {fmt([c['accuracy'] for c in cs], 1, 100)}% | "
                f"{fmt(ratios, 2)} | {fmt([c.get('raw_sps') for c in cs])} | "
                f"{fmt([c['achieved_sps'] / c['raw_sps'] if c.get('raw_sps') else None for c in cs], 2)} | "
                f"{fmt([c['cpu_s'] for c in cs], 2)} |"
            )
    if now:
        j = len(args.clients) - 1
        lines += [
            "",
            f"## Model vs measured at saturation ({args.clients[j]} clients)",
            "",
            "The model twice: from the search's cached profiles, and re-scored with the blocks timed again "
            "right before the server started (time now ÷ cached, per node: "
            + ", ".join(f"{n} {f:.2f}" for n, f in (factors or {}).items())
            + "), the same machine the measurement saw. Error: model ÷ measured − 1.",
            "",
            "| path | measured samples/s | model (cached) | error | model (re-profiled) | error | measured × "
            "local | model × local (re-profiled) | error |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for route in routes:
            local_key = f"{route.service}:local"
            got = [
                runs[(route.key, rep)]["closed"][j]["achieved_sps"] for rep in range(reps) if (route.key, rep) in runs
            ]
            ratios = closed_ratios(runs, route.key, local_key, j, reps)
            cached, fresh = route.row.get("th_total"), now.get(route.key, {}).get("th_total")
            fresh_ratio = now.get(route.key, {}).get("th_ratio")
            model_split = (
                (route.row.get("th_host") or 0.0) / cached
                if route.row.get("kind") == "coop" and cached
                else route.coop_fraction
            )
            note = (
                f" (the model's Th is at its split {model_split:.2f})"
                if abs(model_split - route.coop_fraction) > 0.01
                else ""
            )
            med = statistics.median(got) if got else None
            rmed = statistics.median(ratios) if ratios else None
            err = lambda m, med=med: f"{m / med - 1:+.0%}" if m and med else "–"
            lines.append(
                f"| `{route.key}`{note} | {fmt(got)} | {cached or math.nan:.0f} | {err(cached)} | "
                f"{fresh or math.nan:.0f} | {err(fresh)} | {fmt(ratios, 2)} | {fresh_ratio or math.nan:.2f} | "
                + (f"{fresh_ratio / rmed - 1:+.0%}" if fresh_ratio and rmed else "–")
                + " |"
            )
    lines += [
        "",
        "## Open-loop steps (every offered rate the searches ran)",
        "",
        "Geometric rates recur in every run; bisection rates usually appear once. Arriving: the Poisson "
        "arrivals actually drawn in the window; achieved: good answers / (window start to last answer); "
        "answers / arrivals: the pass criterion above. Send lag: how late the generator sent after the "
        "scheduled time (it is counted in the latency).",
        "",
    ]
    lines += ladder_table(routes, runs, reps, batch)
    lines += [
        "",
        f"Plot: `{args.plot.name}` (achieved vs offered samples/s and p99 vs offered, one line per path).",
        "",
        "## Replicas",
        "",
    ]
    lines += replica_lines(measured.get("replicas"))
    lines += [""] + saturation_cost_lines(routes, runs, reps, args.clients)
    lines += [""] + call_cost_lines(
        measured.get("replicas"), measured.get("replicas_after"), cfg.serving.call_overhead_ms
    )
    lines += [
        "",
        "Routes released at the end (`DELETE /v1/services/{svc}/route`): "
        f"{', '.join(measured.get('routes_released') or []) or 'none'}.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default=ROOT / "configs" / "demo.yaml", type=Path)
    p.add_argument("--url", help="measure a running `coderay up` of CONFIG at this base URL (default: start one)")
    p.add_argument("--workdir", help="override the config's workdir")
    p.add_argument("--service", nargs="+", help="services to measure (default: the search's locals)")
    p.add_argument("--batch", type=int, default=8, help="held-out samples per request (default 8)")
    p.add_argument("--p99-ms", type=float, default=500.0, help="p99 bound of a sustained rate (default 500)")
    p.add_argument("--step-s", type=float, default=10.0, help="seconds per load step (default 10)")
    p.add_argument("--start-rps", type=float, default=4.0, help="first offered rate, requests/s (default 4)")
    p.add_argument("--factor", type=float, default=2.0, help="geometric step of the rate search (default 2)")
    p.add_argument("--resolution", type=float, default=0.1, help="bisection stops within this (default 0.1)")
    p.add_argument("--max-steps", type=int, default=12, help="open-loop steps per search at most (default 12)")
    p.add_argument("--max-in-flight", type=int, default=64, help="outstanding requests at most (default 64)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="closed-loop clients (1 8 32)")
    p.add_argument("--repeats", type=int, default=3, help="runs; figures are medians (min–max) (default 3)")
    p.add_argument(
        "--warmup-s",
        type=float,
        default=3.0,
        help="closed-loop warm-up (2 clients) per path and run, 3× in the first run (default 3)",
    )
    p.add_argument("--timeout-s", type=float, default=30.0, help="per request, and the drain after a step")
    p.add_argument(
        "--front",
        choices=("proxy", "direct"),
        default="proxy",
        help="HTTP through the serving port (default: Ray's HAProxy ingress, or Serve's proxy with "
        "serving.haproxy off) or the ingress replica's own port (throughput-optimized)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving.md")
    p.add_argument("--plot", type=Path, help="default: OUT with .png")
    p.add_argument("--json", type=Path, help="also write every step's figures as JSON here")
    p.add_argument("--label", help="a line printed in bold at the top of the report (e.g. 'short validation run')")
    args = p.parse_args(argv)
    args.plot = args.plot or args.out.with_suffix(".png")
    if args.repeats < 1 or args.batch < 1 or args.step_s <= 0:
        p.error("--repeats, --batch and --step-s must be positive")
    return args


def reprofile(cfg, services: list[str], repeats: int = 3) -> dict[str, float]:
    """{node: its blocks' time now ÷ their cached profile}: the services' blocks timed again, as the search profiled
    them (under the node's CPU cap, sustained, batch B), right before the server starts. This machine's speed
    drifts by 10-20% over an hour (a VM's neighbours); the model re-scored with these factors describes the
    machine the bench measures, so the model-vs-measured comparison is made in the same run."""
    from coderay.services import load_services, sustained_block_ms

    factors = {}
    for svc in load_services(cfg, services, train_missing=False, progress=False).values():
        b = svc.spec.batch_size
        cached = sum(i.latency_ms[b] for i in svc.infos)  # BlockInfo.from_dict made JSON's keys ints again
        runs = [sum(sustained_block_ms(cfg, svc.spec, svc.blocks, svc.task.input_shape)) for _ in range(repeats)]
        factors[svc.spec.node] = statistics.median(runs) / cached
    return factors


def rescored(row: dict, factors: dict[str, float], cfg) -> dict:
    """The row's modelled figures with each node's costs scaled by its factor ({} for a row without costs)."""
    from coderay.rows import rescore, row_from_dict

    r = row_from_dict(row)
    return rescore(r, factors, cfg.reward, cfg.network).to_dict() if r.costs is not None else {}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    t_start = time.perf_counter()
    load_before = os.getloadavg()[0]

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    def sigterm_as_ctrl_c() -> None:
        """SIGTERM as Ctrl-C outside the measurement (which handles both itself, see `until_signal`); installed
        again after ray.init, whose driver replaces the handler."""
        signal.signal(signal.SIGTERM, on_term)

    sigterm_as_ctrl_c()

    from coderay.config import load_config
    from coderay.data import get_task
    from coderay.search import load_table

    cfg = load_config(args.config, **({"workdir": args.workdir} if args.workdir else {}))
    if not Path(cfg.workdir).is_absolute():
        cfg = cfg.model_copy(update={"workdir": str((ROOT / cfg.workdir).resolve())})

    cluster, rows_by_svc = None, {}
    if args.url:
        import httpx

        url = args.url.rstrip("/")
        services = [s["name"] for s in httpx.get(f"{url}/v1/services", timeout=30).json()]
        names = args.service or [s for s in services if s in (cfg.search.locals or services)]
        for s in names:
            body = httpx.get(f"{url}/v1/services/{s}/paths", timeout=30).json()
            rows_by_svc[s] = body["paths"] + body["baselines"]
        mode = f"a running coderay at {url} (`--url`)"
    else:
        table = load_table(cfg)
        if table is None:
            raise SystemExit(NOT_SEARCHED.format(name=cfg.name, root=cfg.root / "search"))
        names = args.service or table.locals
        rows_by_svc = {s: [r.to_dict() for r in table.rows if r.local == s] for s in names}
        mode = (
            "started by the bench: local Ray cluster (head 1 CPU for the proxy and ingress + one Ray node per "
            "configured node), `deployments.app.deploy` on a free port; HTTP through "
            + (
                (
                    "Ray's HAProxy ingress (`serving.haproxy`)"
                    if cfg.serving.haproxy and cfg.serving.throughput_optimized
                    else "Serve's proxy"
                )
                if args.front == "proxy"
                else "the ingress replica's own port (direct ingress)"
            )
            + f"; Serve throughput-optimized: {cfg.serving.throughput_optimized}"
        )

    routes, best_rows, edge_rows = [], {}, {}
    for s in names:
        svc_routes, best_rows[s], edge_rows[s] = choose_routes(s, rows_by_svc[s])
        routes += svc_routes
    for route in routes:
        log(
            f"path {route.key}: {route.note}; model th_total {route.row.get('th_total')}, "
            f"th_ratio {route.row.get('th_ratio')}"
        )
    for edge in edge_rows.values():
        if edge:
            log(
                f"model only: {edge['path_id']} (edge-early baseline) th_total {edge.get('th_total'):.0f} samples/s, "
                f"{edge.get('th_ratio'):.2f}× local, test acc {edge.get('test_acc')}, mirrored params "
                f"{edge.get('mirrored_params')}: not servable"
            )

    log("raw torch rows (before any server load)")
    raw_models = {s: RawTorch(cfg, s, args.batch) for s in names}
    raw: dict[str, dict[str, Any]] = {
        s: {
            "accuracy": m.accuracy(),  # first: it also warms the model up before the timing
            "samples_per_s": [m.rate(min(args.step_s, 5.0)) for _ in range(args.repeats)],
            "cores": list(m.cores or []),
        }
        for s, m in raw_models.items()
    }
    for s, r in raw.items():
        log(f"  raw torch {s}: {fmt(r['samples_per_s'])} samples/s, accuracy {r['accuracy']:.4f}")
    now: dict[str, dict] = {}
    factors: dict[str, float] = {}
    if not args.url:
        hosts = {r["host"] for r in best_rows.values() if r and r.get("host")}
        factors = reprofile(cfg, sorted(set(names) | hosts))
        for route in routes:
            now[route.key] = rescored(route.row, factors, cfg)
        for route in routes:
            local = now.get(f"{route.service}:local") or {}
            if now[route.key].get("th_total") and local.get("th_total"):
                now[route.key]["th_ratio"] = now[route.key]["th_total"] / local["th_total"]
        log(
            "blocks re-profiled now (time now ÷ cached profile, per node): "
            + ", ".join(f"{n} {f:.2f}" for n, f in factors.items())
        )
    pools = {
        s: Service(
            s,
            Pool.from_task(
                get_task(cfg.service(s).task, data_root=cfg.data_root, seed=cfg.seed), args.batch, seed=cfg.seed
            ),
        )
        for s in names
    }

    measured = None
    try:
        if not args.url:
            from coderay.cluster import LocalCluster
            from deployments.app import deploy, free_port

            log("starting the local Ray cluster")
            cluster = LocalCluster(cfg)
            sigterm_as_ctrl_c()
            log("deploying")
            assert table is not None  # loaded (or SystemExit) above, without --url
            url = deploy(cfg, table, port=free_port())
            log(f"served at {url}")
            if args.front == "direct":
                from deployments.app import direct_url

                direct = direct_url(url)
                if direct is None:
                    raise SystemExit(
                        "--front direct: the ingress has no direct HTTP port (serving.throughput_optimized "
                        "off, or this Ray lacks Serve's direct ingress)"
                    )
                url = direct
                log(f"measuring through the ingress replica's own HTTP port: {url}")
        measured = asyncio.run(
            until_signal(measure(url, routes, pools, args, log, lambda svc: raw_models[svc].rate(2.0)))
        )
        sigterm_as_ctrl_c()
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted: shutting down")
        return 130
    finally:
        if cluster is not None:
            from ray import serve

            try:
                serve.shutdown()
            finally:
                cluster.shutdown()
    wall_s = time.perf_counter() - t_start

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        report(args, cfg, routes, best_rows, edge_rows, raw, measured, load_before, started, wall_s, mode, now, factors)
    )
    plot(routes, measured["runs"], args.repeats, args.batch, args.p99_ms, args.plot)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "runs": {f"{k[0]} | run {k[1]}": v for k, v in measured["runs"].items()},
                    "raw_torch": raw,
                    "replicas": measured["replicas"],
                },
                indent=1,
            )
        )
    log(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
