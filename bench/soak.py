"""Sustained load: a fixed number of requests at N closed-loop clients, every replica's resident memory sampled
throughout, block groups optionally SIGKILLed mid-load; writes bench/results/soak.md (and .json, .png).

    .venv/bin/python bench/soak.py [CONFIG] [--url http://127.0.0.1:8000] [--requests 20000] [--clients 32]
        [--repeats 3] [--service digits] [--kill digits mnist] [--pin] [--key KEY]

Without `--url` it starts the config's local cluster (CPU caps as configured), deploys the searched app and starts
the controller; with `--url` it loads a running `coderay up` on this machine (the replicas' pids come from
`/v1/debug/replicas`, so a kill and the memory readings need this machine). Requests carry held-out test samples
of the service; the route is the controller's own unless `--pin` pins the table's best cooperative path at
share 1.0. `--kill a b` SIGKILLs `blocks-a` a third of the way through each run and `blocks-b` two thirds of the
way: a request counts as lost unless answered 200 within the deadline (`serving.request_timeout_s`).

Memory is flat when the median resident size over the last quarter of a replica process's samples is within
`max(16 MiB, 1%)` of the median over the quarter after its warm-up (its first quarter of samples).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import loadgen  # noqa: E402

MIB = 2**20
FLAT_MIB = 16.0  # growth below this is noise (allocator arenas, GC timing), whatever the replica's size
FLAT_FRACTION = 0.01


# ------------------------------------------------------------------------------------------------ memory


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process of this machine, None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


async def replica_pids(client: loadgen.HttpClient, headers: dict[str, str]) -> dict[str, int]:
    """{"ingress" or a block group's deployment name: pid} of the replicas that answer now."""
    status, _, body = await client.request("GET", "/v1/debug/replicas", b"", headers)
    if status != 200:
        raise RuntimeError(f"/v1/debug/replicas answered {status}: {body[:200]!r}")
    got = json.loads(body)
    out = {"ingress": got["ingress"]["pid"]}
    out.update({r["deployment"]: r["pid"] for r in got["replicas"] if "deployment" in r and "pid" in r})
    return out


@dataclass
class Growth:
    """One replica process's resident memory after its warm-up and at the end of the load."""

    name: str
    pid: int
    samples: int
    warm_mib: float  # median over the quarter of its samples after the first
    end_mib: float  # median over its last quarter
    requests: int  # requests answered between the two windows' middles

    @property
    def growth_mib(self) -> float:
        return self.end_mib - self.warm_mib

    @property
    def flat(self) -> bool:
        return self.growth_mib <= max(FLAT_MIB, FLAT_FRACTION * self.warm_mib)

    @property
    def per_1k_mib(self) -> float | None:
        return 1e3 * self.growth_mib / self.requests if self.requests > 0 else None


def growth(name: str, pid: int, series: list[tuple[int, int]]) -> Growth | None:
    """`series`: (requests answered so far, RSS bytes) of one process in time order; None under 8 samples."""
    n = len(series)
    if n < 8:
        return None
    q = n // 4
    warm, end = series[q : 2 * q], series[n - q :]
    return Growth(
        name,
        pid,
        n,
        statistics.median(r for _, r in warm) / MIB,
        statistics.median(r for _, r in end) / MIB,
        end[len(end) // 2][0] - warm[len(warm) // 2][0],
    )


# ------------------------------------------------------------------------------------------------ the load


@dataclass
class Kill:
    deployment: str
    pid: int
    at_request: int
    replaced_s: float | None = None  # seconds until the group answered from a new process


@dataclass
class SoakRun:
    step: loadgen.Step
    deadline_s: float
    statuses: Counter = field(default_factory=Counter)
    fallbacks: int = 0
    slow: int = 0  # answered 200, after the deadline
    samples: int = 0
    correct: int | None = None
    by_path: Counter = field(default_factory=Counter)
    memory: dict[tuple[str, int], list[tuple[int, int]]] = field(default_factory=dict)
    kills: list[Kill] = field(default_factory=list)

    @property
    def lost(self) -> int:
        """Requests not answered 200 within the deadline."""
        return self.step.sent - self.step.ok + self.slow

    def growths(self) -> list[Growth]:
        got = (growth(name, pid, s) for (name, pid), s in self.memory.items())
        return [g for g in got if g is not None]


async def soak(
    url: str,
    send,
    *,
    requests: int,
    clients: int,
    deadline_s: float,
    kills: tuple[str, ...] = (),
    headers: dict[str, str] | None = None,
    sample_s: float = 0.5,
    log: Callable[[str], None] = lambda msg: None,
) -> SoakRun:
    """`requests` requests through `send(client, i) -> ((status, answer), labels or None)` at `clients` closed-loop
    clients, with every replica's RSS read each `sample_s` and block groups `kills` (service names) SIGKILLed at
    evenly spaced points of the load."""
    headers = headers or {}
    run = SoakRun(loadgen.Step("closed", None, clients, 0.0), deadline_s)
    done = 0

    async def one(client: loadgen.HttpClient, i: int) -> bool:
        nonlocal done
        t0 = time.perf_counter()
        (status, answer), labels = await send(client, i)
        done += 1
        run.statuses[status] += 1
        if status != 200 or answer is None:
            return False
        if time.perf_counter() - t0 > deadline_s:
            run.slow += 1
        run.fallbacks += bool(answer.get("fallback"))
        run.by_path[answer.get("path")] += 1
        if labels is not None:
            run.samples += len(labels)
            hits = sum(p["class_index"] == int(y) for p, y in zip(answer["predictions"], labels))
            run.correct = (run.correct or 0) + hits
        return True

    async with loadgen.make_client(url, timeout_s=deadline_s + 30) as control:
        pids = await replica_pids(control, headers)
        log(f"replicas: {pids}")
        finished = asyncio.Event()

        async def watch_memory() -> None:
            nonlocal pids
            last_lookup = time.monotonic()
            while not finished.is_set():
                for name, pid in pids.items():
                    rss = rss_bytes(pid)
                    if rss is not None:
                        run.memory.setdefault((name, pid), []).append((done, rss))
                if time.monotonic() - last_lookup > 5 * sample_s:  # a replaced replica: a new pid
                    try:
                        pids = {**pids, **await asyncio.wait_for(replica_pids(control, headers), 10)}
                    except (TimeoutError, RuntimeError, OSError, loadgen.HttpError, KeyError):
                        pass
                    last_lookup = time.monotonic()
                try:
                    await asyncio.wait_for(finished.wait(), sample_s)
                except TimeoutError:
                    pass

        async def inject() -> None:
            for k, svc in enumerate(kills, 1):
                at = requests * k // (len(kills) + 1)
                while done < at and not finished.is_set():
                    await asyncio.sleep(0.05)
                name = f"blocks-{svc}"
                now = await replica_pids(control, headers)
                os.kill(now[name], signal.SIGKILL)
                kill = Kill(name, now[name], done)
                run.kills.append(kill)
                log(f"SIGKILLed {name} (pid {kill.pid}) after {done} requests")
                t0 = time.monotonic()
                while not finished.is_set():
                    await asyncio.sleep(0.5)
                    try:
                        pid = (await asyncio.wait_for(replica_pids(control, headers), 10)).get(name)
                    except (TimeoutError, RuntimeError, OSError, loadgen.HttpError, KeyError):
                        continue
                    if pid is not None and pid != kill.pid:
                        kill.replaced_s = time.monotonic() - t0
                        log(f"{name} answers again from pid {pid} after {kill.replaced_s:.1f} s")
                        break

        watcher = asyncio.create_task(watch_memory())
        injector = asyncio.create_task(inject())
        async with loadgen.make_client(url, timeout_s=deadline_s + 30) as client:
            try:
                run.step = await loadgen.closed_loop(client, one, clients, requests=requests)
            finally:
                finished.set()
                await watcher
                if not injector.done():
                    injector.cancel()
                await asyncio.gather(injector, return_exceptions=True)
        error = None if injector.cancelled() else injector.exception()
        if error is not None:
            raise error
    return run


# ------------------------------------------------------------------------------------------------ the bench


def held_out_sender(cfg, service: str, headers: dict[str, str]):
    """Requests of one held-out test sample each (raw pixels, octet-stream), cycling through the test split."""
    from serving_bench import Pool

    from coderay.data import get_task

    pool = Pool.from_task(get_task(cfg.service(service).task, data_root=cfg.data_root, seed=cfg.seed), 1, cfg.seed)
    path = f"/v1/services/{service}/infer?top_k=1"

    async def send(client: loadgen.HttpClient, i: int):
        k = i % len(pool.bodies)
        status, _, data = await client.request(
            "POST",
            path,
            pool.bodies[k],
            {**headers, "Content-Type": "application/octet-stream", "X-Shape": pool.shapes[k]},
        )
        return (status, json.loads(data) if status == 200 else None), pool.labels[k]

    return send


def med(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "–"
    return f"{statistics.median(got):.1f} ({min(got):.1f}–{max(got):.1f})"


def report(args, cfg, runs: list[SoakRun], mode: str, load_avg: tuple[float, float], started: str) -> str:
    lines = [
        f"# Soak: {args.requests} requests at {args.clients} clients on `{args.service}` ({cfg.name}), "
        f"{len(runs)} runs",
        "",
        f"Measured {started} on this machine ({os.cpu_count()} CPUs; load average {load_avg[0]:.1f} before, "
        f"{load_avg[1]:.1f} after); {mode}. Each request: one held-out test sample; deadline "
        f"{cfg.serving.request_timeout_s:.0f} s (`serving.request_timeout_s`). Figures: median (min–max) of the "
        "runs. CPU caps emulate the edge servers' capacities (emulated figures).",
        "",
        "| run | requests | lost | fallbacks | req/s | p50 ms | p99 ms | max ms | accuracy | faults injected | paths |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in enumerate(runs, 1):
        acc = f"{r.correct / r.samples:.4f}" if r.samples and r.correct is not None else "–"
        kills = ", ".join(
            f"{x.deployment} at {x.at_request} (back in {x.replaced_s:.1f} s)"
            if x.replaced_s is not None
            else f"{x.deployment} at {x.at_request} (not back during the run)"
            for x in r.kills
        )
        paths = ", ".join(f"`{p}` {n}" for p, n in r.by_path.most_common())
        lines.append(
            f"| {k} | {r.step.sent} | {r.lost} | {r.fallbacks} | {r.step.achieved_rps:.0f} | {r.step.p50_ms:.0f} | "
            f"{r.step.p99_ms:.0f} | {max(r.step.latencies_ms, default=0):.0f} | {acc} | {kills or 'none'} | {paths} |"
        )
    lines += [
        "",
        f"Lost in all: **{sum(r.lost for r in runs)}** of {sum(r.step.sent for r in runs)}; p99 "
        f"{med([r.step.p99_ms for r in runs])} ms; requests/s {med([r.step.achieved_rps for r in runs])}.",
        "",
        "## Resident memory of every replica process (MiB)",
        "",
        "| run | replica | pid | samples | after warm-up | at the end | growth | per 1k requests | flat |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in enumerate(runs, 1):
        for g in sorted(r.growths(), key=lambda g: (g.name, g.pid)):
            per = f"{g.per_1k_mib:+.2f}" if g.per_1k_mib is not None else "–"
            lines.append(
                f"| {k} | {g.name} | {g.pid} | {g.samples} | {g.warm_mib:.1f} | {g.end_mib:.1f} | "
                f"{g.growth_mib:+.1f} | {per} | {'yes' if g.flat else '**no**'} |"
            )
    lines += [
        "",
        f"Flat: growth within max({FLAT_MIB:.0f} MiB, {FLAT_FRACTION:.0%}) of the after-warm-up median. A replica "
        "killed mid-run shows as two processes (the old one's samples end at the kill).",
        "",
        f"Command: `{' '.join(['.venv/bin/python', 'bench/soak.py', *sys.argv[1:]])}`",
    ]
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    """Resident MiB of each replica process against requests answered, the runs end to end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    colors: dict[str, str] = {}
    offset = 0
    for k, rec in enumerate(records):
        for key, series in rec["memory"].items():
            name = key.rsplit(":", 1)[0]
            color = colors.setdefault(name, f"C{len(colors)}")
            xs = [offset + done for done, _ in series]
            ax.plot(xs, [rss / MIB for _, rss in series], color=color, label=name if k == 0 else None, lw=1)
        for kill in rec["kills"]:
            ax.axvline(offset + kill["at_request"], color="grey", ls=":", lw=1)
        offset += rec["sent"]
        ax.axvline(offset, color="black", lw=0.5)
    ax.set_xlabel("requests answered (runs end to end)")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title("Every replica process's resident memory under sustained load")
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("--url", default=None, help="a running coderay up on this machine (default: start one)")
    p.add_argument("--service", default="digits")
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kill", nargs="*", default=[], help="services whose block group is SIGKILLed mid-run")
    p.add_argument("--pin", action="store_true", help="pin the best cooperative path at share 1.0")
    p.add_argument("--key", default=os.environ.get("CODERAY_API_KEY"), help="operator API key when auth is on")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    from coderay.config import DEFAULT_CONFIG, load_config
    from coderay.search import load_table

    cfg = load_config(args.config or DEFAULT_CONFIG)
    if not Path(cfg.workdir).is_absolute():
        cfg = cfg.model_copy(update={"workdir": str((ROOT / cfg.workdir).resolve())})
    headers = {"X-API-Key": args.key} if args.key else {}
    cluster = None
    try:
        if args.url:
            url, mode = args.url.rstrip("/"), f"a running `coderay up` at {args.url}"
        else:
            from coderay.cluster import LocalCluster
            from coderay.controller import start_controller
            from deployments.app import deploy, free_port

            table = load_table(cfg)
            if table is None:
                raise SystemExit(f"no reward table for {cfg.name!r}: run `coderay search` (or `coderay up`) first")
            cluster = LocalCluster(cfg)
            url = deploy(cfg, table, port=free_port())
            start_controller(cfg, table.rows)
            mode = "a local cluster, the app and the controller started by the bench"
        log(f"serving at {url}")
        if args.pin:
            import httpx

            paths = httpx.get(f"{url}/v1/services/{args.service}/paths", headers=headers, timeout=30).json()
            coop = max((r for r in paths["paths"] if r["kind"] == "coop"), key=lambda r: r["reward"])
            r = httpx.put(
                f"{url}/v1/services/{args.service}/route",
                json={"path": coop["path_id"], "coop_fraction": 1.0},
                headers=headers,
                timeout=30,
            )
            r.raise_for_status()
            mode += f"; route pinned: `{coop['path_id']}` at share 1.0"
        else:
            mode += "; the controller's own route"
        send = held_out_sender(cfg, args.service, headers)
        runs = []
        for k in range(args.repeats):
            log(f"run {k + 1}/{args.repeats}: {args.requests} requests at {args.clients} clients")
            run = asyncio.run(
                soak(
                    url,
                    send,
                    requests=args.requests,
                    clients=args.clients,
                    deadline_s=cfg.serving.request_timeout_s,
                    kills=tuple(args.kill),
                    headers=headers,
                    log=log,
                )
            )
            runs.append(run)
            log(
                f"  {run.step.sent} sent, {run.lost} lost, {run.fallbacks} fallbacks, "
                f"{run.step.achieved_rps:.0f} req/s, p99 {run.step.p99_ms:.0f} ms"
            )
            for g in run.growths():
                log(f"  {g.name} pid {g.pid}: {g.warm_mib:.1f} → {g.end_mib:.1f} MiB ({'flat' if g.flat else 'GROWS'})")
        if args.pin:
            import httpx

            httpx.delete(f"{url}/v1/services/{args.service}/route", headers=headers, timeout=30)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if cluster is not None:
            from ray import serve

            from coderay.controller import stop_controller

            stop_controller()
            serve.shutdown()
            cluster.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(args, cfg, runs, mode, (load_before, os.getloadavg()[0]), started))
    records = [
        {
            "sent": r.step.sent,
            "lost": r.lost,
            "statuses": dict(r.statuses),
            "fallbacks": r.fallbacks,
            "p99_ms": r.step.p99_ms,
            "rps": r.step.achieved_rps,
            "kills": [vars(x) for x in r.kills],
            "memory": {f"{n}:{p}": s for (n, p), s in r.memory.items()},
        }
        for r in runs
    ]
    args.out.with_suffix(".json").write_text(json.dumps(records))
    plot(records, args.out.with_suffix(".png"))
    log(f"wrote {args.out} and its .json, .png")
    return 1 if any(r.lost for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
